"""Source-model selection in simulation: the agent's scoring and the hub's ranking, on real exported candidates
(an mlp pre-trained on digits, a fresh one, and a deliberately poor one whose feature layer is zero)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedge.core.aggregators import robust_mean
from fedge.core.selection import report_weights
from fedge.protocol.errors import ConfigError
from fedge.simulate_selection import parse_candidates, simulate_selection


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Path], list[tuple[np.ndarray, np.ndarray]],
                                                           list[str], Path]:
    from fedge.datasets.partition import dirichlet_partition, write_npz
    from fedge.datasets.source import load_source
    from fedge.export.exporter import export_model
    from fedge.export.testing import export_small
    from fedge.export.zoo import build_zoo_model, init_weights
    from fedge.simulate import content_key

    root = tmp_path_factory.mktemp("selection-sim")
    export_small(root / "good", "mlp", trained=True, seed=1)
    export_small(root / "fresh", "mlp", seed=2)
    poor = build_zoo_model("mlp", 10, 64)
    init_weights(poor, np.random.default_rng(3))
    layer = poor.get_layer("features")
    layer.set_weights([np.zeros_like(w) for w in layer.get_weights()])
    export_model(poor, root / "poor", None, 32)
    data = load_source("digits")
    parts = dirichlet_partition(data.y_test, 6, 0.5, np.random.default_rng(0), size_per_device=50)
    shards = [(data.x_test[p].reshape(len(p), -1).astype(np.float32), data.y_test[p].astype(np.int64))
              for p in parts]
    write_npz(root / "eval.npz", data.x_train[:400].reshape(400, -1).astype(np.float32), data.y_train[:400])
    cands = {"poor": root / "poor", "fresh": root / "fresh", "good": root / "good"}
    return cands, shards, [content_key(x, y) for x, y in shards], root / "eval.npz"


def test_selection_picks_the_candidate_with_the_best_reference_score(task) -> None:  # type: ignore[no-untyped-def]
    cands, shards, keys, ev = task
    sim = simulate_selection(cands, shards, keys, ev, epochs=3, lr=0.05, seed=0, backend="numpy")
    assert sim.winner == "good" and sim.best == "good" and sim.correct, sim.as_dict()
    scores = {c.name: c.accuracy for c in sim.ranking}
    assert scores["good"] > scores["poor"] + 0.2, sim.as_dict()
    assert sim.reference["good"] > sim.reference["poor"] + 0.2
    assert sim.ranking[0].val_n == sum(round(0.2 * len(y)) for _, y in shards)


def test_the_fleet_scores_are_the_agents_score_candidate(task) -> None:  # type: ignore[no-untyped-def]
    from fedge.core.evaluation import split_indices
    from fedge.edge_agent.selection import score_candidate
    from fedge.protocol.manifest import load_head
    from fedge.runtime.trainers import open_trainer

    cands, shards, keys, ev = task
    sim = simulate_selection({"good": cands["good"]}, shards, keys, ev, epochs=2, lr=0.05, seed=4, backend="numpy")
    trainer = open_trainer(cands["good"], "numpy")
    w0 = load_head(cands["good"])
    scores, rows = [], []
    for i, ((x, y), key) in enumerate(zip(shards, keys, strict=True)):
        tr, va = split_indices(len(y), 0.2, key)
        f = trainer.features(x)
        s = score_candidate(trainer, w0, f[tr], y[tr], f[va], y[va], 2, 0.05,
                            np.random.default_rng([4, 0x5EED_0006, i, 0]))
        assert s is not None
        scores.append(s.accuracy)
        rows.append({"val_n": float(len(va))})
    # the hub's robust mean of the devices' scores (fedge.core.selection.rank), here of the agents' own scores
    expected = robust_mean(scores, report_weights(rows))
    assert sim.ranking[0].accuracy == pytest.approx(expected, abs=1e-6)


def test_candidate_specs_are_checked() -> None:
    assert parse_candidates(["a=/x", "b=y"]) == {"a": Path("/x"), "b": Path("y")}
    for bad in (["a"], ["=x"], ["a=x", "a=y"]):
        with pytest.raises(ConfigError):
            parse_candidates(bad)


def test_fedge_simulate_selects_first_and_federates_from_the_winner(
        tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str]) -> None:
    """The demo folder's own model is deliberately poor (zeroed feature layer); ``--candidate good=...`` (cnn28
    pre-trained on source images) must win, and the rounds must run over the good backbone."""
    import json

    from fedge.cli import main
    from fedge.demo import DemoPaths
    from fedge.export.exporter import export_model
    from fedge.export.testing import export_small
    from fedge.export.zoo import build_zoo_model, init_weights
    from fedge.protocol.manifest import verify_artifacts

    paths = DemoPaths(tmp_path_factory.mktemp("simulate-selection"))
    poor = build_zoo_model("cnn28", 10)
    init_weights(poor, np.random.default_rng(3))
    layer = poor.get_layer("features")
    layer.set_weights([np.zeros_like(w) for w in layer.get_weights()])
    export_model(poor, paths.artifacts, None, 32)
    paths.source_model.write_bytes(b"")  # demo.prepare keeps the artifacts above (no pre-training)
    good = paths.root / "good"
    export_small(good, trained=True)
    code = main(["simulate", "--devices", "6", "--rounds", "1", "--out", str(paths.root), "--lr", "0.1",
                 "--candidate", f"good={good}", "--json"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    sel = report["selection"]
    assert sel["winner"] == "good" and sel["best"] == "good" and sel["correct"], sel
    assert [c["name"] for c in sel["ranking"]] == ["good", "source"]
    assert report["rounds"][0]["status"] == "completed" and code in (0, 1)
    assert json.loads(paths.report.read_text())["selection"] == sel
    # the round trained over the winner's backbone: on the balanced held-out set a head over the poor one's constant
    # features cannot beat one class (0.1)
    assert report["rounds"][0]["accuracy"] > 0.3, report["rounds"]
    assert verify_artifacts(good).backbone_sha256 != verify_artifacts(paths.artifacts).backbone_sha256
