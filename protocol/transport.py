"""A two-method transport (publish, subscribe) and its in-memory twin for fast unit tests.

The MQTT implementation lives in ``protocol/transport_mqtt.py`` (the only file that imports paho).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from protocol.topics import topic_matches

Handler = Callable[[str, bytes], None]


class Transport(Protocol):
    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None: ...

    def subscribe(self, topic_filter: str, handler: Handler, *, qos: int = 1) -> None: ...


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
    broker: InMemoryBroker

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        self.broker.publish(topic, payload, retain)

    def subscribe(self, topic_filter: str, handler: Handler, *, qos: int = 1) -> None:
        self.broker.subscribe(topic_filter, handler)


__all__ = ["Handler", "InMemoryBroker", "InMemoryTransport", "Transport"]
