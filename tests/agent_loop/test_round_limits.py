"""The agent's side of the round lifecycle (issue 12, items 1 and 7), on an in-memory broker with real artifacts:
it declines work beyond its own limits, stops training at its time limit, and publishes an unacknowledged update
again (same bytes) until the hub acknowledges it or the round closes."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pytest

from fedge.edge_agent.agent import Agent
from fedge.edge_agent.config import AgentConfig
from fedge.edge_agent.outbox import FRESH_S
from fedge.protocol.codec import decode
from fedge.protocol.manifest import Manifest
from fedge.protocol.messages import (
    Ack,
    Decline,
    DeclineReason,
    HubStatus,
    Reject,
    RejectReason,
    RoundResult,
    RoundStatus,
)
from fedge.protocol.transport import InMemoryTransport
from tests.agent_loop import test_agent_loop as loop
from tests.agent_loop.test_agent_loop import DEV, FLEET, Hub, T, announce, model_full, model_head

# the fixtures of the agent-loop tests (a config over a small data file, the stand-in hub)
config, data_file, hub = loop.config, loop.data_file, loop.hub


def _serve_model(hub: Hub, artifacts_dir: Path, manifest: Manifest) -> None:
    hub.send(T.model_full, model_full(artifacts_dir, manifest), retain=True)
    hub.send(T.model_head, model_head(artifacts_dir, manifest), retain=True)


def _raw_updates(hub: Hub) -> list[bytes]:
    raw: list[bytes] = []
    hub.broker.subscribe(T.update(DEV), lambda _t, p: raw.append(p))
    return raw


def _declines(hub: Hub) -> list[Decline]:
    got: list[Decline] = []

    def on(_t: str, payload: bytes) -> None:
        msg = decode(payload)
        assert isinstance(msg, Decline)
        got.append(msg)

    hub.broker.subscribe(T.decline(DEV), on)
    return got


def test_a_round_asking_for_more_epochs_than_the_device_allows_is_declined(
    config: AgentConfig, hub: Hub, artifacts_dir: Path, manifest: Manifest
) -> None:
    declines = _declines(hub)
    _serve_model(hub, artifacts_dir, manifest)
    agent = Agent(replace(config, max_epochs=3), transport=InMemoryTransport(hub.broker))
    agent.start()
    try:
        hub.send(T.announce, replace(announce(manifest, 1), local_epochs=4))
        assert agent.wait_round_done(1, 60)
        (d,) = declines
        assert d.reason is DeclineReason.OVER_LIMITS and "at most 3" in d.detail
        assert hub.updates() == []
    finally:
        agent.stop()


def test_training_stops_at_the_devices_time_limit_and_sends_what_it_has(
    config: AgentConfig, hub: Hub, artifacts_dir: Path, manifest: Manifest
) -> None:
    _serve_model(hub, artifacts_dir, manifest)
    epochs = 10**6  # hours of training: only the time limit ends it
    agent = Agent(replace(config, max_epochs=epochs, max_round_s=3.0), transport=InMemoryTransport(hub.broker))
    agent.start()
    try:
        hub.send(T.announce, replace(announce(manifest, 1), local_epochs=epochs))
        assert agent.wait_round_done(1, 120), "training did not stop at max_round_s"
        (upd,) = hub.updates()
        assert upd.metrics["stopped_early"] == 1.0 and 0 < upd.metrics["n_steps"] < epochs
    finally:
        agent.stop()


def test_an_unacknowledged_update_is_sent_again_until_its_own_ack_arrives(
    config: AgentConfig, hub: Hub, artifacts_dir: Path, manifest: Manifest
) -> None:
    raw = _raw_updates(hub)
    _serve_model(hub, artifacts_dir, manifest)
    outbox = config.state_dir / "outbox" / "round-1.bin"
    agent = Agent(config, transport=InMemoryTransport(hub.broker))
    now = [1000.0]
    agent.outbox.clock = lambda: now[0]  # seconds since the update was last sent, as the test says
    agent.start()
    try:
        hub.send(T.announce, announce(manifest, 1))
        assert agent.wait_round_done(1, 60)
        (first,) = hub.updates()
        assert outbox.read_bytes() == raw[0]
        now[0] += FRESH_S
        hub.send(T.hub_status, HubStatus(FLEET, online=True))  # e.g. the hub reconnected after a broker restart
        assert raw == [raw[0]] * 2, "sent again, byte for byte (same nonce)"
        hub.send(T.ack(DEV), Ack(FLEET, 1, DEV, ref_nonce="f" * 32))  # an ack of someone else's update
        hub.send(T.reject(DEV), Reject(FLEET, 1, DEV, RejectReason.DUPLICATE, "x", ref_nonce="e" * 32))
        now[0] += FRESH_S
        hub.send(T.hub_status, HubStatus(FLEET, online=True))
        assert len(raw) == 3 and outbox.exists(), "only an ack of our own nonce settles the update"
        hub.send(T.ack(DEV), Ack(FLEET, 1, DEV, ref_nonce=first.nonce))
        assert not outbox.exists()
        now[0] += FRESH_S
        hub.send(T.hub_status, HubStatus(FLEET, online=True))
        assert len(raw) == 3, "acknowledged: never sent again"
    finally:
        agent.stop()


def test_an_unacknowledged_update_survives_a_restart_and_stops_when_the_round_closes(
    config: AgentConfig, hub: Hub, artifacts_dir: Path, manifest: Manifest
) -> None:
    raw = _raw_updates(hub)
    _serve_model(hub, artifacts_dir, manifest)
    first = Agent(config, transport=InMemoryTransport(hub.broker))
    first.start()
    hub.send(T.announce, announce(manifest, 2))
    assert first.wait_round_done(2, 60)
    first.stop()
    second = Agent(config, transport=InMemoryTransport(hub.broker))
    second.start()
    try:
        hub.send(T.hub_status, HubStatus(FLEET, online=True))
        assert raw == [raw[0]] * 2, "the restarted agent still sends the very same update"
        hub.send(T.result, RoundResult(FLEET, 2, RoundStatus.FAILED_QUORUM, None, None, None, (), 0, 0, 1.0))
        assert not (config.state_dir / "outbox" / "round-2.bin").exists()
        hub.send(T.hub_status, HubStatus(FLEET, online=True))
        assert len(raw) == 2, "the round closed: not sent again"
    finally:
        second.stop()


def test_a_fresh_update_is_not_sent_again_on_hub_status_and_a_late_copys_reject_is_no_warning(
    config: AgentConfig, hub: Hub, artifacts_dir: Path, manifest: Manifest, caplog: pytest.LogCaptureFixture
) -> None:
    """The hub's status arrives right after an update whenever that update closes the round: the update is not
    sent again then (only once it is FRESH_S old, on every reconnect, and when the worker idles RETRY_S); and the
    hub's reject of a copy of an acknowledged update for the closed round is logged as information."""
    raw = _raw_updates(hub)
    _serve_model(hub, artifacts_dir, manifest)
    agent = Agent(config, transport=InMemoryTransport(hub.broker))
    now = [1000.0]
    agent.outbox.clock = lambda: now[0]
    agent.start()
    caplog.set_level(logging.INFO, logger="fedge.agent")
    try:
        hub.send(T.announce, announce(manifest, 1))
        assert agent.wait_round_done(1, 60)
        (first,) = hub.updates()
        now[0] += 0.001
        hub.send(T.hub_status, HubStatus(FLEET, online=True, round=None))  # the round it completed just closed
        now[0] += FRESH_S - 0.01
        hub.send(T.hub_status, HubStatus(FLEET, online=True))
        assert len(raw) == 1 and "sent again" not in caplog.text, "a fresh update is not sent again on hub status"
        agent._on_connect()  # reconnected: sent again whatever its age
        assert raw == [raw[0]] * 2
        hub.send(T.hub_status, HubStatus(FLEET, online=True))  # the retained status after the reconnect
        assert len(raw) == 2
        now[0] += FRESH_S
        agent.worker._on_idle()  # the worker idled RETRY_S
        assert raw == [raw[0]] * 3
        hub.send(T.ack(DEV), Ack(FLEET, 1, DEV, ref_nonce=first.nonce))
        caplog.clear()
        hub.send(T.reject(DEV), Reject(FLEET, 1, DEV, RejectReason.NO_OPEN_ROUND, "round 1 is closed",
                                       ref_nonce=first.nonce))
        assert "acknowledged update of round 1" in caplog.text
        assert [r.levelno for r in caplog.records] == [logging.INFO]
        hub.send(T.reject(DEV), Reject(FLEET, 2, DEV, RejectReason.NO_OPEN_ROUND, "x", ref_nonce="e" * 32))
        assert caplog.records[-1].levelno == logging.WARNING, "a reject of an update never acknowledged warns"
    finally:
        agent.stop()
