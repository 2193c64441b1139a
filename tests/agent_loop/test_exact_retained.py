"""An agent on a broker that sends retained messages only to exact-topic subscriptions (RabbitMQ's MQTT plugin,
PROTOCOL.md "What fedge needs from a broker") still reads every retained message it needs: the chain of key
rotations, a selection round's candidates, and it tells a hub that comes up that it is online."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedge.edge_agent.agent import Agent
from fedge.edge_agent.config import AgentConfig
from fedge.protocol.codec import encode
from fedge.protocol.manifest import Manifest
from fedge.protocol.messages import HubStatus, Message
from fedge.protocol.signing import HubSigner, KeyRotation, rotation_topic
from fedge.protocol.topics import topic_matches
from fedge.protocol.transport import Handler, InMemoryBroker, InMemoryTransport
from tests.agent_loop.test_agent_loop import DEV, FLEET, Hub, T, model_full, model_head
from tests.agent_loop.test_signed_messages import hub_key, signed_config  # noqa: F401 - fixtures
from tests.helpers import wait_until


@dataclass
class ExactRetainedBroker(InMemoryBroker):
    """Like RabbitMQ 3.10: a new subscription gets the retained message of its topic only when it names the topic
    exactly; live messages reach wildcard subscriptions as usual."""

    def subscribe(self, topic_filter: str, handler: Handler) -> None:
        with self.lock:
            self.subscribers.append((topic_filter, handler))
            backlog = [(t, p) for t, p in self.retained.items() if t == topic_filter and topic_matches(topic_filter, t)]
        for topic, payload in backlog:
            handler(topic, payload)


def _signed(key: Ed25519PrivateKey, topic: str, msg: Message) -> bytes:
    return HubSigner(key, FLEET).sign(encode(msg), topic)


def test_the_rotation_chain_and_the_models_arrive_by_exact_topics(
    signed_config: AgentConfig, hub_key: Ed25519PrivateKey, artifacts_dir: Path, manifest: Manifest  # noqa: F811
) -> None:
    new, newer = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    hub = Hub(broker=ExactRetainedBroker())
    # everything retained before the agent starts: two rotations, and models signed by the newest key
    hub.broker.publish(rotation_topic(FLEET, 1), KeyRotation.make(FLEET, hub_key, new.public_key(), 1), True)
    hub.broker.publish(rotation_topic(FLEET, 2), KeyRotation.make(FLEET, new, newer.public_key(), 2), True)
    hub.broker.publish(T.model_full, _signed(newer, T.model_full, model_full(artifacts_dir, manifest)), True)
    hub.broker.publish(T.model_head, _signed(newer, T.model_head, model_head(artifacts_dir, manifest, "v3")), True)
    agent = Agent(signed_config, transport=InMemoryTransport(hub.broker))
    agent.start()
    try:
        assert agent.trust.rotation_seq == 2, "the rotations retained on hub/key/1 and hub/key/2 were read"
        assert agent.state.model_version == "v3"
    finally:
        agent.stop()


def test_an_agent_says_it_is_online_when_a_hub_comes_up(tmp_path: Path) -> None:
    import numpy as np

    from fedge.edge_agent.config import config_from_mapping

    rng = np.random.default_rng(1)
    np.savez(tmp_path / "local.npz", x=rng.random((20, 28, 28, 1), dtype=np.float32), y=rng.integers(0, 10, 20))
    cfg = config_from_mapping({"device_id": DEV, "fleet": FLEET, "data": "local.npz", "state_dir": "state",
                               "broker": {"url": "mqtt://127.0.0.1:1"}}, tmp_path)
    hub = Hub(broker=ExactRetainedBroker())
    agent = Agent(cfg, transport=InMemoryTransport(hub.broker))
    agent.start()
    try:
        assert [p.online for p in hub.presences()] == [True]
        hub.send(T.hub_status, HubStatus(FLEET, online=True), retain=True)  # a hub (new, or restarted) came up
        assert wait_until(lambda: [p.online for p in hub.presences()] == [True, True], 5)
        hub.send(T.hub_status, HubStatus(FLEET, online=True), retain=True)  # still the same hub: nothing new
        hub.send(T.hub_status, HubStatus(FLEET, online=False), retain=True)  # its will
        hub.send(T.hub_status, HubStatus(FLEET, online=True), retain=True)  # back
        assert wait_until(lambda: len(hub.presences()) == 3, 5)
    finally:
        agent.stop()
