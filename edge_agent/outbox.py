"""Updates published and not yet acknowledged: kept on disk, sent again byte for byte until acked or closed.

``state_dir/outbox/round-<id>.bin`` is written (atomically, 0600) before an update is published, so a crash
re-sends those exact bytes (same nonce: the hub counts it once), never a freshly noised update.

The outbox records when each update was last sent: a resend may skip updates sent less than ``min_age_s`` ago
(the hub publishes its status whenever a round opens or closes, often a millisecond after the very update that
closed it; sending that update again then only earns a reject for the closed round). It also remembers the nonces
the hub acknowledged, so that a reject of a late copy of an acknowledged update can be told from a real refusal.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from fedge.protocol.codec import decode
from fedge.protocol.errors import FedgeError
from fedge.protocol.fsio import write_atomic
from fedge.protocol.messages import ModelUpdate

log = logging.getLogger("fedge.agent")

__all__ = ["FRESH_S", "Outbox", "nonce_of"]

FRESH_S = 5.0
"""An update sent less than this many seconds ago is not sent again on a hub-status message (the hub answers it
anyway, or the agent's later retries send it: on reconnect and every RETRY_S)."""
ACKED_KEPT = 64
"""Acknowledged (round, nonce) pairs remembered (to log a late reject of a resent copy as what it is)."""


def nonce_of(payload: bytes) -> str:
    """The nonce of an encoded update (FedgeError if it is not one)."""
    msg = decode(payload)
    if not isinstance(msg, ModelUpdate):
        raise FedgeError(f"the outbox holds a {msg.type}, not an update")
    return msg.nonce


class Outbox:
    """The unacknowledged updates of one agent (thread-safe)."""

    def __init__(self, folder: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.folder = folder
        self.clock = clock
        self._lock = threading.Lock()
        self._unacked: dict[int, tuple[str, bytes]] = {}  # round -> (nonce, payload)
        self._sent: dict[int, float] = {}  # round -> when its update was last sent (clock); none: before a restart
        self._acked: OrderedDict[tuple[int, str], None] = OrderedDict()

    def path(self, round_id: int) -> Path:
        return self.folder / f"round-{round_id}.bin"

    def load(self) -> None:
        """Updates published before a restart and never acknowledged: sent again until acked or closed."""
        for path in sorted(self.folder.glob("round-*.bin")):
            try:
                rnd = int(path.stem.removeprefix("round-"))
                payload = path.read_bytes()
                msg = decode(payload)
            except (ValueError, FedgeError, OSError) as exc:
                log.warning("dropping unreadable outbox file %s: %s", path, exc)
                path.unlink(missing_ok=True)
                continue
            if isinstance(msg, ModelUpdate) and msg.round == rnd:
                with self._lock:
                    self._unacked[rnd] = (msg.nonce, payload)

    def kept(self, round_id: int) -> bytes | None:
        """The update of ``round_id`` written before a crash (None: none)."""
        path = self.path(round_id)
        return path.read_bytes() if path.is_file() else None

    def record(self, round_id: int, payload: bytes) -> None:
        """Keep ``payload`` (durably) as the unacknowledged update of ``round_id``; call before publishing it."""
        write_atomic(self.path(round_id), payload)
        with self._lock:
            self._unacked[round_id] = (nonce_of(payload), payload)
            self._sent[round_id] = self.clock()

    def settle(self, round_id: int, nonce: str | None) -> bool:
        """Forget the unacknowledged update of ``round_id`` (only if its nonce is ``nonce``, unless None)."""
        with self._lock:
            held = self._unacked.get(round_id)
            if held is None or (nonce is not None and held[0] != nonce):
                return False
            del self._unacked[round_id]
            self._sent.pop(round_id, None)
            if nonce is not None:
                self._acked[(round_id, nonce)] = None
                while len(self._acked) > ACKED_KEPT:
                    self._acked.popitem(last=False)
        self.path(round_id).unlink(missing_ok=True)
        return True

    def was_acked(self, round_id: int, nonce: str) -> bool:
        """Whether the hub acknowledged update ``nonce`` of ``round_id`` (settled by its ack)."""
        with self._lock:
            return (round_id, nonce) in self._acked

    def settle_up_to(self, round_id: int) -> list[int]:
        """Forget every unacknowledged update of a round at or below ``round_id`` (closed rounds)."""
        with self._lock:
            closed = [r for r in self._unacked if r <= round_id]
        return [r for r in closed if self.settle(r, None)]

    def resend(self, publish: Callable[[bytes], None], why: str, min_age_s: float = 0.0) -> None:
        """Publish every unacknowledged update again, byte for byte; with ``min_age_s``, only those last sent at
        least that many seconds ago (or before a restart)."""
        with self._lock:
            now = self.clock()
            pending = sorted((rnd, held) for rnd, held in self._unacked.items()
                             if rnd not in self._sent or now - self._sent[rnd] >= min_age_s)
            for rnd, _ in pending:
                self._sent[rnd] = now
        for rnd, (nonce, payload) in pending:
            log.info("round %d: update %s not acknowledged yet: sent again (%s)", rnd, nonce[:8], why)
            publish(payload)
