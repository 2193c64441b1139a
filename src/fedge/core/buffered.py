"""Buffered asynchronous aggregation (FedBuff, Nguyen et al. 2022), without I/O.

Devices train whenever they can, each on the latest version it holds; the hub folds every update into a buffer,
weighted by how stale it is, and makes a new version once ``k`` updates are in. An update trained on version ``b``
that arrives when the hub is at version ``v`` has staleness ``v - b`` and counts ``1 / sqrt(1 + staleness)``
(FedBuff's polynomial weighting), applied after the update was clipped to the norm bound. Each update is
norm-bounded and sample-weighted like a FedAvg round (the same
:class:`~fedge.core.aggregators.Aggregator`, so a buffered version has the same bounds and proximal pull as a
round's); updates older than ``max_staleness`` versions are refused by the hub (``stale_round``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedge.core.aggregators import Aggregator, Bounds
from fedge.protocol.types import Delta, Head, HeadLike, Shapes

__all__ = ["Buffer", "BufferChain", "BufferSettings", "staleness_weight"]


def staleness_weight(staleness: int) -> float:
    """FedBuff's polynomial staleness weight: ``1 / sqrt(1 + staleness)`` (1 for a fresh update)."""
    if staleness < 0:
        raise ValueError(f"staleness must be >= 0, got {staleness}")
    return 1.0 / math.sqrt(1.0 + staleness)


@dataclass(frozen=True)
class BufferSettings:
    """``k`` updates make a version; an update may be at most ``max_staleness`` versions old; ``server_lr``: the
    step from the current version toward the buffer's result (FedBuff's server learning rate)."""

    k: int = 10
    max_staleness: int = 10
    server_lr: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.server_lr <= 1:
            raise ValueError(f"server_lr must be in (0, 1], got {self.server_lr}")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {self.max_staleness}")

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> BufferSettings:
        """The settings as stored with a round's parameters (``dataclasses.asdict``)."""
        return cls(int(raw["k"]), int(raw["max_staleness"]), float(raw.get("server_lr", 1.0)))


class Buffer:
    """The updates of the version being built: ``add`` until :attr:`full`, then :meth:`result`."""

    def __init__(self, shapes: Shapes, settings: BufferSettings, proximal_lambda: float = 0.0,
                 bounds: Bounds | None = None, history: Sequence[float] = (), *,
                 aggregator: Aggregator | None = None) -> None:
        """``aggregator``: the (empty) aggregate to fold into (the hub's strategy's; default a bounded
        :class:`Aggregator` of ``shapes``, ``proximal_lambda``, ``bounds`` and ``history``)."""
        self.settings = settings
        self._agg = aggregator if aggregator is not None else Aggregator(shapes, proximal_lambda, bounds, history)
        self.staleness: list[int] = []

    @property
    def count(self) -> int:
        return self._agg.count

    @property
    def full(self) -> bool:
        return self._agg.count >= self.settings.k

    @property
    def norms(self) -> list[float]:
        return self._agg.norms

    @property
    def aggregator(self) -> Aggregator:
        """The aggregate the updates are folded into (its ``summary`` once :meth:`result` ran)."""
        return self._agg

    def add(self, delta: Delta, n_samples: int, staleness: int) -> None:
        """Fold one update in with its staleness weight (ValueError if it is too stale). The weight scales the
        update after the aggregator clipped it to the norm bound (a stale update clipped to the bound still counts
        less than a fresh one), and the norm recorded (the "auto" bound's history) is the update's own."""
        if staleness > self.settings.max_staleness:
            raise ValueError(f"an update {staleness} versions old; at most {self.settings.max_staleness}")
        self._agg.add({k: np.asarray(v, dtype=np.float32) for k, v in delta.items()}, n_samples,
                      weight=staleness_weight(staleness))
        self.staleness.append(staleness)

    def result(self, global_head: HeadLike, w0: HeadLike) -> Head:
        """The next version from the buffered updates (bounded, sample-weighted, pulled toward ``w0``), a
        ``server_lr`` step of the way from ``global_head``."""
        full = self._agg.result(global_head, w0)
        eta = np.float32(self.settings.server_lr)
        if eta == 1:
            return full
        return {k: np.asarray(global_head[k], np.float32) + eta * (v - np.asarray(global_head[k], np.float32))
                for k, v in full.items()}


@dataclass
class BufferChain:
    """A buffered round's versions on the wire (the hub's bookkeeping, without I/O): ``versions`` is the chain the
    round made so far (the version it opened on first, each deployed version it made after), ``sent`` the updates
    accepted that hold a slot, one per (device, model version), ``pending`` the devices whose update is in the buffer
    being filled (one per device: a version is made from ``k`` distinct devices' updates), and ``folded`` how many
    accepted updates went into full buffers (the rest are in the buffer being filled).

    A full buffer that deploys no version (the held-out gate holds it back, or it is not finite) spends its updates
    (:meth:`spend`): ``attempt`` (the round's ``buffer_attempt``) goes up, and the devices whose updates were in it
    get their (device, model version) slots back: each may send one new update on the same version. ``spent``
    remembers those updates (device, model version, nonce), so that one sent again is still a redelivery."""

    settings: BufferSettings
    versions: list[str]
    sent: dict[tuple[str, str], str] = field(default_factory=dict)  # (device, model version) -> nonce
    folded: int = 0
    made: list[str] = field(default_factory=list)  # versions the round registered (deployed or held back)
    norms: list[float] = field(default_factory=list)  # the folded updates' norms (the "auto" norm bound's history)
    pending: dict[str, str] = field(default_factory=dict)  # device -> model version of its update in the buffer
    attempt: int = 0  # full buffers of this round that deployed no version (never goes down within the round)
    spent: set[tuple[str, str, str]] = field(default_factory=set)  # (device, model version, nonce) of their updates

    @property
    def current(self) -> str:
        return self.versions[-1]

    def staleness(self, version: str) -> int | None:
        """How many versions ``version`` is behind the current one (None: not a version of this round's chain)."""
        for back, name in enumerate(reversed(self.versions)):
            if name == version:
                return back
        return None

    def redelivery(self, device: str, version: str, nonce: str) -> bool:
        """Whether this is an update the round accepted already (same device, version and nonce): acked again,
        however stale its version has become since, and whether or not a buffer that deployed nothing spent it."""
        return self.sent.get((device, version)) == nonce or (device, version, nonce) in self.spent

    def duplicate(self, device: str, version: str) -> str | None:
        """Why a new update (not a redelivery) from ``device`` on ``version`` is a duplicate (None: it is not)."""
        if (device, version) in self.sent:
            return f"device {device!r} already has an update from {version!r} in this round"
        held = self.pending.get(device)
        if held is not None:
            return (f"device {device!r} already has an update (from {held!r}) in the buffer of the next version: a "
                    f"version is made from {self.settings.k} distinct devices' updates, one each")
        return None

    def spend(self) -> list[str]:
        """The full buffer deployed no version: its updates are spent (remembered for redeliveries), their devices'
        slots on those versions released, ``pending`` emptied (the next buffer starts empty) and ``attempt`` goes
        up. Returns the devices released, sorted."""
        released = sorted(self.pending)
        for device, version in self.pending.items():
            nonce = self.sent.pop((device, version), None)
            if nonce is not None:
                self.spent.add((device, version, nonce))
        self.pending.clear()
        self.attempt += 1
        return released

    def why_not(self, version: str) -> str | None:
        """Why an update trained on ``version`` does not count (None: it does)."""
        s = self.staleness(version)
        if s is None:
            return f"update from {version!r}, which this buffered round never announced (it trains {self.current!r})"
        if s > self.settings.max_staleness:
            return (f"update from {version!r}, {s} versions behind the current {self.current!r}; a buffered round "
                    f"counts updates at most {self.settings.max_staleness} versions old")
        return None

    def to_meta(self) -> dict[str, Any]:
        """What a restart needs besides the stored updates (the hub keeps it in its store's meta)."""
        return {"versions": self.versions, "made": self.made, "folded": self.folded, "attempt": self.attempt,
                "spent": sorted([d, v, n] for d, v, n in self.spent)}

    @classmethod
    def from_meta(cls, settings: BufferSettings, raw: Mapping[str, Any], opened_on: str) -> BufferChain:
        """The chain :meth:`to_meta` saved (``raw`` empty: the round made no version yet, it is on ``opened_on``);
        ``sent`` and ``pending`` come from the stored updates (a hub before ``attempt`` saved neither it nor
        ``spent``: 0 and none)."""
        return cls(settings, [str(v) for v in raw.get("versions", [opened_on])], folded=int(raw.get("folded", 0)),
                   made=[str(v) for v in raw.get("made", [])], attempt=int(raw.get("attempt", 0)),
                   spent={(str(d), str(v), str(n)) for d, v, n in raw.get("spent", [])})
