"""The agent in a SecAgg round (in-memory broker, real artifacts): it advertises before training, and an agent
restarted mid-round (its keys died with the process) does not join the same round again with new keys, which
would break its neighbours' share bundles."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import pytest

from fedge.core.secagg_session import stage_of
from fedge.edge_agent.agent import Agent
from fedge.edge_agent.config import AgentConfig
from fedge.protocol.codec import decode
from fedge.protocol.manifest import Manifest
from fedge.protocol.messages import Decline, DeclineReason, RoundAnnounce, SecAggStage
from fedge.protocol.secagg_wire import AdvertiseKeys
from fedge.protocol.transport import InMemoryTransport
from tests.agent_loop import test_agent_loop as loop
from tests.agent_loop.test_agent_loop import DEV, FLEET, Hub, T, announce, model_full, model_head
from tests.helpers import wait_until


@pytest.fixture
def config(tmp_path: Path) -> AgentConfig:
    return loop.config.__wrapped__(tmp_path, loop.data_file.__wrapped__(tmp_path))  # type: ignore[attr-defined]


@pytest.fixture
def hub() -> Hub:
    return Hub()


def secagg_announce(manifest: Manifest, rnd: int) -> RoundAnnounce:
    return replace(announce(manifest, rnd, selected=(DEV, "peer-1", "peer-2")), secagg_seed="5e" * 32,
                   secagg_degree=2, secagg_threshold=2, secagg_ring_bits=32, secagg_clip=1.0, secagg_scale=65536.0)


def advertised(hub: Hub) -> list[AdvertiseKeys]:
    got: list[AdvertiseKeys] = []
    lock = threading.Lock()

    def on(_t: str, payload: bytes) -> None:
        msg = decode(payload)
        assert isinstance(msg, SecAggStage)
        stage = stage_of(msg)
        if isinstance(stage, AdvertiseKeys):
            with lock:
                got.append(stage)

    hub.broker.subscribe(T.secagg(DEV), on)
    return got


def start(config: AgentConfig, hub: Hub, artifacts_dir: Path, manifest: Manifest, rnd: int) -> Agent:
    hub.send(T.model_full, model_full(artifacts_dir, manifest), retain=True)
    hub.send(T.model_head, model_head(artifacts_dir, manifest), retain=True)
    agent = Agent(config, transport=InMemoryTransport(hub.broker))
    agent.start()
    hub.send(T.announce, secagg_announce(manifest, rnd), retain=True)
    return agent


def test_the_agent_advertises_its_keys_for_a_secagg_round(
    config: AgentConfig, hub: Hub, artifacts_dir: Path, manifest: Manifest
) -> None:
    seen = advertised(hub)
    agent = start(config, hub, artifacts_dir, manifest, 4)
    try:
        assert wait_until(lambda: len(seen) == 1, 30)
        assert seen[0].sender == DEV and seen[0].round_id.startswith(f"{FLEET}:4:")
        assert (config.state_dir / "secagg" / "joined-4").exists()
        assert agent.wait_round_done(4, 60)  # trained; its masked input waits for the hub's relay
    finally:
        agent.stop()
    assert hub.updates() == [], "a SecAgg round never sends a plain update"


def test_an_agent_restarted_mid_round_does_not_join_it_again(
    config: AgentConfig, hub: Hub, artifacts_dir: Path, manifest: Manifest
) -> None:
    marker = config.state_dir / "secagg" / "joined-7"  # what an agent killed after advertising leaves behind
    marker.parent.mkdir(parents=True)
    marker.write_bytes(b"")
    seen = advertised(hub)
    declines: list[Decline] = []
    hub.broker.subscribe(T.decline(DEV), lambda _t, p: declines.append(decode(p)))  # type: ignore[arg-type]
    agent = start(config, hub, artifacts_dir, manifest, 7)
    try:
        assert agent.wait_round_done(7, 60)
        assert seen == []
        assert [(d.round, d.reason) for d in declines] == [(7, DeclineReason.NOT_ELIGIBLE)]  # the hub stops waiting
    finally:
        agent.stop()
