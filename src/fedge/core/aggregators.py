"""Aggregators: a round's updates become the next global head, pulled toward the source head w0.

The robust aggregators (``[aggregation] strategy``; chosen by :mod:`fedge.core.strategy`):

- ``fedavg`` (the default): the weighted mean ``Σ w_k Δ_k / Σ w_k`` with ``w_k = min(n_k, c)``: ``c`` at most
  ``max_weight_ratio · m`` (``m`` the lower median of the cohort's sample counts: a device claiming 10^9 samples
  weighs at most ``max_weight_ratio`` typical devices) and low enough that no update carries more than
  ``max_weight_share`` of the round's weight (:func:`share_cap`; never less than an equal share 1/n).
- ``median``: the coordinate-wise median of the deltas (unweighted, as Flower's FedMedian).
- ``trimmed_mean``: per coordinate, the ``floor(trim_fraction · n)`` largest and smallest values dropped and the
  rest averaged (unweighted, as Flower's FedTrimmedAvg). With ``floor(trim_fraction · n) = 0`` (small cohorts)
  nothing is trimmed: it is then the plain mean.

Why FedAvg with these bounds is the default, also for small cohorts (``bench/robust_strategy.py``, the demo task: 5
label-skewed devices, one of them hostile): the coordinate-wise median and trimmed mean cost 3-4 accuracy points
in clean rounds (with label skew the middle value of each coordinate is nobody's good direction) and protect no
better against a device that sends its own update negated at an honest length, which no rule based on norms or
order statistics can tell from an honest non-IID update. A mean of updates clipped to the median norm
(``norm_multiplier`` 1) costs nothing in clean rounds and cuts what a long update (sign flip or noise of norm 10)
does to what an in-bounds one does; the share cap removes the pull of inflated sample counts. What is left (an
in-bounds update in a bad direction: one device's worth of a round) is for the deploy gates to catch.

Every strategy first bounds each update's L2 norm (:class:`Bounds`), combines, bounds the combined delta's norm
too (a coordinate-wise median can be longer than any single update), then applies the proximal pull:
``min_w ½‖w − w̄‖² + λ‖w − w0‖²`` gives ``w = (w̄ + 2λ·w0) / (1 + 2λ)`` with ``w̄ = w_global + combined Δ``;
λ = 0 is no pull. So no update, and no combination of them, moves the head by more than the norm bound.

Updates above the bound are **clipped** (scaled down to it), not rejected: the bound is decided when the round
closes (it depends on the whole cohort), after the device was acked, and an honest device cannot know it in
advance (more data or more epochs legitimately make longer deltas); clipping keeps its direction and limits its
influence to that of an update of the bound's length, as DP-FedAvg does.

Memory: an :class:`Aggregator` keeps references to the round's accepted deltas until the round closes (the
cohort's weight cap, the norm bound and the median need all of them): cohort × head size (float32), e.g. 1,000
devices × the ``cnn28`` head (2,410 parameters) ≈ 10 MB. Combining works one head parameter at a time
(float64). DP rounds use the streaming :class:`DpAggregator` (constant memory, every update clipped to C).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
from numpy.typing import NDArray

from fedge.core.privacy import DpParams, clip_update, l2_norm
from fedge.protocol.types import Delta, Head, Shapes

Combined = dict[str, NDArray[np.float64]]

STRATEGY_NAMES: Final = ("fedavg", "median", "trimmed_mean")


def lower_median(values: Sequence[float]) -> float:
    """The lower median (the smaller middle element for an even count): with two values an outlier never counts."""
    if not values:
        raise ValueError("lower_median of nothing")
    ordered = sorted(values)
    return float(ordered[(len(ordered) - 1) // 2])


@dataclass(frozen=True)
class Bounds:
    """Limits on each update outside DP rounds (``[aggregation]`` in hub.toml).

    ``max_update_norm`` None is "auto": the bound is ``norm_multiplier ×`` (default 1: no update is longer than a
    typical one) the lower median of the accepted updates' norms of this round and of the recent rounds in
    ``history`` (their norms before clipping); in the first rounds (no history) this round's norms alone. An
    attacker who is a minority of those updates cannot move the median past an honest device's norm, so it cannot
    train the bound upward round after round; ``norm_ceiling`` caps the bound whatever the history says (e.g. a
    single-device round, or a majority of hostile devices).
    ``max_weight_share``: no update carries more of a FedAvg round's weight than this (default 0.25: a device
    claiming 10^9 samples beside four honest ones gets a quarter, not half).
    """

    max_weight_ratio: float = 4.0
    max_update_norm: float | None = None
    norm_multiplier: float = 1.0
    norm_ceiling: float = 100.0
    max_weight_share: float = 0.25

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_weight_ratio) and self.max_weight_ratio >= 1):
            raise ValueError(f"max_weight_ratio must be >= 1, got {self.max_weight_ratio}")
        if self.max_update_norm is not None and not (math.isfinite(self.max_update_norm) and self.max_update_norm > 0):
            raise ValueError(f"max_update_norm must be > 0, got {self.max_update_norm}")
        if not (math.isfinite(self.norm_multiplier) and self.norm_multiplier >= 1):
            raise ValueError(f"norm_multiplier must be >= 1, got {self.norm_multiplier}")
        if not (math.isfinite(self.norm_ceiling) and self.norm_ceiling > 0):
            raise ValueError(f"norm_ceiling must be > 0, got {self.norm_ceiling}")
        if not (math.isfinite(self.max_weight_share) and 0 < self.max_weight_share <= 1):
            raise ValueError(f"max_weight_share must be in (0, 1], got {self.max_weight_share}")

    def norm_bound(self, norms: Sequence[float], history: Sequence[float] = ()) -> float:
        """The L2 bound for a round whose updates have ``norms``, after rounds whose updates had ``history``."""
        if self.max_update_norm is not None:
            return min(self.max_update_norm, self.norm_ceiling)
        moving = [n for n in (*norms, *history) if n > 0]  # zero updates set no scale (nor freeze the bound at 0)
        return min(self.norm_multiplier * lower_median(moving), self.norm_ceiling) if moving else self.norm_ceiling

    def weight_cap(self, counts: Sequence[int]) -> float:
        """The largest weight one update may have: ``max_weight_ratio ×`` the lower median sample count, lowered
        further so that no update carries more than ``max_weight_share`` of the round's total weight
        (:func:`share_capped`; with n updates never below an equal share 1/n)."""
        ratio_cap = self.max_weight_ratio * lower_median([float(c) for c in counts])
        return min(ratio_cap, share_cap([min(float(c), ratio_cap) for c in counts], self.max_weight_share))

    def weights(self, counts: Sequence[int]) -> list[float]:
        """Each update's weight: its sample count, capped (:meth:`weight_cap`)."""
        cap = self.weight_cap(counts)
        return [min(float(c), cap) for c in counts]


def share_cap(weights: Sequence[float], share: float) -> float:
    """The largest cap ``c`` such that, with every weight lowered to ``min(w, c)``, no weight is more than ``share``
    of the total (water-filling; ``inf`` when no weight is above it already). With n weights a share below 1/n is
    impossible: the cap then makes every weight equal to the smallest."""
    w = sorted((float(x) for x in weights), reverse=True)
    n = len(w)
    if n == 0:
        raise ValueError("share_cap of nothing")
    total = sum(w)
    if w[0] <= share * total * (1 + 1e-12):
        return math.inf
    if share * n <= 1:
        return w[-1]
    suffix = [0.0] * (n + 1)  # suffix[k] = sum(w[k:]), summed from the small end (no cancellation)
    for i in range(n - 1, -1, -1):
        suffix[i] = suffix[i + 1] + w[i]
    for k in range(1, n):  # the k largest capped at c: c = share (k c + rest), so c = share rest / (1 - k share)
        c = share * suffix[k] / (1 - k * share)
        if w[k] <= c <= w[k - 1]:
            return c
    return w[-1]  # not reached when share * n > 1


def robust_mean(values: Sequence[float], weights: Sequence[float], *, trim: float = 0.1,
                max_share: float = 0.25) -> float:
    """A mean of many parties' numbers that no one of them can steer: the ``max(1, floor(trim n))`` lowest and
    highest values dropped (from 3 values on), the rest averaged with their weights, each weight capped so that none
    carries more than ``max_share`` of the kept total (:func:`share_cap`). A liar at either end is dropped; one in
    the middle lies between honest values and weighs at most a share. ``nan`` for no values."""
    if len(values) != len(weights):
        raise ValueError("one weight per value")
    pairs = sorted((float(v), float(w)) for v, w in zip(values, weights, strict=True) if w > 0)
    n = len(pairs)
    if not n:
        return math.nan
    cut = max(1, int(trim * n)) if n >= 3 else 0
    kept = pairs[cut:n - cut]
    cap = share_cap([w for _, w in kept], max_share)
    capped = [min(w, cap) for _, w in kept]
    return sum(v * w for (v, _), w in zip(kept, capped, strict=True)) / sum(capped)


def recent_norms(recorded: Sequence[tuple[int, Sequence[float]]], rounds: int) -> list[float]:
    """The accepted updates' norms of the last ``rounds`` recorded rounds (the "auto" bound's history)."""
    return [float(n) for _rid, norms in list(recorded)[-rounds:] if rounds > 0 for n in norms]


def record_norms(recorded: Sequence[tuple[int, Sequence[float]]], rid: int, norms: Sequence[float], keep: int
                 ) -> list[tuple[int, list[float]]]:
    """``recorded`` with round ``rid``'s norms (rounded to 9 digits, as stored) added, keeping the last ``keep``."""
    out = [(r, list(n)) for r, n in recorded if r != rid] + [(rid, [round(float(n), 9) for n in norms])]
    return out[-keep:] if keep > 0 else []


@dataclass(frozen=True)
class Summary:
    """What the bounds did to a round: the norm bound, how many updates were clipped, the weight cap (FedAvg
    only, else None) and how many updates it lowered."""

    norm_bound: float
    clipped: int
    weight_cap: float | None
    capped: int


_BLOCK = 512  # updates per matrix product when combining, at most ...
_BLOCK_BYTES = 32 << 20  # ... and at most 32 MB of temporary rows (float32 and their float64 copy) per product


class Aggregator:
    """One round's accepted updates; :meth:`result` bounds and combines them (sample-weighted FedAvg here).

    ``history`` holds the accepted updates' norms of recent rounds (for an "auto" norm bound).
    """

    name = "fedavg"

    def __init__(self, shapes: Shapes, proximal_lambda: float = 0.0, bounds: Bounds | None = None,
                 history: Sequence[float] = ()) -> None:
        if not proximal_lambda >= 0:
            raise ValueError(f"proximal_lambda must be >= 0, got {proximal_lambda}")
        self.proximal_lambda = float(proximal_lambda)
        self.shapes = {name: tuple(shape) for name, shape in shapes.items()}
        self.bounds = bounds if bounds is not None else Bounds()
        self.history = tuple(float(h) for h in history if math.isfinite(h) and h >= 0)
        self._deltas: list[Delta] = []
        self.counts: list[int] = []
        self.norms: list[float] = []  # each accepted update's L2 norm, before clipping (and before its weight)
        self.weights: list[float] = []  # each update's extra weight, applied after clipping (a buffered round's)
        self.total_samples = 0
        self.count = 0
        self.summary: Summary | None = None

    def _check(self, delta: Delta, n_samples: int) -> None:
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        if set(delta) != set(self.shapes):
            raise ValueError(f"delta names {sorted(delta)} differ from the head's {sorted(self.shapes)}")
        for name, shape in self.shapes.items():
            if tuple(np.shape(delta[name])) != shape:
                raise ValueError(f"{name}: shape {np.shape(delta[name])}, expected {shape}")

    def add(self, delta: Delta, n_samples: int, weight: float = 1.0) -> None:
        """Add one update (validated by the hub: same names and shapes, finite, n_samples >= 1); the arrays are
        kept, not copied, and must not change until the round closes. ``weight`` (in (0, 1]) scales the update
        after it was clipped to the norm bound (a buffered round's staleness weight); its recorded norm is the
        update's own."""
        self._check(delta, n_samples)
        if not 0 < weight <= 1:
            raise ValueError(f"weight must be in (0, 1], got {weight}")
        self._deltas.append(delta)
        self.counts.append(int(n_samples))
        self.norms.append(l2_norm(delta))
        self.weights.append(float(weight))
        self.total_samples += int(n_samples)
        self.count += 1

    def _combine(self, scales: list[float]) -> tuple[Combined, float | None, int]:
        """The weighted mean of the deltas, each times its clipping scale; also the weight cap and how many
        updates it lowered."""
        cap = self.bounds.weight_cap(self.counts)
        weights = [min(float(n), cap) for n in self.counts]
        total = sum(weights)
        factors = np.array([w * s / total for w, s in zip(weights, scales, strict=True)], dtype=np.float64)
        out: Combined = {}
        for name, shape in self.shapes.items():
            size = math.prod(shape)
            acc = np.zeros(size, dtype=np.float64)
            rows = max(1, min(_BLOCK, _BLOCK_BYTES // (12 * max(size, 1))))  # float32 rows + their float64 copy
            for lo in range(0, len(self._deltas), rows):  # a few matrix products, not one numpy call per update
                block = np.stack([np.asarray(d[name]).reshape(-1) for d in self._deltas[lo:lo + rows]])
                acc += factors[lo:lo + rows] @ block.astype(np.float64)
            out[name] = acc.reshape(shape)
        return out, cap, sum(1 for n in self.counts if n > cap)

    def mean_delta(self) -> Combined:
        """The combined delta (float64) of the bounded updates, itself within the norm bound; sets :attr:`summary`."""
        if not self._deltas:
            raise ValueError("no update was added")
        bound = self.bounds.norm_bound(self.norms, self.history)
        clips = [1.0 if norm <= bound else bound / norm for norm in self.norms]
        scales = [c * w for c, w in zip(clips, self.weights, strict=True)]  # clipped first, then weighted
        with np.errstate(over="ignore", invalid="ignore"):
            combined, cap, capped = self._combine(scales)
            norm = l2_norm(combined)
            if math.isfinite(norm) and norm > bound:  # a mean of bounded updates never is; a median may be
                combined = {k: v * (bound / norm) for k, v in combined.items()}
        self.summary = Summary(bound, sum(1 for c in clips if c < 1.0), cap, capped)
        return combined

    def result(self, global_head: Delta, w0: Delta) -> Head:
        """The new global head ``(w̄ + 2λ w0) / (1 + 2λ)`` as float32 (may hold ±inf if it overflows float32:
        the caller refuses a non-finite head)."""
        lam2 = 2.0 * self.proximal_lambda
        out: Head = {}
        with np.errstate(over="ignore", invalid="ignore"):
            for name, delta in self.mean_delta().items():
                w_bar = np.asarray(global_head[name], dtype=np.float64) + delta
                if lam2:
                    w_bar = (w_bar + lam2 * np.asarray(w0[name], dtype=np.float64)) / (1.0 + lam2)
                out[name] = w_bar.astype(np.float32)
        return out


class MedianAggregator(Aggregator):
    """Coordinate-wise median of the (norm-bounded) deltas; sample counts are not used."""

    name = "median"

    def _stack(self, name: str, scales: list[float]) -> NDArray[np.float64]:
        return np.stack([np.asarray(d[name], dtype=np.float64) * s for d, s in zip(self._deltas, scales, strict=True)])

    def _combine(self, scales: list[float]) -> tuple[Combined, float | None, int]:
        return {name: np.median(self._stack(name, scales), axis=0) for name in self.shapes}, None, 0


class TrimmedMeanAggregator(MedianAggregator):
    """Per coordinate, the ``floor(trim_fraction · n)`` largest and smallest values dropped, the rest averaged."""

    name = "trimmed_mean"

    def __init__(self, shapes: Shapes, proximal_lambda: float = 0.0, bounds: Bounds | None = None,
                 history: Sequence[float] = (), trim_fraction: float = 0.2, min_trim: int = 0) -> None:
        if not 0 <= trim_fraction < 0.5:
            raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
        if min_trim < 0:
            raise ValueError(f"min_trim must be >= 0, got {min_trim}")
        super().__init__(shapes, proximal_lambda, bounds, history)
        self.trim_fraction = float(trim_fraction)
        self.min_trim = int(min_trim)

    def cut(self, n: int) -> int:
        """Values dropped at each end of every coordinate among ``n`` updates: ``floor(trim_fraction n)``, at least
        ``min_trim`` while at least one value is left in the middle."""
        return max(int(self.trim_fraction * n), self.min_trim if n > 2 * self.min_trim else 0)

    def _combine(self, scales: list[float]) -> tuple[Combined, float | None, int]:
        cut = self.cut(len(self._deltas))
        out: Combined = {}
        for name in self.shapes:
            stack = np.sort(self._stack(name, scales), axis=0)
            out[name] = stack[cut:len(self._deltas) - cut].mean(axis=0)
        return out, None, 0


class DpAggregator(Aggregator):
    """The DP-FedAvg estimator: every update weighs the same (its sample count is not used, nor sent), the
    sum is divided by a fixed denominator (the expected cohort q·N, not the realised one), and in ``central``
    mode the hub re-clips each update to C and adds N(0, (zC)²) to the sum before dividing.

    Streaming: only float64 running sums are kept (constant memory), and no per-update norm is recorded (it
    would describe a device's data). ``rng`` draws the central noise (the hub passes one seeded by the operating
    system: unpredictable).
    """

    name = "dp_fedavg"

    def __init__(self, shapes: Shapes, proximal_lambda: float, params: DpParams, expected_cohort: float,
                 rng: np.random.Generator) -> None:
        super().__init__(shapes, proximal_lambda)
        if not expected_cohort > 0:
            raise ValueError(f"expected cohort must be > 0, got {expected_cohort}")
        self.params = params
        self.expected_cohort = float(expected_cohort)
        self._rng = rng
        self._sums = {name: np.zeros(shape, dtype=np.float64) for name, shape in self.shapes.items()}
        # central: the hub's own guarantee needs every update within C. Otherwise updates carry the devices'
        # noise: clip at C plus a bound that honest noise exceeds with negligible probability (post-processing,
        # no privacy cost), so that one hostile device cannot blow the aggregate up
        dims = sum(int(np.prod(s)) for s in self.shapes.values())
        noise = params.device_noise_std()
        self.bound = params.clip if params.mode == "central" else params.clip + noise * (np.sqrt(dims) + 10.0)

    def add(self, delta: Delta, n_samples: int, weight: float = 1.0) -> None:
        """Add one update with weight 1, clipped to :attr:`bound` (C in central mode)."""
        self._check(delta, n_samples)
        if weight != 1.0:
            raise ValueError("a DP round weighs every update the same")
        clipped, _ = clip_update(delta, self.bound)
        for name, acc in self._sums.items():
            acc += clipped[name]
        self.total_samples += 1
        self.count += 1

    def mean_delta(self) -> Combined:
        """``(Σ clip(Δ_k) + N(0, (zC)²)) / (q·N)`` (float64); noise drawn once per call."""
        if not self.count:
            raise ValueError("no update was added")
        std = self.params.hub_noise_std()
        out: Combined = {}
        for name, acc in self._sums.items():
            total = acc + self._rng.normal(0.0, std, size=acc.shape) if std > 0 else acc
            out[name] = total / self.expected_cohort
        return out


class SecureSumAggregator(Aggregator):
    """A secure-aggregation round: the hub never sees an update, only the unmasked sum of the included devices'
    (clipped, quantised) updates, added once with :meth:`add_sum`. Every included device weighs the same (the hub
    does not learn sample counts); the denominator is the number of inputs, or under DP the expected cohort
    (DP-FedAvg, as :class:`DpAggregator`). The combined delta is bounded by ``norm_ceiling``: a hostile device
    can put any ring value in its input, and only the mean can be bounded."""

    name = "secure_sum"

    def __init__(self, shapes: Shapes, proximal_lambda: float, bounds: Bounds, denominator: float | None = None
                 ) -> None:
        super().__init__(shapes, proximal_lambda, bounds)
        self.denominator = denominator
        self._sum: Combined | None = None

    def add(self, delta: Delta, n_samples: int, weight: float = 1.0) -> None:
        raise TypeError("a secure-aggregation round adds only the unmasked sum (add_sum)")

    def add_sum(self, total: Delta, count: int) -> None:
        """The unmasked sum of ``count`` devices' updates."""
        self._check(total, max(count, 1))
        if self._sum is not None:
            raise ValueError("the sum was added already")
        self._sum = {k: np.asarray(v, dtype=np.float64) for k, v in total.items()}
        self.count = self.total_samples = int(count)

    def mean_delta(self) -> Combined:
        if self._sum is None or not self.count:
            raise ValueError("no sum was added")
        denom = self.denominator if self.denominator is not None else float(self.count)
        out = {k: v / denom for k, v in self._sum.items()}
        norm = l2_norm(out)
        bound = self.bounds.norm_ceiling  # one hostile input can move the sum anywhere in the ring: bound the
        if math.isfinite(norm) and norm > bound:  # mean (post-processing: free under DP too)
            out = {k: v * (bound / norm) for k, v in out.items()}
        return out


__all__ = [
    "STRATEGY_NAMES",
    "Aggregator",
    "Bounds",
    "DpAggregator",
    "MedianAggregator",
    "SecureSumAggregator",
    "Summary",
    "TrimmedMeanAggregator",
    "lower_median",
    "recent_norms",
    "record_norms",
    "robust_mean",
    "share_cap",
]
