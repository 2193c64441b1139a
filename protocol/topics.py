"""The only place fedge topic strings are built or parsed (see PROTOCOL.md, "Topics")."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from fedge.protocol.errors import ConfigError

ROOT: Final = "fedge"
_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
RESERVED_IDS: Final = frozenset({"fedge-hub", "fedge-operator", "hub"})
"""Names that are never a device: the broker accounts of the hub and the operator (``fedge fleet init``; the ACL's
``%u`` device patterns match them too) and the hub's sender name in SecAgg stage messages. The hub treats a
device topic under one of them as having no device."""


def valid_id(value: str) -> bool:
    """Fleet and device ids: 1-64 characters of ``[A-Za-z0-9_-]``."""
    return bool(_ID.match(value))


def _check(kind: str, value: str) -> str:
    if not valid_id(value):
        raise ConfigError(kind, f"id {value!r} must be 1-64 characters of [A-Za-z0-9_-]")
    return value


@dataclass(frozen=True)
class Topics:
    """Topic names of one fleet."""

    fleet: str

    def __post_init__(self) -> None:
        _check("fleet", self.fleet)

    @property
    def base(self) -> str:
        return f"{ROOT}/{self.fleet}"

    @property
    def control_round_start(self) -> str:
        return f"{self.base}/control/round/start"

    @property
    def control_round_cancel(self) -> str:
        return f"{self.base}/control/round/cancel"

    @property
    def control_round_reply(self) -> str:
        return f"{self.base}/control/round/reply"

    @property
    def control_round_result(self) -> str:
        """The full result of every round, for operators only (``round/result`` names no cohort and counts no samples:
        every device reads it)."""
        return f"{self.base}/control/round/result"

    @property
    def control_round_select(self) -> str:
        """Ask the hub for a source-model selection round (plain JSON, PROTOCOL.md §5)."""
        return f"{self.base}/control/round/select"

    @property
    def select_announce(self) -> str:
        """The open selection round's announce (retained while it is open)."""
        return f"{self.base}/round/select"

    def candidate(self, name: str) -> str:
        """A candidate source model's full artifacts (retained while a selection round is open)."""
        return f"{self.base}/model/candidate/{_check('candidate', name)}"

    @property
    def candidate_all(self) -> str:
        return f"{self.base}/model/candidate/+"

    def select_report(self, device: str) -> str:
        return f"{self.base}/select/{_check('device', device)}"

    @property
    def select_report_all(self) -> str:
        return f"{self.base}/select/+"

    @property
    def announce(self) -> str:
        return f"{self.base}/round/announce"

    @property
    def result(self) -> str:
        return f"{self.base}/round/result"

    @property
    def model_head(self) -> str:
        return f"{self.base}/model/head"

    @property
    def model_full(self) -> str:
        return f"{self.base}/model/full"

    @property
    def hub_status(self) -> str:
        return f"{self.base}/hub/status"

    def update(self, device: str) -> str:
        return f"{self.base}/update/{_check('device', device)}"

    @property
    def update_all(self) -> str:
        return f"{self.base}/update/+"

    def decline(self, device: str) -> str:
        return f"{self.base}/decline/{_check('device', device)}"

    @property
    def decline_all(self) -> str:
        return f"{self.base}/decline/+"

    def secagg(self, device: str) -> str:
        """A device's SecAgg+ stage messages to the hub (PROTOCOL.md, "Secure aggregation")."""
        return f"{self.base}/secagg/{_check('device', device)}"

    @property
    def secagg_all(self) -> str:
        return f"{self.base}/secagg/+"

    def secagg_inbox(self, device: str) -> str:
        """The hub's SecAgg+ stage messages to one device (inside its inbox, signed like every hub frame)."""
        return f"{self.base}/device/{_check('device', device)}/secagg"

    def presence(self, device: str) -> str:
        return f"{self.base}/presence/{_check('device', device)}"

    @property
    def presence_all(self) -> str:
        return f"{self.base}/presence/+"

    def device_inbox(self, device: str) -> str:
        """Filter for everything the hub sends to one device (ack, reject)."""
        return f"{self.base}/device/{_check('device', device)}/+"

    def ack(self, device: str) -> str:
        return f"{self.base}/device/{_check('device', device)}/ack"

    def reject(self, device: str) -> str:
        return f"{self.base}/device/{_check('device', device)}/reject"

    def device_of(self, topic: str) -> str | None:
        """The device id in an ``update/<device>``, ``presence/<device>``, ``decline/<device>``,
        ``select/<device>`` or ``secagg/<device>`` topic, else None."""
        parts = topic.split("/")
        if len(parts) == 4 and parts[:2] == [ROOT, self.fleet] and parts[2] in ("update", "presence", "decline",
                                                                                 "select", "secagg"):
            return parts[3] if valid_id(parts[3]) and parts[3] not in RESERVED_IDS else None
        return None


def topic_matches(filter_: str, topic: str) -> bool:
    """MQTT topic-filter matching with ``+`` and ``#`` (for the in-memory transport)."""
    fparts, tparts = filter_.split("/"), topic.split("/")
    for i, f in enumerate(fparts):
        if f == "#":
            return True
        if i >= len(tparts) or (f != "+" and f != tparts[i]):
            return False
    return len(fparts) == len(tparts)


__all__ = ["RESERVED_IDS", "ROOT", "Topics", "topic_matches", "valid_id"]
