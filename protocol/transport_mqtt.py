"""The MQTT transport (paho-mqtt 2.x): the only module of fedge that imports paho.

* Persistent session: MQTT 5 ``clean_start=False`` + ``SessionExpiryInterval``; MQTT 3.1.1
  ``clean_session=False``. The broker queues QoS 1 messages for us while we are away.
* Subscriptions are remembered and re-sent in ``on_connect`` after every (re)connect.
* Automatic reconnect with back-off (0.2 s .. 5 s) in paho's network thread.
* ``protocol="auto"`` tries MQTT 5 and falls back to 3.1.1 when the broker does not answer a v5
  CONNECT properly. amqtt 0.12.1 (3.1.1 only) mis-parses a v5 CONNECT (the properties-length byte
  shifts its payload fields) and then waits for bytes that never come: it sends no CONNACK at all (the
  fallback comes after a wait). RabbitMQ before 3.13 closes the connection without a CONNACK: the
  fallback is immediate. A broker that does refuse properly answers CONNACK 0x01 (3.1.1 "unacceptable
  protocol version") or 0x84 (MQTT 5 "unsupported protocol version"). Every case leads to the 3.1.1
  fallback, which is then remembered per ``host:port`` for the life of the process.
* The username defaults to the client id (the embedded broker admits only clients with a username;
  RabbitMQ authenticates every name it is given: configure ``username``/``password`` there).
* Handlers: one call per delivered copy and handler, whatever the number of matching filters it is
  registered under (MQTT 3.1.1 delivers one copy for overlapping subscriptions on RabbitMQ, one per
  subscription on mosquitto; MQTT 5 Subscription Identifiers say which filters a copy is for).
  ``subscribe_deferred`` handlers acknowledge the message themselves, later (``manual_ack``: the
  PUBACK goes out when every handler of the message is done): see ``protocol.transport.DeferredAcks``.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any, Final, cast

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fedge.protocol.errors import TransportError
from fedge.protocol.mqtt_config import BrokerConfig
from fedge.protocol.transport import AckFn, DeferredHandler, Handler

__all__ = ["MqttTransport", "Will"]

_log = logging.getLogger(__name__)
Will = tuple[str, bytes, bool]
"""Last will: (topic, payload, retain); published with QoS 1 when the connection drops uncleanly."""

_PROTOCOL_REFUSED: Final = {1, 0x84}  # 3.1.1 "unacceptable protocol version", 5 "unsupported protocol version"
_DETECTED: dict[tuple[str, int], str] = {}  # host:port -> "3.1.1" after a fallback
_DETECTED_LOCK = threading.Lock()
_CLOSED_EARLY: Final = "the broker closed the connection without a CONNACK"
_MAX_ROUTES: Final = 1 << 16


class _PendingAck:
    """The PUBACK of one delivered message, sent once all ``parts`` (the synchronous handlers together, and each
    deferred handler) are done; skipped when the connection it came on is gone (the broker redelivers it)."""

    __slots__ = ("_client", "_generation", "_left", "_lock", "_mid", "_owner", "_qos")

    def __init__(self, owner: MqttTransport, client: mqtt.Client, mid: int, qos: int, parts: int) -> None:
        self._owner, self._client, self._mid, self._qos = owner, client, mid, qos
        self._generation = owner._generation
        self._left = parts
        self._lock = threading.Lock()

    def part(self) -> AckFn:
        """One part's one-shot acknowledgement."""
        fired = [False]

        def ack() -> None:
            with self._lock:
                if fired[0]:
                    return
                fired[0] = True
            self._done()

        return ack

    def _done(self) -> None:
        with self._lock:
            self._left -= 1
            if self._left:
                return
        if self._owner._generation == self._generation:
            self._client.ack(self._mid, self._qos)


class MqttTransport:
    """A reconnecting MQTT client with a persistent session; implements ``protocol.transport.Transport``."""

    def __init__(
        self,
        cfg: BrokerConfig,
        client_id: str,
        *,
        will: Will | None = None,
        manual_ack: bool = False,
        session_expiry_s: int = 3600,
    ) -> None:
        self.cfg = cfg
        self.client_id = client_id
        self.will = will
        self.manual_ack = manual_ack
        self.session_expiry_s = session_expiry_s
        self.connected = threading.Event()
        self.protocol: str | None = None  # "5" or "3.1.1" once connected
        self._client: mqtt.Client | None = None
        self._lock = threading.Lock()
        self._subs: list[tuple[str, int, Handler | DeferredHandler, bool]] = []  # filter, qos, handler, deferred
        self._sub_ids: dict[str, int] = {}  # filter -> MQTT 5 Subscription Identifier
        # handlers by Subscription Identifiers (MQTT 5) or topic (3.1.1): who gets a message, worked out once
        self._routes: dict[tuple[int, ...] | str, list[tuple[Handler | DeferredHandler, bool]]] = {}
        self._on_connect: list[Callable[[], None]] = []
        self._connack = threading.Event()
        self._refusal: Any = None
        self._closed_early = False  # the broker closed the connection before its CONNACK
        self._generation = 0  # connections made so far: an acknowledgement is for the connection it came on
        self._pending: set[int] = set()
        self._early: set[int] = set()
        self._subacks = threading.Condition()
        self._unacked_subs: set[int] = set()  # SUBSCRIBEs sent on (re)connect, not yet acknowledged

    # -- connection -----------------------------------------------------------------------------
    def connect(self, timeout_s: float = 10.0) -> None:
        """Connect (raises TransportError if unreachable or refused); then reconnects on its own."""
        if self._client is not None:
            raise TransportError(f"MQTT client {self.client_id!r} is already connected or connecting")
        key = (self.cfg.host, self.cfg.port)
        if self.cfg.protocol != "auto":
            versions = [self.cfg.protocol]
        else:
            with _DETECTED_LOCK:
                versions = [_DETECTED[key]] if key in _DETECTED else ["5", "3.1.1"]
        deadline = time.monotonic() + timeout_s
        problems: list[str] = []
        for i, version in enumerate(versions):
            last = i == len(versions) - 1
            wait = deadline - time.monotonic() if last else min(2.0, timeout_s / 3)
            outcome = self._attempt(version, max(wait, 0.1))
            if outcome is None:
                self.protocol = version
                if version != versions[0]:
                    with _DETECTED_LOCK:
                        _DETECTED[key] = version
                self._await_subacks(deadline)
                return
            problems.append(f"MQTT {version}: {outcome[1]}")
            if not outcome[0] or last:
                break
            _log.info("broker %s refused MQTT %s (%s); trying MQTT 3.1.1", self.cfg.url, version, outcome[1])
        why = "; ".join(problems)
        raise TransportError(f"cannot connect to MQTT broker {self.cfg.url} as {self.client_id!r}: {why}")

    def _await_subacks(self, deadline: float) -> None:
        """Return once the broker acknowledged the subscriptions made before connect: a message
        published right after ``connect()`` returns then reaches our handlers."""
        with self._subacks:
            done = self._subacks.wait_for(lambda: not self._unacked_subs, max(deadline - time.monotonic(), 0.1))
        if not done:
            _log.warning("%s: broker did not acknowledge every subscription in time", self.client_id)

    def _attempt(self, version: str, wait_s: float) -> tuple[bool, str] | None:
        """Connect with one protocol version: None on success, else (retry another version?, why)."""
        client = self._make_client(version)
        self._connack.clear()
        self._refusal = None
        self._closed_early = False
        props = None
        if version == "5":
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = self.session_expiry_s
        try:
            client.connect(
                self.cfg.host,
                self.cfg.port,
                keepalive=self.cfg.keepalive,
                clean_start=False if version == "5" else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
                properties=props,
            )
        except (OSError, ssl.SSLError) as exc:
            return False, f"broker unreachable: {exc}"
        self._client = client
        client.loop_start()
        got = self._connack.wait(wait_s)
        if got and self._refusal is None and not self._closed_early:
            return None
        self._teardown()
        if not got:
            return True, f"no CONNACK within {wait_s:.1f} s"
        if self._closed_early:
            return True, _CLOSED_EARLY
        code = getattr(self._refusal, "value", self._refusal)
        return code in _PROTOCOL_REFUSED, f"refused: {self._refusal} (code {code})"

    def _make_client(self, version: str) -> mqtt.Client:
        cfg = self.cfg
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv5 if version == "5" else mqtt.MQTTv311,
            clean_session=None if version == "5" else False,
            manual_ack=self.manual_ack,
        )
        client.username_pw_set(cfg.username or self.client_id, cfg.password)
        if cfg.tls:
            client.tls_set(
                ca_certs=cfg.ca_file,
                certfile=cfg.cert_file,
                keyfile=cfg.key_file,
                cert_reqs=ssl.CERT_NONE if cfg.insecure else ssl.CERT_REQUIRED,
            )
            client.tls_insecure_set(cfg.insecure)
        if self.will is not None:
            topic, payload, retain = self.will
            client.will_set(topic, payload, qos=1, retain=retain)
        client.reconnect_delay_set(min_delay=0.2, max_delay=5)  # type: ignore[arg-type]
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_publish = self._handle_publish
        client.on_subscribe = self._handle_subscribe
        return client

    def _teardown(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.disconnect()
            client.loop_stop()
        self.connected.clear()

    def close(self, flush_timeout_s: float = 5.0) -> None:
        """Wait (bounded) for outgoing QoS 1 messages, then disconnect cleanly: the will does NOT fire."""
        deadline = time.monotonic() + flush_timeout_s
        while self.connected.is_set() and time.monotonic() < deadline:
            with self._lock:
                if not self._pending:
                    break
            time.sleep(0.005)
        self._teardown()

    def add_on_connect(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` (in the network thread) after every successful (re)connect."""
        with self._lock:
            self._on_connect.append(callback)
        if self.connected.is_set():
            self._safe(callback)

    # -- pub/sub --------------------------------------------------------------------------------
    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        """Queue a message (thread-safe). While disconnected paho keeps it and sends it on reconnect."""
        client = self._client
        if client is None:
            raise TransportError(f"MQTT client {self.client_id!r}: publish before connect() or after close()")
        info = client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            raise TransportError(f"MQTT client {self.client_id!r}: outgoing queue full")
        if qos > 0:
            with self._lock:
                if info.mid in self._early:
                    self._early.discard(info.mid)
                else:
                    self._pending.add(info.mid)

    def subscribe(self, topic_filter: str, handler: Handler, *, qos: int = 1) -> None:
        """Register ``handler(topic, payload)``; the subscription survives reconnects."""
        self._subscribe(topic_filter, handler, qos, deferred=False)

    def subscribe_deferred(self, topic_filter: str, handler: DeferredHandler, *, qos: int = 1) -> None:
        """Register ``handler(topic, payload, ack)``: with ``manual_ack`` the message is acknowledged to the broker
        once ``ack()`` was called (from any thread, in delivery order) and the other handlers returned; without
        ``manual_ack`` paho acknowledged it on receipt and ``ack`` does nothing."""
        self._subscribe(topic_filter, handler, qos, deferred=True)

    def _subscribe(self, topic_filter: str, handler: Handler | DeferredHandler, qos: int, *, deferred: bool) -> None:
        with self._lock:
            self._subs.append((topic_filter, qos, handler, deferred))
            self._routes.clear()
            self._sub_ids.setdefault(topic_filter, len(self._sub_ids) + 1)
        client = self._client
        if client is not None and self.connected.is_set():
            self._send_subscribe(client, topic_filter, qos)

    def _send_subscribe(self, client: mqtt.Client, topic_filter: str, qos: int, on_connect: bool = False) -> None:
        props = None
        if self.protocol == "5" or client.protocol == mqtt.MQTTv5:
            # MQTT 5 delivers one copy per matching subscription: the Subscription Identifier on each
            # copy says which filter it came for, so overlapping filters do not double-dispatch.
            props = Properties(PacketTypes.SUBSCRIBE)  # type: ignore[no-untyped-call]
            props.SubscriptionIdentifier = self._sub_ids[topic_filter]
        _rc, mid = client.subscribe(topic_filter, qos=qos, properties=props)
        if on_connect and mid is not None:  # on the network thread: the SUBACK cannot overtake us
            with self._subacks:
                self._unacked_subs.add(mid)

    # -- paho callbacks (network thread) ------------------------------------------------------
    def _handle_connect(self, client: mqtt.Client, _u: Any, flags: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            self._refusal = reason
            self._connack.set()
            return
        self.connected.set()
        with self._lock:
            self._generation += 1
            filters = {f: q for f, q, _h, _d in self._subs}
            callbacks = list(self._on_connect)
        for topic_filter, qos in filters.items():
            self._send_subscribe(client, topic_filter, qos, on_connect=True)
        _log.debug("%s connected (session present: %s)", self.client_id, flags.session_present)
        self._connack.set()
        for cb in callbacks:
            self._safe(cb)

    def _handle_subscribe(self, _c: mqtt.Client, _u: Any, mid: int, _codes: Any, _p: Any) -> None:
        with self._subacks:
            self._unacked_subs.discard(mid)
            self._subacks.notify_all()

    def _handle_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if not self._connack.is_set():  # during connect(): closed instead of answering (RabbitMQ < 3.13 on MQTT 5)
            self._closed_early = True
            self._connack.set()
        if self.connected.is_set():
            _log.info("%s disconnected from %s: %s", self.client_id, self.cfg.url, reason)
        self.connected.clear()

    def _handle_publish(self, _c: mqtt.Client, _u: Any, mid: int, _r: Any, _p: Any) -> None:
        with self._lock:
            if mid in self._pending:
                self._pending.discard(mid)
            else:
                self._early.add(mid)

    def _handle_message(self, client: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        ids = getattr(msg.properties, "SubscriptionIdentifier", None) if msg.properties is not None else None
        key: tuple[int, ...] | str = tuple(ids) if ids else msg.topic
        with self._lock:
            handlers = self._routes.get(key)
            if handlers is None:
                if ids:  # MQTT 5: only the handlers of the filter(s) this copy was delivered for
                    wanted = {f for f, i in self._sub_ids.items() if i in ids}
                    matched = [(h, d) for f, _q, h, d in self._subs if f in wanted]
                else:
                    matched = [(h, d) for f, _q, h, d in self._subs if mqtt.topic_matches_sub(f, msg.topic)]
                handlers = list(dict.fromkeys(matched))  # one call per handler, however many of its filters match
                if len(self._routes) >= _MAX_ROUTES:
                    self._routes.clear()
                self._routes[key] = handlers
        deferred = sum(1 for _h, d in handlers if d)
        pending = _PendingAck(self, client, msg.mid, msg.qos, deferred + 1) if self.manual_ack else None
        payload = bytes(msg.payload)
        for handler, is_deferred in handlers:
            try:
                if is_deferred:
                    cast(DeferredHandler, handler)(msg.topic, payload, _NO_ACK if pending is None else pending.part())
                else:
                    cast(Handler, handler)(msg.topic, payload)
            except Exception:
                _log.exception("handler %r failed on a message on %s", handler, msg.topic)
        if pending is not None:
            # every plain handler returned (or raised, and was logged: a poison message must not loop forever)
            pending.part()()

    @staticmethod
    def _safe(callback: Callable[[], None]) -> None:
        try:
            callback()
        except Exception:
            _log.exception("on_connect callback %r failed", callback)


def _no_ack() -> None:
    """Acknowledgement of a message paho acknowledged on receipt already (no ``manual_ack``)."""


_NO_ACK: Final[AckFn] = _no_ack
