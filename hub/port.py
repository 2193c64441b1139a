"""What the hub's round drivers (plain rounds, SecAgg stages, selection and evaluation rounds, control requests)
may ask of the daemon: a narrow, public interface instead of reaching into its private state.

Every method runs on the daemon's worker thread.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from fedge.core.losses import Score
from fedge.core.rounds import OpenRound
from fedge.core.strategy import FleetView
from fedge.hub.config import HubConfig
from fedge.hub.registry import Registry
from fedge.hub.store import Store, VersionRow
from fedge.protocol.messages import RoundStatus
from fedge.protocol.topics import Topics

__all__ = ["HubPort", "RoundsPort"]


class HubPort(Protocol):
    """The daemon as its drivers see it."""

    @property
    def cfg(self) -> HubConfig: ...
    @property
    def topics(self) -> Topics: ...
    @property
    def store(self) -> Store: ...
    @property
    def registry(self) -> Registry: ...

    def clock(self) -> float:
        """Now (seconds since the epoch; tests pass their own clock)."""
        ...

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """Publish (signed when the hub signs; QoS 1)."""
        ...

    def publish_status(self) -> None:
        """The hub's retained status (online, open round, deployed version)."""
        ...

    def publish_model(self, row: VersionRow) -> None:
        """The retained model/head of ``row`` (and model/full when its backbone is new to the devices)."""
        ...

    def reply(self, request_id: str | None, rid: int | None, reason: str, detail: str) -> None:
        """Answer a control request on control/round/reply."""
        ...

    def candidates(self) -> set[str]:
        """Devices a round may select now: the allow-list, or the devices online."""
        ...

    def fleet_view(self) -> FleetView:
        """The candidates (less the excluded devices), their capabilities and reliability."""
        ...

    def online(self) -> set[str]:
        """Devices whose retained presence says online."""
        ...

    def current(self) -> VersionRow:
        """The deployed version (HubStateError if the registry is empty)."""
        ...

    def head_spec(self, backbone: str) -> dict[str, tuple[tuple[int, ...], str]]:
        """The head's array names, shapes and dtypes over ``backbone``."""
        ...

    def evaluate(self, backbone: str, head: Mapping[str, NDArray[np.float32]]) -> Score | None:
        """The head's score on the hub's held-out data (None without such data, or if scoring failed)."""
        ...

    def score_version(self, row: VersionRow) -> None:
        """Score a registered version on the held-out data and store the score."""
        ...

    def busy_round(self) -> int | None:
        """The id of the open round of any kind (None: the hub is idle)."""
        ...

    def continue_chain(self) -> None:
        """Start the next round of a ``chain_rounds`` chain, if one is left."""
        ...

    def end_chain(self) -> None:
        """No more rounds of the current chain."""
        ...

    def rounds_jsonl(self, record: dict[str, Any]) -> None:
        """Append one record to ``state_dir/rounds.jsonl``."""
        ...


class RoundsPort(Protocol):
    """The federated round driver as the SecAgg stages see it."""

    @property
    def round(self) -> OpenRound | None: ...

    def close(self, r: OpenRound) -> None:
        """Aggregate, gate, record and publish ``r``."""
        ...

    def end(self, r: OpenRound, status: RoundStatus, detail: str) -> None:
        """Close ``r`` without aggregating (no version)."""
        ...
