"""A two-method transport (publish, subscribe) and its in-memory twin for fast unit tests.

The MQTT implementation lives in ``protocol/transport_mqtt.py`` (the only file that imports paho).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from fedge.protocol.topics import topic_matches

Handler = Callable[[str, bytes], None]
AckFn = Callable[[], None]
"""Acknowledges one delivered message to the broker (idempotent; callable from any thread)."""
DeferredHandler = Callable[[str, bytes, AckFn], None]
"""A handler that acknowledges the message itself, later (see :class:`DeferredAcks`)."""


class Transport(Protocol):
    """What hub and agent need from a message bus: QoS 1 publish (optionally retained) and subscribe.

    Implementations guarantee that a handler is called once per delivered message with the exact topic and
    payload bytes; with MQTT (QoS 1) a message may be delivered more than once, so handlers are idempotent.
    Retained messages matching a new subscription are delivered to it; an empty retained payload clears.
    """

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None: ...

    def subscribe(self, topic_filter: str, handler: Handler, *, qos: int = 1) -> None: ...


@runtime_checkable
class DeferredAcks(Protocol):
    """A transport whose handlers may acknowledge a message after they return (MQTT with ``manual_ack``).

    ``subscribe_deferred``'s handler gets an ``ack`` to call once the message's effect is durable (from any thread);
    the broker then stops redelivering it. Until then the handler has returned, so the transport reads the next
    messages meanwhile: a consumer can commit many messages at once and acknowledge them together (the hub's group
    commit). Acknowledgements must come in delivery order (MQTT 3.1.1 4.6).
    """

    def subscribe_deferred(self, topic_filter: str, handler: DeferredHandler, *, qos: int = 1) -> None: ...


@dataclass
class InMemoryBroker:
    """Delivers synchronously to matching subscribers; keeps retained messages (empty payload clears)."""

    retained: dict[str, bytes] = field(default_factory=dict)
    subscribers: list[tuple[str, Handler]] = field(default_factory=list)
    lock: threading.RLock = field(default_factory=threading.RLock)

    def publish(self, topic: str, payload: bytes, retain: bool) -> None:
        with self.lock:
            if retain:
                if payload:
                    self.retained[topic] = payload
                else:
                    self.retained.pop(topic, None)
            targets = [h for f, h in self.subscribers if topic_matches(f, topic)]
        for handler in targets:
            handler(topic, payload)

    def subscribe(self, topic_filter: str, handler: Handler) -> None:
        with self.lock:
            self.subscribers.append((topic_filter, handler))
            backlog = [(t, p) for t, p in self.retained.items() if topic_matches(topic_filter, t)]
        for topic, payload in backlog:
            handler(topic, payload)


@dataclass
class InMemoryTransport:
    """A :class:`Transport` on an :class:`InMemoryBroker`: synchronous, in-process, for fast unit tests only."""

    broker: InMemoryBroker

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        self.broker.publish(topic, payload, retain)

    def subscribe(self, topic_filter: str, handler: Handler, *, qos: int = 1) -> None:
        self.broker.subscribe(topic_filter, handler)


__all__ = ["AckFn", "DeferredAcks", "DeferredHandler", "Handler", "InMemoryBroker", "InMemoryTransport", "Transport"]
