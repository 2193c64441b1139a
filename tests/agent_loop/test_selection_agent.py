"""The agent's side of a selection round on an in-memory broker with real exported artifacts: it installs the
candidates from ``model/candidate/<name>``, scores each on its validation split after a short fine-tune, and sends
one metrics-only report on ``select/<device>``; with a privacy policy it declines instead."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedge.edge_agent.agent import Agent
from fedge.edge_agent.config import config_from_mapping
from fedge.protocol.codec import decode
from fedge.protocol.manifest import Manifest
from fedge.protocol.messages import Decline, DeclineReason, Message, ModelUpdate, RoundAnnounce
from fedge.protocol.transport import InMemoryTransport
from tests.agent_loop.test_agent_loop import DEV, FLEET, Hub, T, model_full
from tests.helpers import wait_until


def _agent(tmp_path: Path, hub: Hub, **extra: Any) -> Agent:
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "local.npz", x=rng.random((40, 28, 28, 1), dtype=np.float32), y=rng.integers(0, 10, 40))
    table: dict[str, Any] = {"device_id": DEV, "fleet": FLEET, "data": str(tmp_path / "local.npz"),
                             "state_dir": "state", "backend": "auto", "seed": 3,
                             "broker": {"url": "mqtt://127.0.0.1:1"}, **extra}
    return Agent(config_from_mapping(table, tmp_path), transport=InMemoryTransport(hub.broker))


def _selection(manifest: Manifest, rnd: int, names: tuple[str, ...]) -> RoundAnnounce:
    return RoundAnnounce(FLEET, rnd, "v0", manifest.backbone_sha256, time.time() + 120, 1, (DEV,), 2, 0.05,
                         candidates=names, candidate_backbones=(manifest.backbone_sha256,) * len(names))


def _sent(hub: Hub, topic: str) -> list[Message]:
    got: list[Message] = []
    hub.broker.subscribe(topic, lambda _t, p: got.append(decode(p)) if p else None)
    return got


def test_the_agent_reports_validation_scores_per_candidate_and_nothing_else(
        tmp_path: Path, artifacts_dir: Path, manifest: Manifest) -> None:
    hub = Hub()
    reports = _sent(hub, T.select_report_all)
    # the candidate arrives on its own topic only (no model/full, no model/head: a selection needs neither)
    hub.send(T.candidate("cand-a"), model_full(artifacts_dir, manifest), retain=True)
    hub.send(T.select_announce, _selection(manifest, 4, ("cand-a", "cand-b")), retain=True)
    agent = _agent(tmp_path, hub)
    agent.start()
    try:
        assert agent.wait_round_done(4, 60)
        assert wait_until(lambda: len(reports) == 1, 10)
        (rep,) = reports
        assert isinstance(rep, ModelUpdate) and rep.round == 4 and rep.device == DEV
        assert rep.delta == {}, "a report carries no weights"
        assert set(rep.metrics) == {"val_n", "val_acc_cand-a", "val_loss_cand-a", "val_acc_cand-b",
                                    "val_loss_cand-b"}
        assert rep.metrics["val_n"] == 8 == rep.n_samples  # validation_fraction 0.2 of 40 rows
        assert 0 <= rep.metrics["val_acc_cand-a"] <= 1
        assert rep.metrics["val_loss_cand-a"] > 0 and rep.metrics["val_loss_cand-b"] > 0
        assert not hub.updates(), "no federated update is sent for a selection round"
    finally:
        agent.stop()


@pytest.mark.parametrize("extra,reason", [
    ({"privacy": {"epsilon_budget": 8.0}}, DeclineReason.DP_REQUIRED),
    ({"validation_fraction": 0.0}, DeclineReason.DATA_ERROR),
])
def test_a_device_that_cannot_report_declines(tmp_path: Path, artifacts_dir: Path, manifest: Manifest,
                                              extra: dict[str, Any], reason: DeclineReason) -> None:
    hub = Hub()
    declines = _sent(hub, T.decline(DEV))
    reports = _sent(hub, T.select_report_all)
    hub.send(T.candidate("cand-a"), model_full(artifacts_dir, manifest), retain=True)
    hub.send(T.select_announce, _selection(manifest, 2, ("cand-a",)), retain=True)
    agent = _agent(tmp_path, hub, **extra)
    agent.start()
    try:
        assert agent.wait_round_done(2, 60)
        assert wait_until(lambda: len(declines) == 1, 10)
        (dec,) = declines
        assert isinstance(dec, Decline) and dec.round == 2 and dec.reason is reason
        assert not reports
    finally:
        agent.stop()


def test_an_evaluation_round_scores_the_published_head_as_is(
        tmp_path: Path, artifacts_dir: Path, manifest: Manifest) -> None:
    """The federated deploy gate: ``local_epochs`` 0 and a ``model_head`` on the candidate topic: the device scores
    that head on its validation split without training it."""
    from fedge.core.evaluation import split_indices
    from fedge.core.training import evaluate
    from fedge.protocol.manifest import load_head
    from fedge.protocol.messages import ModelHead
    from fedge.runtime.data import load_local
    from fedge.runtime.trainers import open_trainer

    hub = Hub()
    reports = _sent(hub, T.select_report_all)
    head = {k: (v * 0.5).astype(np.float32) for k, v in load_head(artifacts_dir).items()}
    hub.send(T.model_full, model_full(artifacts_dir, manifest), retain=True)
    hub.send(T.candidate("v7"), ModelHead(FLEET, "v7", "v6", manifest.backbone_sha256, 5, head), retain=True)
    ann = RoundAnnounce(FLEET, 6, "v6", manifest.backbone_sha256, time.time() + 120, 1, (DEV,), 0, 0.05,
                        candidates=("v7",), candidate_backbones=(manifest.backbone_sha256,))
    hub.send(T.select_announce, ann, retain=True)
    agent = _agent(tmp_path, hub)
    agent.start()
    try:
        assert agent.wait_round_done(6, 60)
        assert wait_until(lambda: len(reports) == 1, 10)
        (rep,) = reports
        assert isinstance(rep, ModelUpdate)
        data = load_local(tmp_path / "local.npz")
        _, va = split_indices(len(data.y), 0.2, data.sha256)
        trainer = open_trainer(artifacts_dir, "auto")
        trainer.set_head(head)
        want = evaluate(trainer, trainer.features(np.asarray(data.x, np.float32)[va]), np.asarray(data.y)[va])
        assert rep.metrics["val_acc_v7"] == pytest.approx(want.accuracy)
        assert rep.metrics["val_loss_v7"] == pytest.approx(want.loss, rel=1e-4)
    finally:
        agent.stop()
