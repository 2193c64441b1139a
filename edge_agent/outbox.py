"""Updates published and not yet acknowledged: kept on disk, sent again byte for byte until acked or closed.

``state_dir/outbox/round-<id>.bin`` is written (atomically, 0600) before an update is published, so a crash
re-sends those exact bytes (same nonce: the hub counts it once), never a freshly noised update.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from fedge.protocol.codec import decode
from fedge.protocol.errors import FedgeError
from fedge.protocol.fsio import write_atomic
from fedge.protocol.messages import ModelUpdate

log = logging.getLogger("fedge.agent")

__all__ = ["Outbox", "nonce_of"]


def nonce_of(payload: bytes) -> str:
    """The nonce of an encoded update (FedgeError if it is not one)."""
    msg = decode(payload)
    if not isinstance(msg, ModelUpdate):
        raise FedgeError(f"the outbox holds a {msg.type}, not an update")
    return msg.nonce


class Outbox:
    """The unacknowledged updates of one agent (thread-safe)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._lock = threading.Lock()
        self._unacked: dict[int, tuple[str, bytes]] = {}  # round -> (nonce, payload)

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

    def settle(self, round_id: int, nonce: str | None) -> bool:
        """Forget the unacknowledged update of ``round_id`` (only if its nonce is ``nonce``, unless None)."""
        with self._lock:
            held = self._unacked.get(round_id)
            if held is None or (nonce is not None and held[0] != nonce):
                return False
            del self._unacked[round_id]
        self.path(round_id).unlink(missing_ok=True)
        return True

    def settle_up_to(self, round_id: int) -> list[int]:
        """Forget every unacknowledged update of a round at or below ``round_id`` (closed rounds)."""
        with self._lock:
            closed = [r for r in self._unacked if r <= round_id]
        return [r for r in closed if self.settle(r, None)]

    def resend(self, publish: Callable[[bytes], None], why: str) -> None:
        """Publish every unacknowledged update again, byte for byte."""
        with self._lock:
            pending = sorted(self._unacked.items())
        for rnd, (nonce, payload) in pending:
            log.info("round %d: update %s not acknowledged yet: sent again (%s)", rnd, nonce[:8], why)
            publish(payload)
