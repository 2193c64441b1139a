"""Client-level differential privacy: clipping, Gaussian noise and accounting, shared by agent, hub and simulator.

Modes (announced per round, see PROTOCOL.md "Differential privacy"):

- ``central``: the device clips its update to L2 norm ``C``; the hub adds N(0, (zC)²) to the *sum* of the
  clipped updates (protects the released model; the hub and the broker see clipped updates).
- ``local``: the device clips and adds N(0, (zC)²) itself (protects against the hub and the broker).
- ``distributed``: the device adds N(0, (zC)²/(m-1)) for the round's minimum cohort ``m`` (m ≥ 2), so that a
  sum of at least m inputs carries the full noise even with any one device's share taken out (add/remove
  adjacency); private against the hub only under secure aggregation, so only a SecAgg round may announce it
  (devices decline it otherwise), and it is accounted like ``central`` without amplification: the hub sees only
  the sum.

Accounting uses Google's ``dp-accounting`` (RDP accountant), imported lazily: agents that never take part in
a DP round do not load it. Identical rounds are composed with a count (one call per distinct event), which
is both fast and exact.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

import numpy as np
from numpy.typing import NDArray

from fedge.protocol.errors import PrivacyError
from fedge.protocol.types import F32

MODES: Final = ("off", "central", "local", "distributed")
DP_MODES: Final = ("central", "local", "distributed")



@dataclass(frozen=True)
class DpParams:
    """The DP parameters of one round, as announced: mode, noise multiplier z, clip norm C, sampling rate q
    (Poisson, per device) and the minimum cohort m that ``distributed`` noise is split over."""

    mode: str
    noise_multiplier: float
    clip: float
    sample_rate: float = 1.0
    min_cohort: int = 1

    def __post_init__(self) -> None:
        if self.mode not in DP_MODES:
            raise PrivacyError(f"DP mode must be one of {', '.join(DP_MODES)}, got {self.mode!r}")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise PrivacyError(f"noise multiplier must be a finite number >= 0, got {self.noise_multiplier}")
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise PrivacyError(f"clip norm must be a finite number > 0, got {self.clip}")
        if not 0 < self.sample_rate <= 1:
            raise PrivacyError(f"sample rate must be in (0, 1], got {self.sample_rate}")
        if self.min_cohort < 1:
            raise PrivacyError(f"min cohort must be >= 1, got {self.min_cohort}")

    def device_noise_std(self) -> float:
        """Standard deviation of the Gaussian noise a device adds to each coordinate of its clipped update."""
        if self.mode == "local":
            return self.noise_multiplier * self.clip
        if self.mode == "distributed":  # split over m - 1: a sum of m inputs less any one still carries (zC)^2
            return self.noise_multiplier * self.clip / math.sqrt(max(self.min_cohort - 1, 1))
        return 0.0

    def hub_noise_std(self) -> float:
        """Standard deviation of the Gaussian noise the hub adds to each coordinate of the sum (central only)."""
        return self.noise_multiplier * self.clip if self.mode == "central" else 0.0


def distributed_min_cohort(cohort: int, min_devices: int, dropout_allowance: float) -> int:
    """m for a ``distributed`` round of ``cohort`` selected devices: ``max(min_devices, ceil((1 - dropout_allowance)
    * cohort), 2)``. Each device adds N(0, (zC)²/(m-1)), and a sum with fewer than m inputs is never unmasked.
    Splitting over the cohort (not only the minimum) keeps the noise in the sum near zC."""
    return max(min_devices, math.ceil((1.0 - dropout_allowance) * cohort - 1e-9), 2)


def l2_norm(delta: Mapping[str, NDArray[Any]]) -> float:
    """The L2 norm of an update over all of its arrays (float64 accumulation)."""
    return math.sqrt(sum(float(np.square(np.asarray(a, dtype=np.float64)).sum()) for a in delta.values()))


def clip_update(delta: Mapping[str, NDArray[Any]], clip: float) -> tuple[dict[str, F32], float]:
    """``delta`` scaled down to L2 norm at most ``clip`` (unchanged when already within), and its original norm."""
    norm = l2_norm(delta)
    # a hair below C so that rounding to float32 cannot push the norm above it
    scale = 1.0 if norm <= clip * (1 - 1e-6) else clip * (1 - 1e-6) / norm
    return {k: (np.asarray(v, dtype=np.float64) * scale).astype(np.float32) for k, v in delta.items()}, norm


def add_noise(delta: Mapping[str, NDArray[Any]], std: float, rng: np.random.Generator) -> dict[str, F32]:
    """``delta`` plus independent N(0, std²) noise on every coordinate (returned as float32)."""
    if std == 0:
        return {k: np.asarray(v, dtype=np.float32) for k, v in delta.items()}
    return {k: (np.asarray(v, dtype=np.float64) + rng.normal(0.0, std, size=np.shape(v))).astype(np.float32)
            for k, v in delta.items()}


def privatize(delta: Mapping[str, NDArray[Any]], params: DpParams, rng: np.random.Generator
              ) -> tuple[dict[str, F32], float]:
    """What a device publishes under ``params``: clipped to C, plus the device's share of the noise.

    Returns the private update and the update's norm before clipping (kept on the device).
    """
    clipped, norm = clip_update(delta, params.clip)
    return add_noise(clipped, params.device_noise_std(), rng), norm


# -- accounting ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DpEvent:
    """One round's privacy cost: a Gaussian mechanism with noise multiplier ``z``, amplified by Poisson sampling
    with rate ``q`` when ``amplified`` (central mode, where the adversary does not see who took part)."""

    noise_multiplier: float
    sample_rate: float = 1.0
    amplified: bool = False


def event_for(params: DpParams, *, trust_sampling: bool) -> DpEvent:
    """The accounting event of one round, for client-level DP.

    ``central``: the released aggregate; adjacency is adding or removing one device, whose clipped update moves
    the sum by at most C: a Gaussian mechanism with noise multiplier z, Poisson-subsampled with rate q only when
    ``trust_sampling`` (the cohort must be secret from whoever sees the result; hub ``amplification`` option).
    ``distributed`` (announced only in secure-aggregation rounds): the hub sees only the sum, which carries noise of
    std at least zC when at least m devices are in it (the hub closes a round with fewer as failed): a Gaussian
    mechanism with multiplier z at sensitivity C, never amplified (the hub knows the cohort). The noise is added
    before quantisation (a rounded Gaussian); with the default scale 2^16 the rounding is far below the noise.
    ``local``: the hub sees each device's own noised update, so adjacency is replacing that device's data: two
    clipped updates differ by up to 2C, a Gaussian mechanism with multiplier z/2, never amplified (the hub knows
    who took part).
    """
    if params.mode == "central":
        amplified = trust_sampling and params.sample_rate < 1.0
        return DpEvent(params.noise_multiplier, params.sample_rate if amplified else 1.0, amplified)
    if params.mode == "distributed":
        return DpEvent(params.noise_multiplier)
    return DpEvent(params.noise_multiplier / 2.0)


def _quiet_absl() -> None:
    # dp-accounting logs a warning per RDP order that does not converge: noise on stderr, not an error
    logging.getLogger("absl").setLevel(logging.ERROR)


def epsilon(events: Iterable[DpEvent], delta: float) -> float:
    """ε at ``delta`` of composing ``events`` (RDP accountant of ``dp-accounting``); 0 for no events,
    infinity when an event has no noise."""
    counts = Counter(events)
    if not counts:
        return 0.0
    if any(e.noise_multiplier <= 0 for e in counts):
        return math.inf
    import dp_accounting
    from dp_accounting.rdp import rdp_privacy_accountant

    _quiet_absl()
    accountant = rdp_privacy_accountant.RdpAccountant()
    for e, count in counts.items():
        gaussian = dp_accounting.GaussianDpEvent(e.noise_multiplier)
        event = dp_accounting.PoissonSampledDpEvent(e.sample_rate, gaussian) if e.amplified else gaussian
        accountant.compose(event, count)
    return float(accountant.get_epsilon(delta))


def noise_for_epsilon(target_epsilon: float, delta: float, rounds: int, sample_rate: float = 1.0,
                      *, amplified: bool = True, tolerance: float = 1e-3) -> float:
    """The smallest noise multiplier z (to ``tolerance``) with which ``rounds`` identical rounds spend at most
    ``target_epsilon`` at ``delta`` (bisection on :func:`epsilon`)."""
    if target_epsilon <= 0 or rounds < 1:
        raise PrivacyError("target epsilon must be > 0 and rounds >= 1")

    def eps(z: float) -> float:
        return epsilon([DpEvent(z, sample_rate, amplified and sample_rate < 1)] * rounds, delta)

    lo, hi = 0.01, 1.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise PrivacyError(f"no noise multiplier reaches epsilon {target_epsilon}")
    while hi - lo > tolerance:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if eps(mid) <= target_epsilon else (mid, hi)
    return hi


__all__ = [
    "DP_MODES",
    "MODES",
    "Charge",
    "DpEvent",
    "DpParams",
    "add_noise",
    "clip_update",
    "distributed_min_cohort",
    "epsilon",
    "event_for",
    "l2_norm",
    "ledger_epsilon",
    "noise_for_epsilon",
    "privatize",
]


class Charge(Protocol):
    """One DP round as a ledger records it."""

    @property
    def mode(self) -> str: ...
    @property
    def noise_multiplier(self) -> float: ...
    @property
    def clip(self) -> float: ...
    @property
    def sample_rate(self) -> float: ...
    @property
    def amplified(self) -> bool: ...


def ledger_epsilon(rows: Iterable[Charge], delta: float, extra: DpParams | None = None, *,
                   amplification: bool = False) -> float:
    """Epsilon at ``delta`` of every ledger row (each with the amplification it was recorded with) plus ``extra``
    (with the configured ``amplification``), by the RDP accountant."""
    events = [event_for(DpParams(r.mode, r.noise_multiplier, r.clip, r.sample_rate), trust_sampling=r.amplified)
              for r in rows]
    if extra is not None:
        events.append(event_for(extra, trust_sampling=amplification))
    return epsilon(events, delta)
