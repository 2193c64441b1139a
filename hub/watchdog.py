"""The hub watches its own broadcast topics for frames it did not publish (PROTOCOL.md, "Signatures").

Broker ACLs keep other accounts off ``model/full``, ``model/head``, ``round/announce``, ``round/result``,
``round/select`` and ``model/candidate/+``; an account that has write access anyway (a leaked password, a
mis-written ACL) can still publish there. Signed devices refuse such frames, and this module lets the hub
notice them too: the hub subscribes to those topics and :meth:`Watchdog.check` tells its own frames from
anyone else's:

- the hub's own: bytes it published on that topic recently (``sent``; the broker echoes every publish
  back to the hub, and re-sends retained copies on every re-subscribe), or, when the hub signs, a frame that
  verifies under its key on that topic (a retained copy from an earlier run of the hub);
- stale, ignored: anything on a topic before the hub has seen its own echo there (the broker's retained copy
  from before this hub started) when it cannot be checked: without a signing key, or signed by one of the
  hub's own retired keys (``hub-key-rotation-<n>.bin`` beside the key);
- anyone else's: every other frame, empty payloads (a retained clear) included. The same bytes on the same
  topic are reported once (a forged retained frame comes again on every re-subscribe).

The watchdog never publishes: what it reports cannot make the hub answer, so nothing can loop.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final

from fedge.hub.store import Store
from fedge.protocol.codec import SIG_FIELD, SIGNATURE_BYTES, frame_header
from fedge.protocol.errors import FedgeError
from fedge.protocol.messages import RejectReason
from fedge.protocol.signing import SignatureError, key_id, load_private_key, rotation_files, verify_frame
from fedge.protocol.topics import Topics, topic_matches

log = logging.getLogger("fedge.hub.watchdog")

RECENT: Final = 8
"""Digests of the hub's last publishes kept per topic (an echo can arrive after a later publish)."""


def broadcast_filters(topics: Topics) -> tuple[str, ...]:
    """The topics only the hub publishes on and devices act on."""
    return (topics.model_full, topics.model_head, topics.announce, topics.result, topics.select_announce,
            topics.candidate_all)


def retired_key_ids(rotations: Iterable[bytes]) -> frozenset[str]:
    """The ``old_key`` of every key rotation payload (the hub's earlier keys); unreadable ones are skipped."""
    out: set[str] = set()
    for payload in rotations:
        try:
            obj = json.loads(payload[:-SIGNATURE_BYTES].decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(obj, dict) and isinstance(obj.get("old_key"), str):
            out.add(obj["old_key"])
    return frozenset(out)


def hub_watchdog(topics: Topics, signing_key: Path | None) -> Watchdog:
    """The watchdog of a hub signing with the private key in ``signing_key`` (None: a hub that does not sign);
    its retired keys come from the rotation files beside it. The hub has loaded (and checked) the key already."""
    if signing_key is None:
        return Watchdog(topics)
    public = load_private_key(signing_key).public_key()
    retired = retired_key_ids(payload for _seq, payload in rotation_files(signing_key.parent))
    return Watchdog(topics, public, key_id(public), retired)


class Watchdog:
    """Tells the hub's own frames on its broadcast topics from anyone else's (see the module docstring).

    ``public_key``: the hub's signing key's public half (None: the hub does not sign, bytes are compared);
    ``key_id`` its id; ``retired``: ids of the hub's earlier keys. Not thread-safe: the hub calls it on its
    worker thread only."""

    def __init__(self, topics: Topics, public_key: Any = None, key_id: str | None = None,
                 retired: frozenset[str] = frozenset()) -> None:
        self.topics = topics
        self.filters = broadcast_filters(topics)
        self._exact = frozenset(f for f in self.filters if "+" not in f and "#" not in f)
        self._wild = tuple(f for f in self.filters if f not in self._exact)
        self._watched: dict[str, bool] = {}
        self._keys: dict[str, Any] = {} if public_key is None or key_id is None else {key_id: public_key}
        self._retired = retired
        self._sent: dict[str, deque[bytes]] = {}
        self._synced: set[str] = set()
        self._reported: dict[str, bytes] = {}

    def watches(self, topic: str) -> bool:
        # every publish of the hub asks (an ack per update): remembered per topic (the hub publishes on a few per
        # device), the exact ones known at once
        known = self._watched.get(topic)
        if known is None:
            known = self._watched[topic] = topic in self._exact or any(topic_matches(f, topic) for f in self._wild)
        return known

    def sent(self, topic: str, payload: bytes) -> None:
        """The hub is publishing ``payload`` (as it goes on the wire, signed) on ``topic``."""
        if self.watches(topic):
            self._sent.setdefault(topic, deque(maxlen=RECENT)).append(hashlib.sha256(payload).digest())

    def observe(self, topic: str, payload: bytes, store: Store) -> None:
        """Check a frame seen on a broadcast topic; one not the hub's is logged and counted as an
        ``impersonation`` reject (no round, the topic in place of the device)."""
        problem = self.check(topic, payload)
        if problem is not None:
            log.warning("a message on %s was not published by this hub: %s", topic, problem)
            store.add_reject(None, topic, str(RejectReason.IMPERSONATION), f"{topic}: {problem}")

    def check(self, topic: str, payload: bytes) -> str | None:
        """None when ``payload`` on ``topic`` is the hub's own (or a stale copy that cannot be told); else why
        it is not (once per distinct forged payload and topic)."""
        digest = hashlib.sha256(payload).digest()
        if digest in self._sent.get(topic, ()):
            self._synced.add(topic)
            self._reported.pop(topic, None)
            return None
        problem = self._problem(topic, payload)
        if problem is None or self._reported.get(topic) == digest:
            return None
        self._reported[topic] = digest
        return problem

    def _problem(self, topic: str, payload: bytes) -> str | None:
        synced = topic in self._synced
        if not payload:
            return "an empty retained payload (it clears the hub's retained message)" if synced else None
        if not self._keys:
            return f"{len(payload)} bytes the hub did not publish" if synced else None
        try:
            verify_frame(payload, self.topics.fleet, topic, self._keys)
        except SignatureError as exc:
            if not synced and exc.reason == "unknown_key" and self._signer_of(payload) in self._retired:
                return None  # the hub's own frame from before a key rotation, still retained
            return f"not signed by the hub: {exc.reason} ({exc.detail})"
        return None

    @staticmethod
    def _signer_of(payload: bytes) -> object:
        try:
            return frame_header(payload)[0].get(SIG_FIELD)
        except FedgeError:
            return None


__all__ = ["RECENT", "Watchdog", "broadcast_filters", "hub_watchdog", "retired_key_ids"]
