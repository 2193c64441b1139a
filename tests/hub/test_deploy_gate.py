"""The deploy gate: with held-out data, a new version that scores worse than the deployed one by more than the
tolerance is kept as a candidate (registered, not current, not published); version 0 is scored at import."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from fedge.core.losses import Score
from fedge.protocol.messages import ModelHead, RoundStatus
from tests.hub.fleet import SHAPES, TOPICS, Fleet, hub_config, zero_delta


def test_a_worse_version_stays_a_candidate(tmp_path: Path, artifacts: Path) -> None:
    scores = iter([0.80, 0.50, 0.78])  # v0 at import, then the version of each round

    def evaluator(_d: Path, _s: str, _h: Mapping[str, np.ndarray]) -> Score:
        return Score(1.0, next(scores))

    cfg = hub_config(tmp_path / "state", artifacts, aggregation={"deploy_tolerance": 0.05})
    fleet = Fleet(cfg, evaluator=evaluator)
    fleet.hub.start()
    try:
        assert fleet.hub.store.version("v0").accuracy == 0.80  # type: ignore[union-attr]
        for d in ("a", "b"):
            fleet.device(d).hello()
        rnd = fleet.start_round()
        for d in rnd.selected:
            fleet.device(d).update(rnd, zero_delta(SHAPES, 0.1))
        res = fleet.results[-1]
        assert res.status is RoundStatus.COMPLETED and res.model_version == "v1" and res.accuracy == 0.5
        assert res.detail is not None and "kept as a candidate" in res.detail
        assert fleet.hub.registry.current().version == "v0"  # type: ignore[union-attr]
        head = fleet.retained(TOPICS.model_head)
        assert isinstance(head, ModelHead) and head.version == "v0"  # devices never got v1
        rnd = fleet.start_round()
        assert rnd.model_version == "v0"  # the next round trains the deployed version again
        for d in rnd.selected:
            fleet.device(d).update(rnd, zero_delta(SHAPES, 0.1))
        res = fleet.results[-1]
        assert res.model_version == "v2" and res.detail is None  # 0.78 >= 0.80 - 0.05: deployed
        assert fleet.hub.registry.current().version == "v2"  # type: ignore[union-attr]
    finally:
        fleet.hub.stop()


def test_rounds_that_do_not_improve_the_model_raise_an_alert(tmp_path: Path, artifacts: Path) -> None:
    """Issue 20: several rounds in a row kept back by the gate (or worse than the source model) make the hub say so
    (meta ``alert``: ``fedge hub status`` and the dashboard), and a round that deploys clears it."""
    from fedge.core.losses import Score
    from tests.hub.fleet import SHAPES, Fleet, hub_config, zero_delta

    scores = iter([0.5] + [0.1] * 3 + [0.9])  # v0, then three worse versions, then a better one

    def evaluator(_d: object, _s: object, _h: object) -> Score:
        return Score(loss=1.0, accuracy=next(scores))

    cfg = hub_config(tmp_path / "state", artifacts, rounds={"min_devices": 1},
                     aggregation={"deploy_tolerance": 0.05, "federated_gate": False})
    fleet = Fleet(cfg, evaluator=evaluator)
    fleet.hub.start()
    try:
        fleet.device("a").hello()
        for i in range(4):
            rnd = fleet.start_round()
            fleet.device("a").update(rnd, zero_delta(SHAPES, 0.01))
            alert = fleet.hub.store.get_meta("alert")
            assert bool(alert) is (i == 2), (i, alert)  # the third round in a row without progress raises it
            if i == 2:
                assert alert is not None and "3 rounds in a row" in alert
        assert fleet.results[-1].deployed is True and not fleet.hub.store.get_meta("alert")  # progress clears it
    finally:
        fleet.hub.stop()


def test_every_fleet_has_a_gate_by_default_and_check_says_when_it_does_not(tmp_path: Path, artifacts: Path) -> None:
    """Issue 20: without held-out data at the hub the federated gate is on by default; with it, the held-out gate
    scores every version; ``--check`` warns about configurations that deploy unscored versions."""
    from fedge.hub.config import config_from_mapping
    from fedge.hub.daemon import gate_warnings, strategy_for

    def cfg(**over: object) -> object:
        table: dict[str, object] = {"fleet": "f1", "state_dir": str(tmp_path / "s"), "artifacts": str(artifacts),
                                    "broker": {"url": "mqtt://127.0.0.1:1883"}, **over}
        return config_from_mapping(table, tmp_path)

    eval_file = tmp_path / "eval.npz"
    eval_file.write_bytes(b"")
    bare, scored = cfg(), cfg(eval_data=str(eval_file))
    assert strategy_for(bare).gates.federated is True and gate_warnings(bare) == []  # type: ignore[arg-type]
    assert strategy_for(scored).gates.federated is False and gate_warnings(scored) == []  # type: ignore[arg-type]
    off = cfg(aggregation={"federated_gate": False})
    assert any("deployed unscored" in w for w in gate_warnings(off))  # type: ignore[arg-type]
    private = cfg(privacy={"mode": "central"})
    assert any("under [privacy]" in w for w in gate_warnings(private))  # type: ignore[arg-type]
