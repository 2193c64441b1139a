"""What the agent accepts from the hub: pinned signing keys, rounds and versions that only move forward.

``HubTrust.check(topic, payload, msg)`` returns None (act on it) or the reason to refuse. With
``hub_public_key`` set in agent.toml every frame on a hub topic (``model/full``, ``model/head``,
``round/announce``, ``round/result``, ``round/select``, ``model/candidate/<name>``, the device's inbox) must be
signed by the pinned key (or one it rotated to, see PROTOCOL.md, "Signatures"), and round ids and model
versions per topic never go backward. Without a key only the round-id bound applies: a round id more than
``MAX_ROUND_JUMP`` beyond the highest one this device has seen is refused.

State lives in ``state_dir/trust.json`` (0600): the keys rotated to, the highest round per topic and model
version seen, and counters of refused messages by reason (the agent's status of refusals).
"""

from __future__ import annotations

import json
import logging
import re
import threading
from pathlib import Path
from typing import Any, Final

from fedge.protocol.fsio import write_atomic
from fedge.protocol.messages import ModelHead, RoundAnnounce, RoundResult
from fedge.protocol.signing import (
    SignatureError,
    key_id,
    load_public_key,
    public_key_from_raw,
    raw_public_key,
    verify_frame,
    verify_rotation,
)
from fedge.protocol.topics import Topics

log = logging.getLogger("fedge.agent")
MAX_ROUND_JUMP: Final = 10**6
"""A round id more than this beyond the highest seen (announce, selection or result) is refused."""
_VERSION_NUMBER: Final = re.compile(r"^v(\d{1,18})$")

__all__ = ["MAX_ROUND_JUMP", "HubTrust"]


class HubTrust:
    """The agent's checks on the hub's frames (signatures, forward-only rounds and versions); thread-safe."""

    def __init__(self, state_dir: Path, topics: Topics, hub_public_key: Path | None,
                 last_completed_round: int = 0) -> None:
        self.path = state_dir / "trust.json"
        self.topics = topics
        self._lock = threading.Lock()
        state: dict[str, Any] = {}
        if self.path.is_file():
            state = json.loads(self.path.read_text())
        self.rounds: dict[str, int] = {str(k): int(v) for k, v in state.get("rounds", {}).items()}
        self.head_version: int = int(state.get("head_version", -1))
        self.refused: dict[str, int] = {str(k): int(v) for k, v in state.get("refused", {}).items()}
        self.rotation_seq: int = int(state.get("rotation_seq", 0))
        self.floor = last_completed_round
        self.keys: dict[str, Any] = {}
        self._pinned: str | None = None
        self._pending_rotations: dict[int, bytes] = {}
        if hub_public_key is not None:
            pinned = load_public_key(hub_public_key)
            self._pinned = key_id(pinned)
            if state.get("pinned") == self._pinned and state.get("keys"):  # rotations since provisioning
                self.keys = {k: public_key_from_raw(bytes.fromhex(v)) for k, v in state["keys"].items()}
            else:  # first start, or a new key provisioned: trust exactly it
                self.keys = {self._pinned: pinned}
                self.rotation_seq = 0

    @property
    def signing_required(self) -> bool:
        return self._pinned is not None

    def _save(self) -> None:
        state = {"pinned": self._pinned, "keys": {k: raw_public_key(v).hex() for k, v in self.keys.items()},
                 "rotation_seq": self.rotation_seq, "rounds": self.rounds, "head_version": self.head_version,
                 "refused": self.refused}
        write_atomic(self.path, json.dumps(state, sort_keys=True, indent=1).encode())

    def _refuse(self, reason: str, topic: str, detail: str) -> str:
        self.refused[reason] = self.refused.get(reason, 0) + 1
        self._save()
        log.warning("refused a message on %s: %s (%s); %d refused so far", topic, reason, detail,
                    sum(self.refused.values()))
        return reason

    def _signed_topic(self, topic: str) -> bool:
        t = self.topics
        return topic != t.hub_status  # hub/status only makes the agent resend its pending update

    def check(self, topic: str, payload: bytes, msg: Any) -> str | None:
        """None if the agent may act on ``msg`` (decoded from ``payload`` received on ``topic``); else the
        reason it is refused (logged and counted)."""
        with self._lock:
            if self.signing_required and self._signed_topic(topic):
                try:
                    verify_frame(payload, self.topics.fleet, topic, self.keys)
                except SignatureError as exc:
                    return self._refuse(exc.reason, topic, exc.detail)
            if isinstance(msg, RoundAnnounce | RoundResult):
                highest = max([self.floor, *self.rounds.values()])
                if msg.round > highest + MAX_ROUND_JUMP:
                    return self._refuse("round_too_far", topic, f"round {msg.round} is more than {MAX_ROUND_JUMP} "
                                        f"beyond the highest seen ({highest})")
                seen = self.rounds.get(topic, -1)
                if self.signing_required and msg.round < seen:
                    return self._refuse("replayed", topic, f"round {msg.round} is older than round {seen} seen here")
                if msg.round > seen:
                    self.rounds[topic] = msg.round
                    self._save()
            elif isinstance(msg, ModelHead) and topic == self.topics.model_head and self.signing_required:
                m = _VERSION_NUMBER.match(msg.version)
                if m is None:
                    return self._refuse("replayed", topic, f"model version {msg.version!r} is not orderable (v<N>)")
                number = int(m.group(1))
                if number < self.head_version:
                    return self._refuse("replayed", topic, f"model {msg.version} is older than v{self.head_version} "
                                        "seen here")
                if number > self.head_version:
                    self.head_version = number
                    self._save()
            return None

    def on_rotation(self, topic: str, payload: bytes) -> None:
        """A key rotation (``hub/key/<seq>``, retained): trust the new key if a trusted key signed it. Rotations
        may arrive in any order; they apply in sequence order, each one after the last applied. One signed by a key
        this device never trusted (older than the key it was provisioned with, or forged) is ignored."""
        if not self.signing_required or not payload:
            return
        with self._lock:
            try:
                seq = int(topic.rsplit("/", 1)[-1])
            except ValueError:
                self._refuse("malformed", topic, "rotation topic does not end in a sequence number")
                return
            if seq <= self.rotation_seq:
                return  # applied before, or older than the key this device holds
            self._pending_rotations[seq] = payload
            progress = True
            while progress:
                progress = False
                for n in sorted(k for k in self._pending_rotations if k > self.rotation_seq):
                    try:
                        rot, new = verify_rotation(self._pending_rotations[n], self.topics.fleet, self.keys)
                    except SignatureError as exc:
                        if exc.reason != "unknown_key":
                            del self._pending_rotations[n]
                            self._refuse(exc.reason, topic, f"key rotation {n}: {exc.detail}")
                        log.info("key rotation %d not applied (yet): %s", n, exc.detail)
                        continue  # unknown key: perhaps a rotation still to come vouches for it
                    del self._pending_rotations[n]
                    if rot.seq != n:
                        self._refuse("malformed", topic, f"key rotation numbered {rot.seq} on topic {n}")
                        continue
                    self.keys = {rot.new_key: new}  # the old key is retired
                    self.rotation_seq = rot.seq
                    self._save()
                    log.info("hub signing key rotated to %s (rotation %d)", rot.new_key, rot.seq)
                    progress = True
                    break
