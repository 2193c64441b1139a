"""The agent's run loop on an in-memory broker with real exported artifacts.

The hub's side is played by publishing ModelFull / ModelHead / RoundAnnounce frames; what the agent
sends back (presence, updates) is decoded from the same broker.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fedge.edge_agent.worker as worker_module
from fedge.edge_agent.agent import Agent
from fedge.edge_agent.artifacts import artifacts_dir as installed_dir
from fedge.edge_agent.config import AgentConfig, config_from_mapping
from fedge.protocol.codec import decode, encode
from fedge.protocol.errors import DataError
from fedge.protocol.manifest import Manifest, load_head
from fedge.protocol.messages import (
    Arrays,
    Decline,
    DeclineReason,
    Message,
    ModelFull,
    ModelHead,
    ModelUpdate,
    Presence,
    Reject,
    RejectReason,
    RoundAnnounce,
    RoundResult,
    RoundStatus,
    new_nonce,
)
from fedge.protocol.topics import Topics
from fedge.protocol.transport import InMemoryBroker, InMemoryTransport
from tests.helpers import wait_until

FLEET = "loop"
DEV = "dev-a"
N = 40
N_TRAIN = 32  # validation_fraction 0.2 holds 8 rows out
T = Topics(FLEET)


@dataclass
class Hub:
    """The test's stand-in for the hub: publishes frames and records what devices send."""

    broker: InMemoryBroker = field(default_factory=InMemoryBroker)
    got: list[Message] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.broker.subscribe(T.update_all, self._record)
        self.broker.subscribe(T.presence_all, self._record)

    def _record(self, _topic: str, payload: bytes) -> None:
        if payload:
            with self.lock:
                self.got.append(decode(payload))

    def send(self, topic: str, msg: Message, retain: bool = False) -> None:
        self.broker.publish(topic, encode(msg), retain)

    def updates(self) -> list[ModelUpdate]:
        with self.lock:
            return [m for m in self.got if isinstance(m, ModelUpdate)]

    def presences(self) -> list[Presence]:
        with self.lock:
            return [m for m in self.got if isinstance(m, Presence)]


def model_full(artifacts: Path, manifest: Manifest) -> ModelFull:
    files: Arrays = {name: np.frombuffer((artifacts / name).read_bytes(), dtype=np.uint8) for name in manifest.files}
    return ModelFull(FLEET, manifest.backbone_sha256, (artifacts / "manifest.json").read_text(), files)


def model_head(artifacts: Path, manifest: Manifest, version: str = "v1") -> ModelHead:
    return ModelHead(FLEET, version, None, manifest.backbone_sha256, None, dict(load_head(artifacts)))


def publish_model(hub: Hub, artifacts: Path, manifest: Manifest, version: str = "v1") -> None:
    """The hub's retained model: the backbone's artifacts and the head of ``version``."""
    hub.send(T.model_full, model_full(artifacts, manifest), retain=True)
    hub.send(T.model_head, model_head(artifacts, manifest, version), retain=True)


def announce(manifest: Manifest, rnd: int, *, version: str = "v1", selected: tuple[str, ...] = (DEV,),
             deadline_s: float = 120.0) -> RoundAnnounce:
    return RoundAnnounce(
        FLEET, rnd, version, manifest.backbone_sha256, time.time() + deadline_s, 1, selected, 1, 0.05
    )


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    rng = np.random.default_rng(1)
    path = tmp_path / "local.npz"
    np.savez(path, x=rng.random((N, 28, 28, 1), dtype=np.float32), y=rng.integers(0, 10, N))
    return path


@pytest.fixture
def config(tmp_path: Path, data_file: Path) -> AgentConfig:
    table: dict[str, Any] = {
        "device_id": DEV, "fleet": FLEET, "data": str(data_file), "state_dir": "state",
        "backend": "auto", "seed": 3, "broker": {"url": "mqtt://127.0.0.1:1"},
        "personalization": "finetune",  # the personal head is exactly global + the update (checked below)
    }
    return config_from_mapping(table, tmp_path)


@pytest.fixture
def hub() -> Hub:
    return Hub()


@pytest.fixture
def agent(config: AgentConfig, hub: Hub) -> Iterator[Agent]:
    a = Agent(config, transport=InMemoryTransport(hub.broker))
    yield a
    a.stop()


def test_round_publishes_exactly_one_valid_update_and_ignores_the_rest(
    agent: Agent, hub: Hub, artifacts_dir: Path, manifest: Manifest, config: AgentConfig
) -> None:
    publish_model(hub, artifacts_dir, manifest)
    agent.start()
    first = announce(manifest, 1)
    hub.send(T.announce, first, retain=True)
    hub.send(T.announce, first)  # redelivered while round 1 is queued or running
    assert agent.wait_round_done(1, 60)

    (upd,) = hub.updates()
    head = load_head(artifacts_dir)
    assert upd.round == 1 and upd.device == DEV and upd.model_version == "v1" and upd.fleet == FLEET
    assert upd.n_samples == N_TRAIN  # the validation split never trains
    assert list(upd.delta) == list(head)
    for name, arr in head.items():
        assert upd.delta[name].shape == arr.shape and upd.delta[name].dtype == np.float32
    assert any(np.abs(d).max() > 0 for d in upd.delta.values())
    for key in ("loss_before", "loss_after", "acc_before", "acc_after", "train_seconds", "n_steps"):
        assert key in upd.metrics
    assert upd.metrics["n_steps"] == -(-N_TRAIN // manifest.train_batch)  # one epoch
    # federated evaluation: every head scored on the device's validation split
    assert upd.metrics["val_n"] == N - N_TRAIN
    for name in ("source", "global", "trained", "personal", "local_only"):
        assert 0 <= upd.metrics[f"val_acc_{name}"] <= 1 and upd.metrics[f"val_loss_{name}"] > 0
    assert upd.metrics["val_acc_global"] == upd.metrics["val_acc_source"]  # v1 is the exported head here
    assert any(k.startswith("backend_") for k in upd.metrics)

    # the personalised head = global + delta is kept on the device; the round is persisted
    with np.load(config.state_dir / "personal_head.npz", allow_pickle=False) as z:
        for name, arr in head.items():
            np.testing.assert_allclose(z[name], arr + np.asarray(upd.delta[name], np.float32), rtol=0, atol=1e-6)
    assert json.loads((config.state_dir / "state.json").read_text())["last_completed_round"] == 1

    hub.send(T.announce, first)  # the same announce redelivered
    hub.send(T.announce, announce(manifest, 1))  # the same round re-announced
    hub.send(T.announce, announce(manifest, 0))  # an older round
    hub.send(T.announce, announce(manifest, 2, selected=("dev-b", "dev-c")))  # not selected
    hub.send(T.announce, announce(manifest, 3, deadline_s=-1))  # deadline already passed
    hub.send(T.announce, announce(manifest, 4))
    assert agent.wait_round_done(4, 60)  # the worker is FIFO: anything queued before round 4 has run by now
    assert [u.round for u in hub.updates()] == [1, 4]
    assert len({u.nonce for u in hub.updates()}) == 2


def test_presence_online_with_samples_and_version_then_offline_on_stop(
    config: AgentConfig, hub: Hub, artifacts_dir: Path, manifest: Manifest
) -> None:
    publish_model(hub, artifacts_dir, manifest, "v7")
    agent = Agent(config, transport=InMemoryTransport(hub.broker))
    agent.start()
    online = [p for p in hub.presences() if p.online]
    assert online and online[-1].device == DEV and online[-1].n_samples == N
    assert online[-1].model_version == "v7" and online[-1].backends
    agent.stop()
    last = decode(hub.broker.retained[T.presence(DEV)])
    assert isinstance(last, Presence) and last.online is False


def test_completed_round_survives_a_restart(
    config: AgentConfig, hub: Hub, artifacts_dir: Path, manifest: Manifest
) -> None:
    publish_model(hub, artifacts_dir, manifest)
    hub.send(T.announce, announce(manifest, 5), retain=True)
    first = Agent(config, transport=InMemoryTransport(hub.broker))
    first.start()
    assert first.wait_round_done(5, 60)
    first.stop()
    second = Agent(config, transport=InMemoryTransport(hub.broker))
    second.start()  # the retained announce of round 5 arrives again: stale now
    hub.send(T.announce, announce(manifest, 6))
    assert second.wait_round_done(6, 60)
    second.stop()
    assert [u.round for u in hub.updates()] == [5, 6]
    assert len(list((config.state_dir / "artifacts").iterdir())) == 1  # the backbone was written once


def test_tampered_model_full_is_rejected_and_a_pending_round_runs_when_the_real_one_arrives(
    agent: Agent, hub: Hub, artifacts_dir: Path, manifest: Manifest, config: AgentConfig
) -> None:
    agent.start()
    hub.send(T.announce, announce(manifest, 1))  # before any model: pending
    hub.send(T.model_head, model_head(artifacts_dir, manifest))
    assert hub.updates() == []

    good = model_full(artifacts_dir, manifest)
    files = {k: v.copy() for k, v in good.files.items()}
    victim = sorted(files)[0]
    files[victim][len(files[victim]) // 2] ^= 0xFF
    hub.send(T.model_full, ModelFull(FLEET, good.backbone_sha256, good.manifest, files))
    other_sha = "0" * 64  # the manifest names another backbone than the message
    hub.send(T.model_full, ModelFull(FLEET, other_sha, good.manifest, dict(good.files)))
    hub.send(T.model_full, ModelFull(FLEET, good.backbone_sha256, "{not json", dict(good.files)))
    assert list((config.state_dir / "artifacts").iterdir()) == []  # nothing installed, no leftovers
    assert not agent.wait_round_done(1, 0.2)

    hub.send(T.model_full, good)
    assert agent.wait_round_done(1, 60)
    (upd,) = hub.updates()
    assert upd.round == 1 and upd.n_samples == N_TRAIN
    installed = config.state_dir / "artifacts" / manifest.backbone_sha256[:16]
    assert (installed_dir(config.state_dir / "artifacts", manifest.backbone_sha256) / "manifest.json").is_file()
    assert {p.name for p in (config.state_dir / "artifacts").iterdir()} == {installed.name}


def test_announce_waits_for_the_announced_head_version(
    agent: Agent, hub: Hub, artifacts_dir: Path, manifest: Manifest
) -> None:
    agent.start()
    hub.send(T.model_full, model_full(artifacts_dir, manifest))
    hub.send(T.model_head, model_head(artifacts_dir, manifest, "v1"))
    hub.send(T.announce, announce(manifest, 2, version="v2"))  # v2 not here yet
    assert not agent.wait_round_done(2, 0.3)
    head2 = model_head(artifacts_dir, manifest, "v2")
    shifted: Arrays = {k: np.asarray(v, np.float32) + np.float32(0.01) for k, v in head2.head.items()}
    hub.send(T.model_head, ModelHead(FLEET, "v2", "v1", manifest.backbone_sha256, 1, shifted))
    assert agent.wait_round_done(2, 60)
    (upd,) = hub.updates()
    assert upd.model_version == "v2"
    with np.load(agent.worker.personal_head_path, allow_pickle=False) as z:
        for name, arr in shifted.items():
            np.testing.assert_allclose(z[name], np.asarray(arr, np.float32) + np.asarray(upd.delta[name], np.float32),
                                       rtol=0, atol=1e-6)


def test_reject_is_recorded_in_state(agent: Agent, hub: Hub, config: AgentConfig) -> None:
    agent.start()
    hub.send(T.reject(DEV), Reject(FLEET, 3, DEV, RejectReason.STALE_ROUND, "round 3 is closed", "abc"))
    state = json.loads((config.state_dir / "state.json").read_text())
    assert state["last_reject"]["reason"] == "stale_round"
    assert state["last_reject"]["detail"] == "round 3 is closed"
    assert state["last_reject"]["round"] == 3


def test_malformed_frames_do_not_crash_the_agent(
    agent: Agent, hub: Hub, artifacts_dir: Path, manifest: Manifest
) -> None:
    agent.start()
    for topic in (T.model_full, T.model_head, T.announce, T.ack(DEV)):
        hub.broker.publish(topic, b"garbage", False)
    hub.send(T.model_head, announce(manifest, 1))  # the wrong message type on a topic
    hub.send(T.model_full, model_full(artifacts_dir, manifest))
    hub.send(T.model_head, model_head(artifacts_dir, manifest))
    hub.send(T.announce, announce(manifest, 1))
    assert agent.wait_round_done(1, 60)
    assert wait_until(lambda: len(hub.updates()) == 1, 5)


def test_bad_local_data_fails_start_with_data_error(config: AgentConfig, hub: Hub) -> None:
    config.data.write_bytes(b"PK\x03\x04 broken")
    agent = Agent(config, transport=InMemoryTransport(hub.broker))
    with pytest.raises(DataError, match=r"local\.npz"):
        agent.start()
    agent.stop()


def test_a_label_outside_the_classes_declines_the_round_with_a_data_error(
    tmp_path: Path, hub: Hub, artifacts_dir: Path, manifest: Manifest
) -> None:
    path = tmp_path / "bad-labels.npz"
    y = np.zeros(N, np.int64)
    y[7] = manifest.num_classes + 2  # passes the file checks; only the model knows the class count
    np.savez(path, x=np.random.default_rng(2).random((N, 28, 28, 1), dtype=np.float32), y=y)
    cfg = config_from_mapping({"device_id": DEV, "fleet": FLEET, "data": str(path), "state_dir": "state2",
                               "broker": {"url": "mqtt://127.0.0.1:1"}}, tmp_path)
    declines: list[Message] = []
    hub.broker.subscribe(T.decline(DEV), lambda _t, p: declines.append(decode(p)))
    a = Agent(cfg, transport=InMemoryTransport(hub.broker))
    try:
        publish_model(hub, artifacts_dir, manifest)
        a.start()
        hub.send(T.announce, announce(manifest, 1), retain=True)
        assert wait_until(lambda: bool(declines), 60)
        (d,) = declines
        assert isinstance(d, Decline) and d.round == 1 and d.reason is DeclineReason.DATA_ERROR
        assert d.detail == "see the device's log"  # the error text names the file and labels: kept on the device
        assert hub.updates() == []
        assert a.wait_round_done(1, 10)  # and it is not retried
    finally:
        a.stop()


def test_a_restart_after_publishing_resends_the_same_private_update(
    config: AgentConfig, hub: Hub, artifacts_dir: Path, manifest: Manifest
) -> None:
    """Crash window: the update left the device but the round was not marked done. The restarted agent must
    send the very same bytes (a second, freshly noised update would average the noise away)."""
    raw: list[bytes] = []
    hub.broker.subscribe(T.update(DEV), lambda _t, p: raw.append(p))
    publish_model(hub, artifacts_dir, manifest)
    dp_round = replace(announce(manifest, 7), dp_mode="local", dp_noise_multiplier=1.0, dp_clip=1.0,
                       dp_sample_rate=1.0, dp_min_cohort=1)
    hub.send(T.announce, dp_round, retain=True)
    first = Agent(config, transport=InMemoryTransport(hub.broker))
    first.start()
    assert first.wait_round_done(7, 60)
    first.stop()
    (sent,) = raw
    upd = decode(sent)
    assert isinstance(upd, ModelUpdate) and upd.n_samples == 1 and upd.metrics == {}
    # put the device back into the crash window: outbox written and published, round not marked completed
    state_file = config.state_dir / "state.json"
    state = json.loads(state_file.read_text())
    state["last_completed_round"] = 6
    state_file.write_text(json.dumps(state))
    (config.state_dir / "outbox").mkdir(exist_ok=True)
    (config.state_dir / "outbox" / "round-7.bin").write_bytes(sent)
    second = Agent(config, transport=InMemoryTransport(hub.broker))
    second.start()  # the retained announce of round 7 arrives again
    assert second.wait_round_done(7, 60)
    second.stop()
    assert raw == [sent, sent]  # byte for byte, same nonce: the hub treats it as a redelivery
    assert len(json.loads((config.state_dir / "privacy.json").read_text())["entries"]) == 1
    assert (config.state_dir / "outbox" / "round-7.bin").read_bytes() == sent, "kept until the hub acknowledges it"


def test_predict_uses_a_head_the_device_holds(
    agent: Agent, hub: Hub, artifacts_dir: Path, manifest: Manifest, config: AgentConfig, data_file: Path
) -> None:
    """After a round: the predictions are the forward pass of the head predict says it chose among the personal
    head the round left and the global head (tests/agent/test_predict.py: how it chooses)."""
    from fedge.edge_agent.predict import predict
    from fedge.runtime.trainers import open_trainer

    publish_model(hub, artifacts_dir, manifest)
    agent.start()
    hub.send(T.announce, announce(manifest, 1), retain=True)
    assert agent.wait_round_done(1, 60)
    result = predict(config, data_file, backend="numpy")
    pred, prob = result.classes, result.probability
    assert pred.shape == (N,) and np.all((prob > 0) & (prob <= 1))
    assert set(result.choice.scores) == {"personal", "global v1", "source"} and result.choice.val_n == N - N_TRAIN
    files = {"personal": config.state_dir / "personal_head.npz", "global v1": config.state_dir / "heads" / "v1.npz",
             "source": artifacts_dir / "head.npz"}
    trainer = open_trainer(artifacts_dir, backend="numpy")
    with np.load(data_file) as z:
        x = z["x"]
    trainer.set_head(load_head(files[result.choice.which]))
    np.testing.assert_array_equal(pred, trainer.logits(trainer.features(x)).argmax(axis=1))
    (config.state_dir / "personal_head.npz").unlink()  # no personal head: not a candidate
    assert set(predict(config, data_file, backend="numpy").choice.scores) == {"global v1", "source"}


def test_ditto_keeps_a_separate_personal_head_pulled_toward_the_global_one(
    tmp_path: Path, hub: Hub, artifacts_dir: Path, manifest: Manifest, data_file: Path
) -> None:
    cfg = config_from_mapping({"device_id": DEV, "fleet": FLEET, "data": str(data_file), "state_dir": "ditto",
                               "broker": {"url": "mqtt://127.0.0.1:1"}, "personalization": "ditto",
                               "ditto_mu": 5.0}, tmp_path)
    a = Agent(cfg, transport=InMemoryTransport(hub.broker))
    try:
        publish_model(hub, artifacts_dir, manifest)
        a.start()
        hub.send(T.announce, replace(announce(manifest, 1), local_epochs=3, lr=0.2), retain=True)
        assert a.wait_round_done(1, 60)
    finally:
        a.stop()
    (upd,) = hub.updates()
    glob = load_head(artifacts_dir)
    trained = {k: glob[k] + np.asarray(upd.delta[k], np.float32) for k in glob}
    personal = load_head(cfg.state_dir / "personal_head.npz")

    def dist(h: dict[str, np.ndarray]) -> float:
        return float(np.sqrt(sum(np.square(h[k] - glob[k]).sum() for k in h)))

    assert 0 < dist(personal) < dist(trained)  # its own head, held close to the global one by mu
    assert "val_acc_personal" in upd.metrics


def test_the_announced_proximal_pull_acts_in_local_training(
    agent: Agent, hub: Hub, artifacts_dir: Path, manifest: Manifest
) -> None:
    """v1 is the exported head = w0: a strong pull toward w0 shrinks the trained update."""
    publish_model(hub, artifacts_dir, manifest)
    agent.start()
    hub.send(T.announce, replace(announce(manifest, 1), lr=0.2, local_epochs=3))
    assert agent.wait_round_done(1, 60)
    hub.send(T.announce, replace(announce(manifest, 2), lr=0.2, local_epochs=3, proximal_lambda=20.0))
    assert agent.wait_round_done(2, 60)
    free, pulled = (float(np.sqrt(sum(np.square(d).sum() for d in u.delta.values()))) for u in hub.updates())
    assert 0 < pulled < 0.3 * free


def test_two_agents_cannot_share_a_state_dir(config: AgentConfig, hub: Hub) -> None:
    from fedge.protocol.errors import FedgeError

    first = Agent(config, transport=InMemoryTransport(hub.broker))
    first.start()
    try:
        second = Agent(config, transport=InMemoryTransport(hub.broker))
        with pytest.raises(FedgeError, match="in use by another agent"):
            second.start()
    finally:
        first.stop()
    third = Agent(config, transport=InMemoryTransport(hub.broker))  # released on stop
    third.start()
    third.stop()


def test_a_compressed_round_sends_codes_the_hub_decodes_and_keeps_the_residual(
    agent: Agent, hub: Hub, artifacts_dir: Path, manifest: Manifest, config: AgentConfig
) -> None:
    """Issue 22: a round announcing ``compression = int4`` gets half a byte per value and the arrays' scales; the
    codes decode (as the hub decodes them) to within one step of the float update, and what rounding lost is kept
    for the next round (error feedback)."""
    from dataclasses import replace

    from fedge.core.compress import SCALES, decompress

    publish_model(hub, artifacts_dir, manifest)
    agent.start()
    hub.send(T.announce, replace(announce(manifest, 1), compression="int4"), retain=True)
    assert agent.wait_round_done(1, 60)
    (upd,) = hub.updates()
    head = load_head(artifacts_dir)
    assert set(upd.delta) == {*head, SCALES}
    for name, arr in head.items():
        assert upd.delta[name].dtype == np.uint8 and upd.delta[name].size == (arr.size + 1) // 2
    delta = decompress(upd.delta, {k: v.shape for k, v in head.items()}, "int4")
    assert any(np.abs(d).max() > 0 for d in delta.values())
    residuals = list(config.state_dir.glob("residual-*.npz"))
    assert len(residuals) == 1  # the error feedback, for the next compressed round over this backbone


def test_a_buffered_round_is_trained_again_on_each_newer_version_never_twice_on_one(
    config: AgentConfig, hub: Hub, artifacts_dir: Path, manifest: Manifest
) -> None:
    """PROTOCOL.md, "Buffered rounds": one update per model version of the round; the announce re-published on a
    newer version is trained again (from that version's head), a repeat of one already answered is not."""
    publish_model(hub, artifacts_dir, manifest)
    first = Agent(config, transport=InMemoryTransport(hub.broker))
    first.start()
    on_v1 = replace(announce(manifest, 1), buffer_k=2, max_staleness=1)
    hub.send(T.announce, on_v1, retain=True)
    assert first.wait_round_done(1, 60)
    hub.send(T.announce, on_v1)  # redelivered: v1 is answered
    hub.send(T.model_head, model_head(artifacts_dir, manifest, "v2"), retain=True)
    on_v2 = replace(on_v1, model_version="v2")
    hub.send(T.announce, on_v2, retain=True)
    assert wait_until(lambda: len(hub.updates()) >= 2, 60)
    hub.send(T.announce, on_v2)  # redelivered: v2 is answered too
    hub.send(T.announce, announce(manifest, 2))  # a synchronous round after it: the FIFO worker ran the rest first
    assert first.wait_round_done(2, 60)
    first.stop()
    assert [(u.round, u.model_version) for u in hub.updates()] == [(1, "v1"), (1, "v2"), (2, "v1")]
    assert json.loads((config.state_dir / "state.json").read_text())["buffered_version"] is None

    second = Agent(config, transport=InMemoryTransport(hub.broker))  # a restart: state.json says what was sent
    hub.send(T.announce, replace(on_v2, round=3), retain=True)
    second.start()
    assert wait_until(lambda: len(hub.updates()) >= 4, 60)
    hub.send(T.announce, replace(on_v2, round=3))  # v2 of round 3 answered before the restart below
    second.stop()
    third = Agent(config, transport=InMemoryTransport(hub.broker))
    third.start()  # the retained announce (round 3, v2) arrives again: answered already
    hub.send(T.announce, announce(manifest, 4))
    assert third.wait_round_done(4, 60)
    third.stop()
    assert [(u.round, u.model_version) for u in hub.updates()][3:] == [(3, "v2"), (4, "v1")]


def test_a_declined_buffered_round_is_not_trained_again_on_a_newer_version(
    config: AgentConfig, hub: Hub, artifacts_dir: Path, manifest: Manifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A device that declined a buffered round sends nothing in it when the round is re-announced on a newer version
    (the version of its update in the round before must not make it train again: the hub rejects any update of a
    device that declined)."""
    declines: list[object] = []
    hub.broker.subscribe(T.decline(DEV), lambda _t, p: declines.append(decode(p)))
    publish_model(hub, artifacts_dir, manifest)
    agent = Agent(config, transport=InMemoryTransport(hub.broker))
    agent.start()
    r1 = replace(announce(manifest, 1), buffer_k=2, max_staleness=1)
    hub.send(T.announce, r1, retain=True)
    assert agent.wait_round_done(1, 60)
    assert wait_until(lambda: len(hub.updates()) == 1, 30)
    eligible: dict[str, str | None] = {"why": "battery low"}
    monkeypatch.setattr(worker_module, "not_eligible", lambda _cfg: eligible["why"])
    hub.send(T.model_head, model_head(artifacts_dir, manifest, "v2"), retain=True)
    r2 = replace(r1, round=2, model_version="v2")
    hub.send(T.announce, r2, retain=True)
    assert wait_until(lambda: len(declines) == 1, 30)
    assert agent.wait_round_done(2, 60)
    eligible["why"] = None
    hub.send(T.model_head, model_head(artifacts_dir, manifest, "v3"), retain=True)
    hub.send(T.announce, replace(r2, model_version="v3"), retain=True)  # round 2 made v3: re-announced on it
    hub.send(T.announce, announce(manifest, 3, version="v3"))  # the FIFO worker answers the re-announce before this one
    assert agent.wait_round_done(3, 60)
    agent.stop()
    assert [(u.round, u.model_version) for u in hub.updates()] == [(1, "v1"), (3, "v3")]
    assert [(d.round, d.reason) for d in declines if isinstance(d, Decline)] == [(2, "not_eligible")]


def test_a_buffered_round_is_not_trained_again_on_the_version_it_was_on_when_the_update_went_out(
    config: AgentConfig, hub: Hub, artifacts_dir: Path, manifest: Manifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The round moved to v2 while this device trained on v1: its v1 update lands in the buffer of v3 (the hub
    takes one update per device in a buffer), so the queued announce of v2 is not trained on; v3's is."""
    publish_model(hub, artifacts_dir, manifest)
    agent = Agent(config, transport=InMemoryTransport(hub.broker))
    agent.start()
    on_v1 = replace(announce(manifest, 1), buffer_k=2, max_staleness=1)
    real_train = worker_module.core.train
    trained: list[str] = []

    def train(msg: RoundAnnounce, *args: Any, **kwargs: Any) -> Any:
        if not trained:  # the hub makes v2 and re-announces the round while this device trains on v1
            hub.send(T.model_head, model_head(artifacts_dir, manifest, "v2"), retain=True)
            hub.send(T.announce, replace(on_v1, model_version="v2"), retain=True)
            assert agent.worker.announced == (1, "v2", 0)
        trained.append(msg.model_version)
        return real_train(msg, *args, **kwargs)

    monkeypatch.setattr(worker_module.core, "train", train)
    hub.send(T.announce, on_v1, retain=True)
    assert wait_until(lambda: len(hub.updates()) == 1, 60)
    hub.send(T.model_head, model_head(artifacts_dir, manifest, "v3"), retain=True)
    hub.send(T.announce, replace(on_v1, model_version="v3"), retain=True)
    assert wait_until(lambda: len(hub.updates()) == 2, 60)
    hub.send(T.announce, announce(manifest, 2, version="v3"))  # the FIFO worker answered what came before it first
    assert agent.wait_round_done(2, 60)
    agent.stop()
    assert [(u.round, u.model_version) for u in hub.updates()] == [(1, "v1"), (1, "v3"), (2, "v3")]
    assert trained == ["v1", "v3", "v3"]


def test_a_buffered_round_stops_training_once_it_closed(
    config: AgentConfig, hub: Hub, artifacts_dir: Path, manifest: Manifest
) -> None:
    """The hub takes no update of a closed buffered round (its unfilled buffer does not count either): the round's
    result stops the training at the next batch, as a synchronous round's does."""
    agent = Agent(config, transport=InMemoryTransport(hub.broker))
    agent.start()
    buffered = replace(announce(manifest, 1), buffer_k=2, max_staleness=1)
    stop = agent.worker.stopper(buffered)
    assert not stop()
    hub.send(T.result, RoundResult(buffered.fleet, 1, RoundStatus.COMPLETED, "v2", None, None, (), 0, 0, 1.0))
    assert wait_until(stop, 10)
    assert agent.worker.late_reason(replace(buffered, model_version="v2")) == "the buffered round closed"
    agent.stop()


def test_a_buffered_round_is_trained_again_on_the_same_version_in_each_new_attempt(
    config: AgentConfig, hub: Hub, artifacts_dir: Path, manifest: Manifest
) -> None:
    """A held-back version gives its devices their slot back: the hub re-publishes the announce (same round and
    version) with a higher ``buffer_attempt``, and the device trains again on that version, once per attempt; the
    same announce delivered again is not trained on, before or after a restart."""
    publish_model(hub, artifacts_dir, manifest)
    first = Agent(config, transport=InMemoryTransport(hub.broker))
    first.start()
    attempt0 = replace(announce(manifest, 1), buffer_k=2, max_staleness=1)
    hub.send(T.announce, attempt0, retain=True)
    assert wait_until(lambda: len(hub.updates()) == 1, 60)
    hub.send(T.announce, replace(attempt0, nonce=new_nonce()))  # redelivered: attempt 0 is answered
    attempt1 = replace(attempt0, buffer_attempt=1, nonce=new_nonce())  # v2 was held back: the same version again
    hub.send(T.announce, attempt1, retain=True)
    assert wait_until(lambda: len(hub.updates()) == 2, 60)
    hub.send(T.announce, replace(attempt1, nonce=new_nonce()))  # redelivered: attempt 1 is answered too
    hub.send(T.announce, announce(manifest, 2))  # a synchronous round after it: the FIFO worker ran the rest first
    assert first.wait_round_done(2, 60)
    first.stop()
    assert [(u.round, u.model_version) for u in hub.updates()] == [(1, "v1"), (1, "v1"), (2, "v1")]
    assert len({u.nonce for u in hub.updates()}) == 3

    hub.send(T.announce, replace(attempt1, round=3, nonce=new_nonce()), retain=True)
    second = Agent(config, transport=InMemoryTransport(hub.broker))
    second.start()
    assert wait_until(lambda: len(hub.updates()) == 4, 60)
    second.stop()
    state = json.loads((config.state_dir / "state.json").read_text())
    assert (state["last_completed_round"], state["buffered_version"], state["buffered_attempt"]) == (3, "v1", 1)
    third = Agent(config, transport=InMemoryTransport(hub.broker))
    third.start()  # the retained announce (round 3, attempt 1) arrives again: answered before the restart
    hub.send(T.announce, replace(attempt1, round=3, buffer_attempt=2, nonce=new_nonce()), retain=True)
    assert wait_until(lambda: len(hub.updates()) == 5, 60)
    hub.send(T.announce, announce(manifest, 4))
    assert third.wait_round_done(4, 60)
    third.stop()
    assert [(u.round, u.model_version) for u in hub.updates()][3:] == [(3, "v1"), (3, "v1"), (4, "v1")]


def test_a_state_file_from_before_buffer_attempts_reads_as_attempt_zero(
    config: AgentConfig, hub: Hub, artifacts_dir: Path, manifest: Manifest
) -> None:
    """An agent updated mid-round: its state.json names the version of its update in the buffered round but no
    attempt. It counts as attempt 0: the announce it answered is not trained on again, the next attempt is."""
    publish_model(hub, artifacts_dir, manifest)
    warm = Agent(config, transport=InMemoryTransport(hub.broker))  # installs the model, then stops
    warm.start()
    assert wait_until(lambda: warm.state.model_version == "v1", 30)
    warm.stop()
    path = config.state_dir / "state.json"
    old = json.loads(path.read_text())
    old = {k: v for k, v in old.items() if k not in ("buffered_attempt", "buffered_ahead_attempt")}
    path.write_text(json.dumps({**old, "last_completed_round": 1, "buffered_version": "v1", "buffered_ahead": None}))
    attempt0 = replace(announce(manifest, 1), buffer_k=2, max_staleness=1)
    hub.send(T.announce, attempt0, retain=True)
    agent = Agent(config, transport=InMemoryTransport(hub.broker))
    agent.start()
    assert (agent.state.buffered_version, agent.state.buffered_attempt) == ("v1", 0)
    hub.send(T.announce, replace(attempt0, buffer_attempt=1, nonce=new_nonce()), retain=True)
    assert wait_until(lambda: len(hub.updates()) == 1, 60)
    hub.send(T.announce, announce(manifest, 2))
    assert agent.wait_round_done(2, 60)
    agent.stop()
    assert [(u.round, u.model_version) for u in hub.updates()] == [(1, "v1"), (2, "v1")]
    assert json.loads(path.read_text())["buffered_attempt"] == 0  # round 2 is not buffered: forgotten


def test_a_buffered_round_is_not_trained_again_in_the_attempt_it_was_in_when_the_update_went_out(
    config: AgentConfig, hub: Hub, artifacts_dir: Path, manifest: Manifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``buffered_ahead`` with attempts: a buffer of other devices was held back while this one trained on attempt 0,
    so its update lands in the buffer of attempt 1 (one update per device in a buffer): the queued announce of
    attempt 1 is not trained on; attempt 2's is (that buffer was held back too)."""
    publish_model(hub, artifacts_dir, manifest)
    agent = Agent(config, transport=InMemoryTransport(hub.broker))
    agent.start()
    attempt0 = replace(announce(manifest, 1), buffer_k=2, max_staleness=1)
    real_train = worker_module.core.train
    trained: list[int] = []

    def train(msg: RoundAnnounce, *args: Any, **kwargs: Any) -> Any:
        if not trained:  # the hub holds a version back and re-announces the round while this device trains
            hub.send(T.announce, replace(attempt0, buffer_attempt=1, nonce=new_nonce()), retain=True)
            assert agent.worker.announced == (1, "v1", 1)
        trained.append(msg.buffer_attempt)
        return real_train(msg, *args, **kwargs)

    monkeypatch.setattr(worker_module.core, "train", train)
    hub.send(T.announce, attempt0, retain=True)
    assert wait_until(lambda: len(hub.updates()) == 1, 60)
    state = json.loads((config.state_dir / "state.json").read_text())
    assert (state["buffered_ahead"], state["buffered_ahead_attempt"]) == ("v1", 1)
    hub.send(T.announce, replace(attempt0, buffer_attempt=2, nonce=new_nonce()), retain=True)
    assert wait_until(lambda: len(hub.updates()) == 2, 60)
    hub.send(T.announce, announce(manifest, 2))
    assert agent.wait_round_done(2, 60)
    agent.stop()
    assert [(u.round, u.model_version) for u in hub.updates()] == [(1, "v1"), (1, "v1"), (2, "v1")]
    assert trained == [0, 2, 0]
