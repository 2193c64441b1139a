"""A Strategy owns a round's decisions: whom to select, how updates combine, and whether a version deploys.

``configure`` (a fleet view and the round's parameters -> a :class:`Plan` or a :class:`Refusal`), ``aggregator``
(the round's running aggregate, chosen by the round's own parameters), ``gates`` and ``federated_gate`` (the deploy
gates). The base strategy is
:class:`Robust` (sample-weighted FedAvg, or a coordinate-wise median / trimmed mean, every update norm-bounded, with
the proximal pull toward w0). Privacy and secure aggregation are **wrappers**, not branches: :class:`Private`
(central, local or distributed DP: Poisson cohorts, the budget, the DP-FedAvg aggregate) and :class:`Secure`
(SecAgg+: only capable devices, the public setup, the secure-sum aggregate) each wrap an inner strategy and change
only what they must. :func:`build_strategy` composes them as a hub configuration asks.

Pure: randomness and the ledger's epsilon come in through :class:`PlanContext`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Final, Protocol

import numpy as np

from fedge.core.aggregators import (
    Aggregator,
    Bounds,
    DpAggregator,
    MedianAggregator,
    SecureSumAggregator,
    TrimmedMeanAggregator,
)
from fedge.core.privacy import DpParams, distributed_min_cohort, event_for
from fedge.core.rounds import RoundParams, poisson_select, round_target, select_devices
from fedge.core.secagg import SecAggConfig
from fedge.core.secagg_round import SecAggPlan
from fedge.core.secagg_session import auto_clip, distributed_problem
from fedge.protocol.control import ReplyReason
from fedge.protocol.errors import ConfigError
from fedge.protocol.messages import RoundStatus
from fedge.protocol.types import Shapes

STRATEGY_NAMES: Final = ("fedavg", "median", "trimmed_mean")


@dataclass(frozen=True)
class FleetView:
    """Whom a round may select: the candidates (online devices, or the allow-list) and what each can do."""

    candidates: frozenset[str]
    dp_capable: frozenset[str] = frozenset()
    secagg_capable: frozenset[str] = frozenset()
    reliability: Mapping[str, float] | None = None  # selection weights (None: uniform): fedge.core.conduct

    def restricted(self, to: frozenset[str]) -> FleetView:
        return replace(self, candidates=self.candidates & to)


@dataclass(frozen=True)
class PlanContext:
    """What a plan may draw on besides the fleet: the fleet's name and the round id, a Generator (cohorts), entropy
    bytes (public SecAgg seeds) and the ledger's epsilon with one more round's parameters (None: as spent)."""

    fleet: str
    round_id: int
    rng: np.random.Generator
    entropy: Callable[[int], bytes]
    epsilon_spent: Callable[[DpParams | None], float] = lambda _extra: 0.0
    secagg_l2: float | None = None  # the adaptive L2 clip the last SecAgg rounds arrived at (None: none yet)


@dataclass(frozen=True)
class DpCharge:
    """The privacy a planned round costs, for the hub's ledger (recorded in the same transaction as the round)."""

    params: DpParams
    amplified: bool
    cohort: int
    expected_cohort: float
    epsilon_after: float


@dataclass(frozen=True)
class Plan:
    """A round to announce: who, with which parameters, at which privacy cost."""

    selected: tuple[str, ...]
    params: RoundParams
    charge: DpCharge | None = None


@dataclass(frozen=True)
class Refusal:
    """No round: why (the control reply's reason and detail). ``status``: the round id is used up and recorded,
    unannounced, with this status (None: nothing recorded); ``budget_exhausted``: no scheduled round until the
    budget changes."""

    reason: ReplyReason
    detail: str
    status: RoundStatus | None = None
    budget_exhausted: bool = False


@dataclass(frozen=True)
class GateSettings:
    """The deploy gates (``[aggregation]`` of hub.toml): ``held_out`` compares the hub's held-out accuracy of a
    new version with the deployed one's; ``federated`` asks the round's devices to score it first."""

    held_out: bool = True
    tolerance: float = 0.01
    federated: bool = False


class Strategy(Protocol):
    """How a round is planned, aggregated and gated."""

    @property
    def name(self) -> str: ...
    @property
    def proximal_lambda(self) -> float: ...
    @property
    def gates(self) -> GateSettings: ...

    def configure(self, fleet: FleetView, params: RoundParams, ctx: PlanContext) -> Plan | Refusal: ...

    def aggregator(self, params: RoundParams, shapes: Shapes, history: Sequence[float],
                   rng: np.random.Generator) -> Aggregator: ...

    def federated_gate(self, params: RoundParams) -> bool:
        """Whether the round's devices may gate its version (never when their scores would describe private data)."""
        ...

    def keeps_norms(self, params: RoundParams) -> bool:
        """Whether the round's update norms join the "auto" norm bound's history (never a DP round's)."""
        ...


def held_out_verdict(gates: GateSettings, accuracy: float | None, deployed: float | None) -> str | None:
    """Why a version scoring ``accuracy`` on the hub's held-out data must not replace one scoring ``deployed``
    (None: it may). Both are scored by the same evaluator on the same rows, so a tie always passes."""
    if not gates.held_out or accuracy is None or deployed is None:
        return None
    if accuracy < deployed - gates.tolerance:
        return (f"held-out accuracy {accuracy:.4f} is below the deployed version's {deployed:.4f} by more than "
                f"{gates.tolerance:g}")
    return None


@dataclass(frozen=True)
class Robust:
    """The base strategy: seeded selection of ``ceil(fraction n)`` candidates (devices that answer more often are
    more likely to be picked, when not all are); the round closes once all but the ``over_select`` share of them sent
    a valid update (:func:`~fedge.core.rounds.round_target`); ``fedavg`` (sample weights capped), ``median`` or
    ``trimmed_mean`` of norm-bounded updates; the proximal pull toward w0."""

    name: str = "fedavg"
    proximal_lambda: float = 0.0
    bounds: Bounds = field(default_factory=Bounds)
    trim_fraction: float = 0.2
    seed: int = 0
    gates: GateSettings = field(default_factory=GateSettings)
    over_select: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in STRATEGY_NAMES:
            raise ValueError(f"unknown aggregation strategy {self.name!r}")
        if not (math.isfinite(self.proximal_lambda) and self.proximal_lambda >= 0):
            raise ValueError(f"proximal_lambda must be >= 0, got {self.proximal_lambda}")
        if not 0 <= self.trim_fraction < 0.5:
            raise ValueError(f"trim_fraction must be in [0, 0.5), got {self.trim_fraction}")
        if not (math.isfinite(self.over_select) and self.over_select >= 0):
            raise ValueError(f"over_select must be >= 0, got {self.over_select}")

    def configure(self, fleet: FleetView, params: RoundParams, ctx: PlanContext) -> Plan | Refusal:
        if not fleet.candidates:
            return Refusal(ReplyReason.NO_DEVICES, "no known online device to select")
        selected = select_devices(fleet.candidates, params.fraction, params.min_devices, self.seed, ctx.round_id,
                                  fleet.reliability)
        return Plan(selected, replace(params, target=round_target(len(selected), params.min_devices,
                                                                  self.over_select)))

    def aggregator(self, params: RoundParams, shapes: Shapes, history: Sequence[float],
                   rng: np.random.Generator) -> Aggregator:
        """The round's aggregate, as its parameters say (not as today's configuration says: a round resumed after
        a restart keeps the DP or SecAgg it was announced with). A SecAgg round adds one secure sum; a DP round is
        DP-FedAvg; any other round is the configured robust aggregate."""
        if params.secagg is not None:
            denominator = None if params.dp is None else max(params.expected_cohort, 1.0)
            return SecureSumAggregator(shapes, self.proximal_lambda, self.bounds, denominator)
        if params.dp is not None:
            return DpAggregator(shapes, self.proximal_lambda, params.dp, max(params.expected_cohort, 1.0), rng=rng)
        if self.name == "median":
            return MedianAggregator(shapes, self.proximal_lambda, self.bounds, history)
        if self.name == "trimmed_mean":
            return TrimmedMeanAggregator(shapes, self.proximal_lambda, self.bounds, history, self.trim_fraction)
        return Aggregator(shapes, self.proximal_lambda, self.bounds, history)

    def federated_gate(self, params: RoundParams) -> bool:
        return self.gates.federated and params.dp is None  # under DP the devices' scores would describe their data

    def keeps_norms(self, params: RoundParams) -> bool:
        return params.dp is None and params.secagg is None  # a DP round's norms would describe the devices' data


@dataclass(frozen=True)
class PrivacySettings:
    """``[privacy]`` of hub.toml, as the strategy needs it."""

    mode: str
    noise_multiplier: float
    clip: float
    sample_rate: float
    epsilon_budget: float = 0.0
    delta: float = 1e-5
    dropout_allowance: float = 0.1
    amplification: bool = False


class _Wrapper:
    """What a wrapper (:class:`Private`, :class:`Secure`) leaves to the strategy it wraps: the proximal pull, the
    gates and the aggregator (the round's params carry what the wrapper's ``configure`` set: DP-FedAvg's
    ``params.dp``, the secure sum's ``params.secagg``)."""

    inner: Strategy

    @property
    def proximal_lambda(self) -> float:
        return self.inner.proximal_lambda

    @property
    def gates(self) -> GateSettings:
        return self.inner.gates

    def aggregator(self, params: RoundParams, shapes: Shapes, history: Sequence[float],
                   rng: np.random.Generator) -> Aggregator:
        return self.inner.aggregator(params, shapes, history, rng)

    def federated_gate(self, params: RoundParams) -> bool:
        return self.inner.federated_gate(params)

    def keeps_norms(self, params: RoundParams) -> bool:
        return self.inner.keeps_norms(params)


@dataclass(frozen=True)
class Private(_Wrapper):
    """Client-level DP around ``inner``: only devices that apply announced DP, a Poisson cohort (what the accountant
    assumes), the budget checked before anything is announced, DP-FedAvg (central noise at the hub in central
    mode), no federated gate (the devices' scores would describe their data), no norm history."""

    inner: Strategy
    privacy: PrivacySettings

    @property
    def name(self) -> str:
        return f"dp_{self.privacy.mode}({self.inner.name})"

    def configure(self, fleet: FleetView, params: RoundParams, ctx: PlanContext) -> Plan | Refusal:
        p = self.privacy
        eligible = fleet.candidates & fleet.dp_capable  # an older agent would send its raw update
        if not eligible:
            return Refusal(ReplyReason.NO_DEVICES, "no online device applies DP (update the agents)")
        dp = DpParams(p.mode, p.noise_multiplier, p.clip, p.sample_rate, min_cohort=params.min_devices)
        params = replace(params, dp=dp, expected_cohort=p.sample_rate * len(eligible))
        selected = poisson_select(eligible, p.sample_rate, ctx.rng)  # unpredictable cohort
        if len(selected) < params.min_devices:  # decided by the sampling alone: nothing released, no cost
            return Refusal(ReplyReason.COHORT_TOO_SMALL,
                           f"Poisson cohort of {len(selected)} is below min_devices {params.min_devices}: skipped, "
                           "nothing announced, no privacy spent", RoundStatus.FAILED_QUORUM)
        if dp.mode == "distributed":  # the noise is split over (nearly) the whole cohort, not only the minimum
            dp = replace(dp, min_cohort=distributed_min_cohort(len(selected), params.min_devices, p.dropout_allowance))
            params = replace(params, dp=dp)
        after = ctx.epsilon_spent(dp)
        if p.epsilon_budget > 0 and after > p.epsilon_budget:
            detail = (f"privacy budget: epsilon would reach {after:.3f} > budget {p.epsilon_budget:g} "
                      f"(delta {p.delta:g}; {ctx.epsilon_spent(None):.3f} spent)")
            return Refusal(ReplyReason.REFUSED_BUDGET, f"round {ctx.round_id} refused: {detail}",
                           RoundStatus.REFUSED_BUDGET, budget_exhausted=True)
        amplified = event_for(dp, trust_sampling=p.amplification).amplified
        return Plan(selected, params, DpCharge(dp, amplified, len(selected), params.expected_cohort, after))



@dataclass(frozen=True)
class Secure(_Wrapper):
    """SecAgg+ around ``inner``: only devices that can mask, a public setup per round (refused unannounced when the
    cohort cannot carry it), and the secure-sum aggregate (every included device weighs the same; under DP the
    denominator is the expected cohort, as DP-FedAvg).

    Bounded inputs: every update is clipped to an announced L2 norm (under distributed DP, C) and per coordinate;
    the hub refuses a sum that inputs so bounded cannot produce. With ``adaptive_l2`` the L2 clip follows the
    median of the devices' update norms (the norm bit: :func:`~fedge.core.secagg.next_l2_clip`), starting from
    ``config.l2_clip``; otherwise ``config.l2_clip`` is fixed (0: none)."""

    inner: Strategy
    config: SecAggConfig
    stage_timeout_s: float
    adaptive_l2: bool = False

    @property
    def name(self) -> str:
        return f"secagg({self.inner.name})"

    def configure(self, fleet: FleetView, params: RoundParams, ctx: PlanContext) -> Plan | Refusal:
        capable = fleet.restricted(fleet.secagg_capable)
        if not capable.candidates:
            return Refusal(ReplyReason.NO_DEVICES, "no online device can take part in secure aggregation (install "
                           "the agent's secagg extra)")
        plan = self.inner.configure(capable, params, ctx)
        if isinstance(plan, Refusal):
            return plan
        try:
            cfg = replace(self.config, clip=auto_clip(plan.params.dp, self.config.clip))
            if plan.params.dp is not None:  # devices clip to C and add noise: no L2 clip of their own announced
                cfg = replace(cfg, l2_clip=0.0, norm_bit=False)
            elif self.adaptive_l2:
                cfg = replace(cfg, l2_clip=ctx.secagg_l2 or cfg.l2_clip, norm_bit=True)
            sa = SecAggPlan.make(ctx.fleet, ctx.round_id, plan.selected, ctx.entropy(32), cfg, self.stage_timeout_s)
            why = distributed_problem(plan.params.dp, len(plan.selected), sa.clip, sa.scale)
            if why is not None:  # every device would decline it: refuse it here, before it costs privacy
                raise ConfigError("secagg.scale", why)
        except ConfigError as exc:  # nothing announced: no privacy spent
            return Refusal(ReplyReason.SECAGG_IMPOSSIBLE, f"secure aggregation is impossible for this cohort of "
                           f"{len(plan.selected)}: {exc}", RoundStatus.FAILED_QUORUM)
        return replace(plan, params=replace(plan.params, secagg=sa))



def build_strategy(base: Robust, privacy: PrivacySettings | None = None, secagg: SecAggConfig | None = None,
                   stage_timeout_s: float = 10.0, adaptive_l2: bool = False) -> Strategy:
    """The base strategy wrapped for ``privacy`` (None: off) and secure aggregation (None: off; ``adaptive_l2``: its
    L2 clip follows the devices' median update norm)."""
    strategy: Strategy = base
    if privacy is not None:
        strategy = Private(strategy, privacy)
    if secagg is not None:
        strategy = Secure(strategy, secagg, stage_timeout_s, adaptive_l2)
    return strategy


__all__ = [
    "STRATEGY_NAMES",
    "DpCharge",
    "FleetView",
    "GateSettings",
    "Plan",
    "PlanContext",
    "PrivacySettings",
    "Private",
    "Refusal",
    "Robust",
    "Secure",
    "Strategy",
    "build_strategy",
    "held_out_verdict",
]
