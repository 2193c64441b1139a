"""Personalisation end to end (issue 8): a hub process and three agent processes with ``personalization =
"ditto"`` on mosquitto, two rounds; the personal heads, the federated metrics the round results carry, and
``fedge-agent predict`` on a device, checked against a forward pass computed here from the personal head file."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray

from fedge.protocol.manifest import load_head, load_manifest
from fedge.protocol.messages import RoundStatus
from tests.e2e.fleet import ROOT, Fleet, FleetData
from tests.helpers import Mosquitto

pytestmark = pytest.mark.e2e

N_AGENTS = 3
ROUNDS = (1, 2)


def _predict(config: Path, data: Path, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedge.edge_agent", "predict", "--config", str(config),
                           "--data", str(data), "--out", str(out)], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})


def _read(out: Path) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    """``(class, probability)`` of every row of a predictions CSV."""
    with out.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["row"]) for r in rows] == list(range(len(rows)))
    return (np.array([int(r["class"]) for r in rows], dtype=np.int64),
            np.array([float(r["probability"]) for r in rows], dtype=np.float64))


def _top(logits: NDArray[np.float64]) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    """Argmax and its softmax probability."""
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    return logits.argmax(axis=1).astype(np.int64), p.max(axis=1)


def _head_forward(head: dict[str, NDArray[np.float32]], activations: tuple[str, ...] | list[str],
                  feats: NDArray[np.float32]) -> NDArray[np.float64]:
    """The head MLP in plain numpy (h{i}_kernel, h{i}_bias; ReLU between layers), independent of the trainers."""
    h = feats.astype(np.float64)
    for i, act in enumerate(activations):
        h = h @ head[f"h{i}_kernel"].astype(np.float64) + head[f"h{i}_bias"].astype(np.float64)
        if act == "relu":
            h = np.maximum(h, 0.0)
        else:
            assert act == "linear", act
    return h


def test_ditto_personal_heads_federated_metrics_and_predict(
    make_fleet: Callable[..., Fleet], mosquitto: Mosquitto, fleet_data: FleetData, tmp_path: Path
) -> None:
    fleet = make_fleet(mosquitto.url, n_agents=N_AGENTS)
    for dev in fleet.devices:
        fleet.set_agent_config(dev, personalization="ditto", ditto_mu=0.1)
    fleet.write_hub_toml(schedule={"chain_rounds": len(ROUNDS)}, rounds={"local_epochs": 2})
    dev = fleet.devices[0]
    config = fleet.root / "agents" / f"{dev}.toml"
    state_dir = fleet.root / "agents" / dev
    with np.load(fleet_data.eval_file, allow_pickle=False) as z:
        x = np.asarray(z["x"], dtype=np.float32)[:200]
    x_npz = tmp_path / "x.npz"
    np.savez(x_npz, x=x)
    x_csv = tmp_path / "x.csv"
    np.savetxt(x_csv, x[:20].reshape(20, -1), delimiter=",", fmt="%.6f")

    # before the device ever received a model: a clear error, no output, no traceback
    out = tmp_path / "pred.csv"
    early = _predict(config, x_npz, out)
    assert early.returncode == 2 and "no model installed" in early.stderr, early.stderr
    assert "Traceback" not in early.stderr and not out.exists()

    fleet.start_hub()
    fleet.start_agents(ready=True)
    # a model but no personal head yet: predict says which head it used instead
    before = _predict(config, x_npz, out)
    assert before.returncode == 0 and "with the global" in before.stderr, before.stderr

    fleet.start_round(b"{}")
    results = fleet.wait_results(ROUNDS, timeout_s=120)
    for res in results:
        assert res.status is RoundStatus.COMPLETED and sorted(res.devices) == fleet.devices, res
        fed = res.federated
        assert fed["val_n"] == sum(fleet.data.shard_sizes[:N_AGENTS]) - sum(
            n - round(0.2 * n) for n in fleet.data.shard_sizes[:N_AGENTS])
        for name in ("source", "global", "trained", "personal", "local_only"):
            assert 0 <= fed[f"val_acc_{name}"] <= 1 and np.isfinite(fed[f"val_loss_{name}"]), fed
    # ditto keeps a head of its own: it is not the head trained for the hub (finetune would make them one)
    assert any(r.federated["val_loss_personal"] != r.federated["val_loss_trained"] for r in results)

    for d in fleet.devices:  # every device holds a personal head, unlike any global head it received
        personal_file = fleet.root / "agents" / d / "personal_head.npz"
        assert personal_file.is_file(), d
        personal = load_head(personal_file)
        globals_held = sorted((fleet.root / "agents" / d / "heads").glob("*.npz"))
        assert globals_held, d
        for g in globals_held:
            other = load_head(g)
            assert other.keys() == personal.keys()
            assert any(not np.array_equal(personal[k], other[k]) for k in personal), (d, g.name)

    # predict on the device: argmax of the logits of the head it says it chose (the best of its personal, global
    # and source heads on its validation rows) over the backbone's features
    from fedge.runtime.trainers import open_trainer

    manifest = load_manifest(fleet_data.artifacts)
    trainer = open_trainer(fleet_data.artifacts, backend="auto")
    feats = trainer.features(x)
    done = _predict(config, x_npz, out)
    assert done.returncode == 0 and "validation rows (accuracy, loss): personal " in done.stderr, done.stderr
    which = done.stderr.split(" predictions with the ")[1].split(" head,")[0]
    chosen = {"personal": state_dir / "personal_head.npz", "source": fleet_data.artifacts / "head.npz"}.get(
        which, state_dir / "heads" / f"{which.removeprefix('global ')}.npz")
    expected, expected_p = _top(_head_forward(load_head(chosen), manifest.head_activations, feats))
    got, got_p = _read(out)
    assert got.shape == (len(x),)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_allclose(got_p, expected_p, atol=1e-4)
    if which == "personal":  # not what any global head the device holds would say
        for held in (state_dir / "heads").glob("*.npz"):
            _, global_p = _top(_head_forward(load_head(held), manifest.head_activations, feats))
            assert np.abs(got_p - global_p).max() > 1e-2, held.name

    done = _predict(config, x_csv, tmp_path / "pred-csv.csv")  # CSV feature rows: the same predictions
    assert done.returncode == 0, done.stderr
    csv_classes, csv_p = _read(tmp_path / "pred-csv.csv")
    np.testing.assert_array_equal(csv_classes, expected[:20])
    np.testing.assert_allclose(csv_p, expected_p[:20], atol=1e-4)
