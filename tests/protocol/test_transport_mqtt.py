"""MqttTransport against real brokers: mosquitto (a process), the embedded amqtt broker and RabbitMQ (MQTT plugin)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fedge.protocol.errors import TransportError
from fedge.protocol.mqtt_config import BrokerConfig
from fedge.protocol.transport_mqtt import MqttTransport
from tests.helpers import free_port, wait_until

CHILD = Path(__file__).with_name("mqtt_child.py")


class Inbox:
    """Collects (topic, payload) pairs from a handler, thread-safe."""

    def __init__(self) -> None:
        self.items: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()

    def __call__(self, topic: str, payload: bytes) -> None:
        with self.lock:
            self.items.append((topic, payload))

    def payloads(self) -> list[bytes]:
        with self.lock:
            return [p for _t, p in self.items]

    def wait_for(self, n: int, timeout_s: float = 10.0) -> list[bytes]:
        assert wait_until(lambda: len(self.payloads()) >= n, timeout_s), f"got {len(self.payloads())} of {n}"
        return self.payloads()


def proto(broker: Any) -> str:
    """amqtt and RabbitMQ 3.10 speak only 3.1.1; naming it skips the auto-detection probe (tested separately)."""
    return "3.1.1" if broker.kind in ("embedded", "rabbitmq") else "5"


def config(broker: Any, protocol: str) -> BrokerConfig:
    """The broker's [broker] settings: RabbitMQ wants its generated login (and the test's virtual host)."""
    if broker.kind == "rabbitmq":
        return broker.config(protocol=protocol)
    return BrokerConfig(url=broker.url, protocol=protocol)


@pytest.fixture
def clients() -> Iterator[list[MqttTransport]]:
    made: list[MqttTransport] = []
    yield made
    for c in made:
        c.close(flush_timeout_s=0.5)


def left(broker: Any, client_id: str) -> None:
    """Wait until the broker has processed a client's DISCONNECT (amqtt loses messages sent meanwhile)."""
    if broker.kind == "embedded":
        assert wait_until(lambda: broker.session_connected(client_id) is False, timeout_s=5)


def make(clients: list[MqttTransport], broker: Any, client_id: str, protocol: str | None = None, **kw: Any) -> Any:
    t = MqttTransport(config(broker, protocol or proto(broker)), client_id, **kw)
    clients.append(t)
    return t


def test_publish_subscribe_round_trip(broker: Any, clients: list[MqttTransport]) -> None:
    sub, pub = make(clients, broker, "sub"), make(clients, broker, "pub")
    inbox = Inbox()
    sub.subscribe("fedge/f1/update/+", inbox)
    sub.connect()
    pub.connect()
    pub.publish("fedge/f1/update/dev1", b"hello")
    pub.publish("fedge/f1/other", b"not for sub")
    pub.publish("fedge/f1/update/dev2", b"world")
    assert inbox.wait_for(2) == [b"hello", b"world"]
    assert [t for t, _ in inbox.items] == ["fedge/f1/update/dev1", "fedge/f1/update/dev2"]


def test_retained_message_reaches_late_subscriber_and_empty_payload_clears_it(
    broker: Any, clients: list[MqttTransport]
) -> None:
    pub = make(clients, broker, "pub")
    pub.connect()
    pub.publish("fedge/f1/model/head", b"v1", retain=True)
    pub.publish("fedge/f1/round/announce", b"round 3", retain=True)
    pub.publish("fedge/f1/round/announce", b"", retain=True)  # round closed: cleared
    pub.close()  # flushes
    late = make(clients, broker, "late")
    inbox, wide = Inbox(), Inbox()
    # exact topics: what fedge relies on (PROTOCOL.md, "What fedge needs from a broker")
    late.subscribe("fedge/f1/model/head", inbox)
    late.subscribe("fedge/f1/round/announce", inbox)
    late2 = make(clients, broker, "late2")
    late2.subscribe("fedge/f1/#", wide)
    late.connect()
    late2.connect()
    assert inbox.wait_for(1) == [b"v1"]
    assert not wait_until(lambda: len(inbox.payloads()) > 1, timeout_s=0.5)
    # through a wildcard: mosquitto and amqtt send retained messages (amqtt twice: at least once), RabbitMQ 3.10 none
    assert set(wide.payloads()) == (set() if broker.kind == "rabbitmq" else {b"v1"})


# Only the combinations that exist: amqtt (the embedded broker) speaks no MQTT 5, so there is no such case.
@pytest.mark.parametrize(("broker_kind", "protocol"), [pytest.param("mosquitto", "5", marks=pytest.mark.e2e),
                                                       pytest.param("mosquitto", "3.1.1", marks=pytest.mark.e2e),
                                                       ("embedded_broker", "3.1.1")])
def test_persistent_session_gets_qos1_messages_sent_while_away(
    request: pytest.FixtureRequest, clients: list[MqttTransport], broker_kind: str, protocol: str
) -> None:
    broker = request.getfixturevalue(broker_kind)
    device = make(clients, broker, "dev-away", protocol)
    device.subscribe("fedge/f1/device/dev-away/+", Inbox())
    device.connect()
    device.close()
    left(broker, "dev-away")
    hub = make(clients, broker, "hub")
    hub.connect()
    for i in range(5):
        hub.publish("fedge/f1/device/dev-away/ack", f"ack {i}".encode())
    hub.close()
    back = make(clients, broker, "dev-away", protocol)
    inbox = Inbox()
    back.subscribe("fedge/f1/device/dev-away/+", inbox)
    back.connect()
    assert inbox.wait_for(5) == [f"ack {i}".encode() for i in range(5)]


def test_five_megabyte_message(broker: Any, clients: list[MqttTransport]) -> None:
    sub, pub = make(clients, broker, "sub"), make(clients, broker, "pub")
    inbox = Inbox()
    sub.subscribe("fedge/f1/model/full", inbox)
    sub.connect()
    pub.connect()
    big = bytes(range(256)) * (5 * 1024 * 1024 // 256)
    pub.publish("fedge/f1/model/full", big, retain=True)
    assert inbox.wait_for(1, timeout_s=20) == [big]


def test_subscriptions_come_back_after_broker_restart(broker: Any, clients: list[MqttTransport]) -> None:
    sub = make(clients, broker, "sub")
    inbox = Inbox()
    reconnects: list[int] = []
    sub.add_on_connect(lambda: reconnects.append(1))
    sub.subscribe("fedge/f1/presence/+", inbox)
    sub.connect()
    assert reconnects == [1]
    broker.restart()  # amqtt loses its sessions: only the re-subscribe in on_connect brings them back
    assert wait_until(lambda: len(reconnects) == 2 and sub.connected.is_set(), timeout_s=15)
    pub = make(clients, broker, "pub")
    pub.connect()
    pub.publish("fedge/f1/presence/dev1", b"online")
    assert inbox.wait_for(1) == [b"online"]


def test_a_failing_handler_neither_stops_other_handlers_nor_later_messages(
    broker: Any, clients: list[MqttTransport]
) -> None:
    sub, pub = make(clients, broker, "sub"), make(clients, broker, "pub")

    def boom(topic: str, payload: bytes) -> None:
        raise RuntimeError("handler bug")

    inbox, wide = Inbox(), Inbox()
    sub.subscribe("a/b", boom)
    sub.subscribe("a/b", inbox)
    sub.subscribe("a/#", wide)
    sub.connect()
    pub.connect()
    pub.publish("a/b", b"1")
    pub.publish("a/c", b"2")
    pub.publish("a/b", b"3")
    assert wait_until(lambda: set(inbox.payloads()) == {b"1", b"3"} and len(set(wide.payloads())) == 3)
    if sub.protocol == "5":  # Subscription Identifiers: exactly one dispatch per handler
        assert not wait_until(lambda: len(wide.payloads()) > 3, timeout_s=0.3)
        assert (inbox.payloads(), wide.payloads()) == ([b"1", b"3"], [b"1", b"2", b"3"])
    # MQTT 3.1.1 lets a broker send one copy per overlapping filter (amqtt does): at least once


def _child(broker: Any, client_id: str, will_topic: str, sub_filter: str) -> subprocess.Popen[str]:
    login = [broker.account()["username"], broker.account()["password"]] if broker.kind == "rabbitmq" else []
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), broker.url, proto(broker), client_id, will_topic, sub_filter, *login],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _kill(proc: subprocess.Popen[str]) -> None:
    """SIGKILL: no DISCONNECT packet, no clean-up; the broker sees the socket drop."""
    proc.kill()
    proc.wait()
    assert proc.stdout is not None
    proc.stdout.close()


def test_will_fires_when_a_client_dies_but_not_on_close(broker: Any, clients: list[MqttTransport]) -> None:
    watcher = make(clients, broker, "watcher")
    inbox = Inbox()
    watcher.subscribe("fedge/f1/presence/+", inbox)
    watcher.connect()
    polite = make(clients, broker, "polite", will=("fedge/f1/presence/polite", b"offline", True))
    polite.connect()
    polite.close()
    child = _child(broker, "dying", "fedge/f1/presence/dying", "nothing/here")
    _kill(child)
    assert inbox.wait_for(1, timeout_s=15) == [b"offline"]
    assert inbox.items[0][0] == "fedge/f1/presence/dying"
    assert not wait_until(lambda: len(inbox.payloads()) > 1, timeout_s=0.5)


def test_manual_ack_redelivers_a_message_whose_handler_never_returned(
    mosquitto: Any, clients: list[MqttTransport]
) -> None:
    # mosquitto only: amqtt 0.12.1 drops an unacknowledged QoS 1 message after 5 s or on disconnect
    # (MqttProtocolHandler discards it from inflight_out), so it never redelivers.
    child = _child(mosquitto, "hub-x", "fedge/f1/hub/status", "fedge/f1/update/+")
    pub = make(clients, mosquitto, "dev1")
    pub.connect()
    pub.publish("fedge/f1/update/dev1", b"delta")
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "got fedge/f1/update/dev1 delta"
    _kill(child)  # died inside the handler: never acknowledged
    again = make(clients, mosquitto, "hub-x", manual_ack=True)
    inbox = Inbox()
    again.subscribe("fedge/f1/update/+", inbox)
    again.connect()
    assert inbox.wait_for(1) == [b"delta"]


def test_manual_ack_acknowledges_after_the_handlers_return(broker: Any, clients: list[MqttTransport]) -> None:
    hub = make(clients, broker, "hub-y", manual_ack=True)
    inbox = Inbox()
    hub.subscribe("fedge/f1/update/+", inbox)
    hub.connect()
    pub = make(clients, broker, "dev1")
    pub.connect()
    for i in range(20):
        pub.publish("fedge/f1/update/dev1", f"u{i}".encode())
    assert inbox.wait_for(20) == [f"u{i}".encode() for i in range(20)]
    hub.close()
    left(broker, "hub-y")
    pub.publish("fedge/f1/update/dev1", b"while away")
    # acknowledged: the next incarnation of the same session gets only what came while it was away
    back = make(clients, broker, "hub-y", manual_ack=True)
    late = Inbox()
    back.subscribe("fedge/f1/update/+", late)
    back.connect()
    assert late.wait_for(1)[0] == b"while away"
    wait_until(lambda: len(late.payloads()) > 1, timeout_s=0.5)
    if broker.kind == "mosquitto":
        assert late.payloads() == [b"while away"]
    else:  # QoS 1 is at-least-once: amqtt may send a queued message twice, but none of the acked ones
        assert set(late.payloads()) == {b"while away"}


def test_protocol_auto_picks_5_on_mosquitto_and_3_1_1_on_amqtt_and_rabbitmq(
    broker: Any, clients: list[MqttTransport]
) -> None:
    from fedge.protocol import transport_mqtt

    transport_mqtt._DETECTED.pop((broker.node.host if broker.kind == "rabbitmq" else "127.0.0.1", broker.port), None)
    t = make(clients, broker, "auto", protocol="auto")
    t0 = time.monotonic()
    t.connect()
    took = time.monotonic() - t0
    assert t.protocol == ("5" if broker.kind == "mosquitto" else "3.1.1")
    if broker.kind == "rabbitmq":  # it closes an MQTT 5 CONNECT without a CONNACK: the fallback is immediate,
        assert took < 1.5, f"the fallback to 3.1.1 took {took:.1f} s"  # not after amqtt's 2 s wait
    inbox = Inbox()
    t.subscribe("x/y", inbox)
    t.publish("x/y", b"works")
    assert inbox.wait_for(1) == [b"works"]


def test_unreachable_broker_raises_transport_error_quickly() -> None:
    t = MqttTransport(BrokerConfig(url=f"mqtt://127.0.0.1:{free_port()}"), "lonely")
    with pytest.raises(TransportError, match="unreachable"):
        t.connect(timeout_s=2)


def test_publish_before_connect_is_an_error() -> None:
    t = MqttTransport(BrokerConfig(), "early")
    with pytest.raises(TransportError, match="before connect"):
        t.publish("a", b"x")
