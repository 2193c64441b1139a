"""Round bookkeeping without I/O: parameters, device selection, the open round, when to close.

The daemon owns one :class:`OpenRound` at a time; everything here is a pure function of its
inputs (the clock is passed in), so it is tested without a broker.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from functools import cached_property
from typing import Any, Final, Protocol

import numpy as np

from fedge.core.aggregators import Aggregator
from fedge.core.buffered import Buffer, BufferChain, BufferSettings
from fedge.core.privacy import DpParams
from fedge.core.secagg_round import SecAggCoordinator, SecAggPlan
from fedge.core.stragglers import round_target, straggler_grace
from fedge.protocol.messages import RoundAnnounce, RoundOverrides


class RoundDefaults(Protocol):
    """The configured defaults of a round (``[rounds]`` of hub.toml)."""

    @property
    def min_devices(self) -> int: ...
    @property
    def deadline_s(self) -> float: ...
    @property
    def fraction(self) -> float: ...
    @property
    def local_epochs(self) -> int: ...
    @property
    def lr(self) -> float: ...
    @property
    def compression(self) -> str: ...
    @property
    def mode(self) -> str: ...
    @property
    def buffer_k(self) -> int: ...
    @property
    def max_staleness(self) -> int: ...
    @property
    def server_lr(self) -> float: ...
    @property
    def max_versions(self) -> int: ...


class Limits(Protocol):
    """The operator's ceilings on round overrides (``[limits]`` of hub.toml)."""

    def excess(self, name: str, value: Any) -> str | None: ...


@dataclass(frozen=True)
class RoundParams:
    """A round's hyper-parameters; under DP also its DP parameters and the DP-FedAvg denominator
    (``expected_cohort`` = q × eligible devices)."""

    min_devices: int
    deadline_s: float
    fraction: float
    local_epochs: int
    lr: float
    dp: DpParams | None = None
    expected_cohort: float = 0.0
    secagg: SecAggPlan | None = None  # a secure-aggregation round's public setup
    target: int = 0  # the round closes once this many valid updates arrived (0: it waits for every selected device)
    compression: str | None = None  # compressed updates ("int8" | "int4"; core/compress.py)
    buffer: BufferSettings | None = None  # a buffered (asynchronous) round: a version every buffer.k updates
    max_versions: int = 0  # a buffered round closes once it made this many versions (0: at its deadline)

    @classmethod
    def make(cls, defaults: RoundDefaults, overrides: RoundOverrides | None = None) -> RoundParams:
        o = overrides or RoundOverrides()
        return cls(
            min_devices=o.min_devices if o.min_devices is not None else defaults.min_devices,
            deadline_s=float(o.deadline_s if o.deadline_s is not None else defaults.deadline_s),
            fraction=float(o.fraction if o.fraction is not None else defaults.fraction),
            local_epochs=o.local_epochs if o.local_epochs is not None else defaults.local_epochs,
            lr=float(o.lr if o.lr is not None else defaults.lr),
            compression=None if defaults.compression == "off" else defaults.compression,
            buffer=(BufferSettings(defaults.buffer_k, defaults.max_staleness, defaults.server_lr)
                    if defaults.mode == "buffered" else None),
            max_versions=defaults.max_versions if defaults.mode == "buffered" else 0,
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("dp", "secagg", "compression", "buffer"):
            if out[key] is None:
                out.pop(key)
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RoundParams:
        dp, sa, buf = raw.get("dp"), raw.get("secagg"), raw.get("buffer")
        return cls(int(raw["min_devices"]), float(raw["deadline_s"]), float(raw["fraction"]),
                   int(raw["local_epochs"]), float(raw["lr"]), None if dp is None else DpParams(**dp),
                   float(raw.get("expected_cohort", 0.0)), None if sa is None else SecAggPlan.from_dict(sa),
                   int(raw.get("target", 0)), raw.get("compression"),
                   None if buf is None else BufferSettings.from_dict(buf), int(raw.get("max_versions", 0)))


UNBOUNDED_OVERRIDES: Final = frozenset({"fraction", "request_id"})
"""RoundOverrides fields without a ``[limits]`` entry: fraction is bounded to (0, 1] by the decoder, request_id is
not a round parameter. Every other field needs a ``limits.max_<field>`` (tests check that)."""


def over_limits(overrides: RoundOverrides, limits: Limits) -> str | None:
    """Why a control request asks for more than ``[limits]`` allows ("; "-joined), or None if it is within them."""
    problems = []
    for f in fields(overrides):
        value = getattr(overrides, f.name)
        if f.name in UNBOUNDED_OVERRIDES or value is None:
            continue
        why = limits.excess(f.name, value)
        if why is not None:
            problems.append(why)
    return "; ".join(problems) or None


def poisson_select(eligible: Iterable[str], sample_rate: float, seed: int | np.random.Generator,
                   round_id: int = 0) -> tuple[str, ...]:
    """Poisson sampling: each eligible device is selected independently with probability ``sample_rate``; the
    cohort size is random, which is what the DP accountant assumes. ``seed`` is a Generator (the hub passes one
    seeded by the operating system, so nobody can predict the cohort) or an int (reproducible, with the round)."""
    pool = sorted(set(eligible))
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng([seed, round_id, 1])
    draws = rng.random(len(pool))
    return tuple(d for d, u in zip(pool, draws, strict=True) if u < sample_rate)


def select_devices(
    known: Iterable[str], fraction: float, min_devices: int, seed: int, round_id: int,
    weights: Mapping[str, float] | None = None,
) -> tuple[str, ...]:
    """Sample ``ceil(fraction·n)`` (at least min_devices, at most n) known devices with Generator((seed, round)),
    each with probability proportional to its weight when ``weights`` are given and differ (a device without one
    weighs 1, a new device's reliability: :func:`fedge.core.conduct.reliability`; equal weights draw exactly the
    unweighted sample)."""
    pool = sorted(set(known))
    if not pool:
        return ()
    k = min(len(pool), max(math.ceil(fraction * len(pool)), min_devices, 1))
    rng = np.random.default_rng([seed, round_id])
    p = None
    if weights is not None and k < len(pool):
        w = np.asarray([max(float(weights.get(d, 1.0)), 1e-6) for d in pool], dtype=np.float64)
        if np.ptp(w) > 0:
            p = w / w.sum()
    picked = rng.choice(len(pool), size=k, replace=False, p=p)
    return tuple(sorted(pool[int(i)] for i in picked))


@dataclass
class OpenRound:
    """The one round in progress: what was announced, who answered, the running aggregate."""

    id: int
    model_version: str
    backbone_sha256: str
    params: RoundParams
    selected: tuple[str, ...]
    opened_at: float
    deadline: float
    aggregator: Aggregator
    accepted: dict[str, str] = field(default_factory=dict)  # device -> nonce
    declined: dict[str, str] = field(default_factory=dict)  # device -> DeclineReason
    n_samples: int = 0
    rejected: int = 0
    offline: dict[str, float] = field(default_factory=dict)  # selected, not answered, last will seen -> when
    offline_grace_s: float = 0.0  # how long a device must stay offline to count as failed
    secagg: SecAggCoordinator | None = None  # a secure-aggregation round's stages (None after a hub restart)
    target_at: float | None = None  # when the round's target of valid updates was reached
    chain: BufferChain | None = None  # a buffered round's versions and accepted updates (None: a synchronous round)
    buffer: Buffer | None = None  # a buffered round's next version, being filled

    def __post_init__(self) -> None:
        if self.params.buffer is not None and self.chain is None:
            self.chain = BufferChain(self.params.buffer, [self.model_version])

    @cached_property
    def selected_set(self) -> frozenset[str]:
        """``selected`` as a set (membership in O(1): a round may select thousands of devices)."""
        return frozenset(self.selected)

    def gone(self, now: float) -> set[str]:
        """Selected devices expected no more: declined, or offline past the grace."""
        return set(self.declined) | self.failed_offline(now)

    def went_offline(self, device: str, now: float) -> bool:
        """A selected device that has not answered went offline: it counts as failed once it stayed offline
        ``offline_grace_s`` (True if it is now awaited no more, or will not be after the grace)."""
        if device not in self.selected_set or device in self.accepted or device in self.declined:
            return False
        self.offline.setdefault(device, now)
        return True

    def failed_offline(self, now: float) -> set[str]:
        """Selected devices offline for at least the grace period without answering."""
        return {d for d, since in self.offline.items() if now - since >= self.offline_grace_s}

    def announce(self, fleet: str) -> RoundAnnounce:
        dp = self.params.dp
        msg = RoundAnnounce(
            fleet=fleet, round=self.id, model_version=self.model_version, backbone_sha256=self.backbone_sha256,
            deadline=self.deadline, min_devices=self.params.min_devices, selected=self.selected,
            local_epochs=self.params.local_epochs, lr=self.params.lr,
            dp_mode=None if dp is None else dp.mode,
            dp_noise_multiplier=None if dp is None else dp.noise_multiplier,
            dp_clip=None if dp is None else dp.clip,
            dp_sample_rate=None if dp is None else dp.sample_rate,
            dp_min_cohort=None if dp is None else dp.min_cohort,
            proximal_lambda=self.aggregator.proximal_lambda or None, compression=self.params.compression,
            buffer_k=None if self.params.buffer is None else self.params.buffer.k,
            max_staleness=None if self.params.buffer is None else self.params.buffer.max_staleness,
            buffer_attempt=0 if self.chain is None else self.chain.attempt,
        )
        sa = self.params.secagg
        if sa is None:
            return msg
        return replace(msg, secagg_seed=sa.seed, secagg_degree=sa.degree, secagg_threshold=sa.threshold,
                       secagg_ring_bits=sa.ring_bits, secagg_clip=sa.clip, secagg_scale=sa.scale,
                       secagg_stochastic=sa.stochastic, secagg_l2_clip=sa.l2_clip or None,
                       secagg_norm_bit=sa.norm_bit)

    def all_answered(self, now: float) -> bool:
        """Every selected device sent an update, declined, or stayed offline (failed) without answering."""
        # accepted, declined and offline hold selected devices only: while they are fewer than the selection, some
        # device is still awaited (O(1) per update; the set comparison below is O(n), once near the end)
        if len(self.accepted) + len(self.declined) + len(self.offline) < len(self.selected_set):
            return False
        return self.selected_set <= self.accepted.keys() | self.declined.keys() | self.failed_offline(now)

    def enough(self, now: float) -> bool:
        """The round's target of valid updates arrived and the others had their grace (over-selection: the slowest
        or silent devices are not waited for; :func:`straggler_grace`)."""
        if self.params.target <= 0 or len(self.accepted) < self.params.target:
            return False
        if self.target_at is None:
            self.target_at = now
        return now - self.target_at >= straggler_grace(self.opened_at, self.target_at)

    def should_close(self, now: float) -> bool:
        if self.chain is not None:  # buffered: open until the deadline, or until it made max_versions versions
            return now >= self.deadline or 0 < self.params.max_versions <= len(self.chain.made)
        return now >= self.deadline or self.all_answered(now) or self.enough(now)

    def quorum(self) -> bool:
        return len(self.accepted) >= self.params.min_devices

    def fold(self, device: str, version: str, nonce: str, delta: Mapping[str, Any], n_samples: int) -> bool:
        """A buffered round's accepted update (trained on ``version``, staleness checked by validation): folded into
        the buffer with its staleness weight; True when the buffer is full (the next version is due)."""
        chain, buf = self.chain, self.buffer
        if chain is None or buf is None:
            raise ValueError(f"round {self.id} is not a buffered round")
        s = chain.staleness(version)
        if s is None:
            raise ValueError(f"round {self.id} never announced {version!r}")
        buf.add(dict(delta), n_samples, s)
        chain.sent[(device, version)] = nonce
        chain.pending[device] = version
        self.accepted[device] = nonce
        self.n_samples += n_samples
        return buf.full

    def next_version(self, made: str | None, deployed: bool, buffer: Buffer) -> list[str]:
        """A buffered round's full buffer made version ``made`` (None: none, e.g. not finite); a ``deployed`` one is
        what devices train on from now on (staleness counts from it). A buffer that deployed nothing spent its
        updates: the round's attempt goes up and its devices may send again on the same versions
        (:meth:`BufferChain.spend`; returns them, sorted). A fresh ``buffer`` fills."""
        if self.chain is None:
            raise ValueError(f"round {self.id} is not a buffered round")
        if self.buffer is not None:
            self.chain.folded += self.buffer.count
        released = [] if deployed else self.chain.spend()
        self.chain.pending.clear()
        if made is not None:
            self.chain.made.append(made)
            if deployed:
                self.chain.versions.append(made)
                self.model_version = made
        self.buffer = buffer
        return released


__all__ = [
    "UNBOUNDED_OVERRIDES", "Limits", "OpenRound", "RoundDefaults", "RoundParams", "over_limits", "poisson_select",
    "round_target", "select_devices",
]
