"""Streaming aggregation: sample-weighted FedAvg with a proximal pull towards the source head w0.

``min_w Σ_k (n_k/n)·½‖w − w_k‖² + λ‖w − w0‖²`` gives ``w = (w̄ + 2λ·w0) / (1 + 2λ)`` where
``w̄ = w_global + Σ_k n_k·Δ_k / Σ_k n_k``. λ = 0 is plain FedAvg.

An :class:`Aggregator` keeps only float64 running sums ``Σ n_k Δ_k`` (one array per head
parameter) and ``Σ n_k``: its memory does not grow with the number of updates.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from fedge.edge_agent.privacy import DpParams, clip_update

Head = dict[str, NDArray[np.float32]]
Shapes = Mapping[str, tuple[int, ...]]


class Aggregator:
    """Running weighted sum of head deltas; ``add`` is in place and allocation-free."""

    def __init__(self, shapes: Shapes, proximal_lambda: float = 0.0) -> None:
        if proximal_lambda < 0:
            raise ValueError(f"proximal_lambda must be >= 0, got {proximal_lambda}")
        self.proximal_lambda = float(proximal_lambda)
        self._sums = {name: np.zeros(shape, dtype=np.float64) for name, shape in shapes.items()}
        self._scratch = {name: np.empty(shape, dtype=np.float64) for name, shape in shapes.items()}
        self.total_samples = 0
        self.count = 0

    def add(self, delta: Mapping[str, NDArray[np.generic]], n_samples: int) -> None:
        """Add one update (already validated: same names and shapes, finite, n_samples >= 1)."""
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        if set(delta) != set(self._sums):
            raise ValueError(f"delta names {sorted(delta)} differ from the head's {sorted(self._sums)}")
        weight = float(n_samples)
        for name, acc in self._sums.items():
            scratch = self._scratch[name]
            np.multiply(delta[name], weight, out=scratch)
            np.add(acc, scratch, out=acc)
        self.total_samples += int(n_samples)
        self.count += 1

    def mean_delta(self) -> dict[str, NDArray[np.float64]]:
        """``Σ n_k Δ_k / Σ n_k`` (float64)."""
        if self.total_samples == 0:
            raise ValueError("no update was added")
        return {name: acc / self.total_samples for name, acc in self._sums.items()}

    def result(self, global_head: Mapping[str, NDArray[np.generic]], w0: Mapping[str, NDArray[np.generic]]) -> Head:
        """The new global head ``(w̄ + 2λ w0) / (1 + 2λ)`` as float32."""
        lam2 = 2.0 * self.proximal_lambda
        out: Head = {}
        for name, mean in self.mean_delta().items():
            w_bar = np.asarray(global_head[name], dtype=np.float64) + mean
            if lam2:
                w_bar = (w_bar + lam2 * np.asarray(w0[name], dtype=np.float64)) / (1.0 + lam2)
            out[name] = w_bar.astype(np.float32)
        return out


class Strategy(Protocol):
    """How a round's updates become the next global head."""

    name: str

    def aggregator(self, shapes: Shapes) -> Aggregator: ...


class FedAvgProx:
    """Sample-weighted FedAvg, pulled towards w0 with strength ``proximal_lambda`` (0 = plain FedAvg)."""

    name = "fedavg"

    def __init__(self, proximal_lambda: float = 0.0) -> None:
        if not proximal_lambda >= 0:
            raise ValueError(f"proximal_lambda must be >= 0, got {proximal_lambda}")
        self.proximal_lambda = float(proximal_lambda)

    def aggregator(self, shapes: Shapes) -> Aggregator:
        return Aggregator(shapes, self.proximal_lambda)


class DpAggregator(Aggregator):
    """The DP-FedAvg estimator: every update weighs the same (its sample count is not used, nor sent), the
    sum is divided by a fixed denominator (the expected cohort q·N, not the realised one), and in ``central``
    mode the hub re-clips each update to C and adds N(0, (zC)²) to the sum before dividing.

    ``rng`` draws the central noise; by default it is seeded from the operating system (unpredictable).
    """

    def __init__(self, shapes: Shapes, proximal_lambda: float, params: DpParams, expected_cohort: float,
                 rng: np.random.Generator | None = None) -> None:
        super().__init__(shapes, proximal_lambda)
        if not expected_cohort > 0:
            raise ValueError(f"expected cohort must be > 0, got {expected_cohort}")
        self.params = params
        self.expected_cohort = float(expected_cohort)
        self._rng = rng if rng is not None else np.random.default_rng()
        # central: the hub's own guarantee needs every update within C. Otherwise updates carry the devices'
        # noise: clip at C plus a bound that honest noise exceeds with negligible probability (post-processing,
        # no privacy cost), so that one hostile device cannot blow the aggregate up
        dims = sum(int(np.prod(s)) for s in shapes.values())
        noise = params.device_noise_std()
        self.bound = params.clip if params.mode == "central" else params.clip + noise * (np.sqrt(dims) + 10.0)

    def add(self, delta: Mapping[str, NDArray[np.generic]], n_samples: int) -> None:
        """Add one update with weight 1, clipped to :attr:`bound` (C in central mode)."""
        delta, _ = clip_update(delta, self.bound)
        super().add(delta, 1)

    def mean_delta(self) -> dict[str, NDArray[np.float64]]:
        """``(Σ clip(Δ_k) + N(0, (zC)²)) / (q·N)`` (float64); noise drawn once per call."""
        std = self.params.hub_noise_std()
        out: dict[str, NDArray[np.float64]] = {}
        for name, acc in self._sums.items():
            total = acc + self._rng.normal(0.0, std, size=acc.shape) if std > 0 else acc
            out[name] = total / self.expected_cohort
        return out


def make_strategy(name: str, proximal_lambda: float) -> Strategy:
    """The strategy named in ``[aggregation] strategy``."""
    if name == "fedavg":
        return FedAvgProx(proximal_lambda)
    raise ValueError(f"unknown aggregation strategy {name!r}")


__all__ = ["Aggregator", "DpAggregator", "FedAvgProx", "Head", "Strategy", "make_strategy"]
