"""The simulator's rounds: the round core's hub round and device rounds, driven in one process.

Per round, as the hub daemon does: the strategy plans the cohort (:meth:`Strategy.configure`), every selected
virtual device runs the device round (:func:`fedge.core.device.train`, then :meth:`Trained.update`) on the
announce the hub would publish, the aggregator folds the updates in, and :func:`fedge.core.hub_round.close_round`
aggregates, scores and gates the result; the "auto" norm bound keeps the hub's history. What the daemon and the
agents add (the wire, files, clocks, retries) is all that is left out, which is why a fleet of agents configured
with :func:`~fedge.simulate_fleet.device_seed` seeds ends with the same global heads (``test_simulate_matches_fleet``).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import numpy as np

from fedge.core import device as core
from fedge.core.aggregators import Bounds, recent_norms, record_norms
from fedge.core.compress import compress, decompress
from fedge.core.evaluation import head_scores
from fedge.core.hub_round import close_round, federated_scores
from fedge.core.personal import Choice
from fedge.core.privacy import DpEvent, DpParams, epsilon, event_for
from fedge.core.rounds import OpenRound, RoundParams
from fedge.core.strategy import (
    FleetView,
    GateSettings,
    PlanContext,
    PrivacySettings,
    Refusal,
    Robust,
    Strategy,
    build_strategy,
)
from fedge.protocol.messages import RoundResult, RoundStatus
from fedge.protocol.types import Head, Metrics
from fedge.simulate_engines import DeviceJob, Engine, InProcess
from fedge.simulate_fleet import FLEET, SimFleet, SimSettings, device_noise_rng, device_seed, hub_noise_rng

__all__ = ["NORM_WINDOW", "SimRun", "policies", "run_rounds", "strategy_of"]

NORM_WINDOW = 5
"""Rounds of update norms the "auto" norm bound remembers (the hub's ``[aggregation] norm_window`` default)."""
DEADLINE_S = 60.0
_ROUNDING = 0x5EED_0008  # seed-sequence tag of the devices' stochastic rounding (compressed updates)


@dataclass(frozen=True)
class SimRun:
    """The rounds of one run (as the hub's round results, ``federated`` holding the federated evaluation), the
    median update norm of each round (before clipping; None for a round nobody took part in), whether each round's
    version was deployed (the deploy gate), the final deployed global head, the devices' personal and local-only
    heads (None where a device has none), the federated scores of the final heads on every device's validation
    data (``final``: source, global = the deployed head, personal, local_only; empty without evaluation), the
    rounds' wall time, each round's new version (None where a round registered none; deployed or held back), and the
    version each round announced (the deployed one: ``sim-0`` is the start, ``sim-k`` round k's version).
    """

    results: list[RoundResult]
    update_norms: list[float | None]
    head: Head
    seconds: float
    deployed: list[bool] = field(default_factory=list)
    personal: list[Head | None] = field(default_factory=list)
    local_only: list[Head | None] = field(default_factory=list)
    final: dict[str, float] = field(default_factory=dict)
    versions: list[Head | None] = field(default_factory=list)
    announced: list[str] = field(default_factory=list)
    final_by_device: list[dict[str, float]] = field(default_factory=list)


def strategy_of(settings: SimSettings) -> Strategy:
    """The hub's strategy for these settings: FedAvg with the hub's default bounds, the held-out deploy gate when a
    tolerance is set, and DP (central or local) around it."""
    tol = settings.deploy_tolerance
    base = Robust("fedavg", settings.proximal_lambda, Bounds(), 0.2, settings.seed,
                  GateSettings(held_out=tol is not None, tolerance=tol or 0.0, federated=False))
    dp = settings.dp
    privacy = None if dp is None else PrivacySettings(dp.mode, dp.noise_multiplier, dp.clip, dp.sample_rate, 0.0,
                                                      settings.delta, 0.1, settings.amplification)
    return build_strategy(base, privacy)


def policies(fleet: SimFleet, settings: SimSettings) -> list[core.DevicePolicy]:
    """Each virtual device's agent policy (its seed from :func:`device_seed`)."""
    return [core.DevicePolicy(device_seed(settings.seed, i), 1 << 30, settings.validation_fraction,
                              settings.local_only_epochs, core.Personalization(settings.personalization),
                              settings.ditto_mu) for i in range(fleet.devices)]


def _local_only_cache(fleet: SimFleet, settings: SimSettings) -> list[Choice | None]:
    """The devices' local-only baselines, once per fleet and settings (filled as devices compute them)."""
    key = ("local_only", settings.validation_fraction, settings.local_only_epochs, settings.lr, settings.seed)
    cached: list[Choice | None] = fleet.cache.setdefault(key, [None] * fleet.devices)
    return cached


def run_rounds(fleet: SimFleet, settings: SimSettings, *, start: Head | None = None,
               engine: Engine | None = None) -> SimRun:
    """``settings.rounds`` rounds over ``fleet``, as the agents and the hub run them, from the deployed head
    ``start`` (default the source head w0; scored on the eval set as the deployed version the gate compares with;
    the proximal pull is toward w0 either way). ``engine``: where the devices train (default: in this process,
    on the fleet's trainer)."""
    from fedge.protocol.errors import ConfigError

    if settings.devices != fleet.devices:
        raise ConfigError("devices", f"the fleet has {fleet.devices} devices, the settings {settings.devices}")
    engine = engine if engine is not None else InProcess(fleet.trainer)
    strategy = strategy_of(settings)
    index = {name: i for i, name in enumerate(fleet.names)}
    everyone = frozenset(fleet.names)
    view = FleetView(everyone, everyone, everyone)
    shapes = {k: tuple(v.shape) for k, v in fleet.w0.items()}
    pols = policies(fleet, settings)
    local_only = _local_only_cache(fleet, settings)
    personal: list[Head | None] = [None] * fleet.devices
    residuals: list[Head | None] = [None] * fleet.devices  # compression's error feedback, per device
    spent: list[DpEvent] = []  # the ledger: one event per announced DP round
    history: list[tuple[int, list[float]]] = []
    global_head: Head = {k: np.asarray(v, dtype=np.float32).copy() for k, v in (start or fleet.w0).items()}
    deployed_acc = fleet.source_accuracy if start is None else fleet.score(global_head)[1]
    results: list[RoundResult] = []
    deployed: list[bool] = []
    versions: list[Head | None] = []
    announced: list[str] = []
    deployed_name = "sim-0"
    norms_per_round: list[float | None] = []
    t_start = time.perf_counter()

    def eps(extra: DpParams | None) -> float:
        events = spent if extra is None else [*spent, event_for(extra, trust_sampling=settings.amplification)]
        return epsilon(events, settings.delta)

    for rid in range(1, settings.rounds + 1):
        t0 = time.perf_counter()
        params = RoundParams(1, DEADLINE_S, settings.fraction, settings.local_epochs, settings.lr,
                             compression=settings.compression)
        ctx = PlanContext(FLEET, rid, np.random.default_rng([settings.seed, rid, 1]), bytes, eps)
        plan = strategy.configure(view, params, ctx)
        if isinstance(plan, Refusal):  # e.g. an empty Poisson cohort: not announced, spends nothing
            results.append(_result(rid, RoundStatus.FAILED_QUORUM, None, (), 0, (), t0, plan.detail, spent,
                                   settings, {}))
            deployed.append(False)
            versions.append(None)
            norms_per_round.append(None)
            continue
        if plan.charge is not None:
            spent.append(event_for(plan.charge.params, trust_sampling=settings.amplification))
        agg = strategy.aggregator(plan.params, shapes, recent_norms(history, NORM_WINDOW), hub_noise_rng(settings.seed,
                                                                                                          rid))
        r = OpenRound(rid, deployed_name, fleet.backbone_sha256, plan.params, plan.selected, 0.0, DEADLINE_S, agg)
        announced.append(deployed_name)
        msg = r.announce(FLEET)
        metrics: list[Metrics] = []
        norms: list[float] = []
        declined: list[str] = []
        jobs = [DeviceJob(index[name], core.DeviceData(fleet.feats[index[name]], fleet.labels[index[name]],
                                                       fleet.keys[index[name]]),
                          core.RoundHeads(global_head, fleet.w0, personal[index[name]], local_only[index[name]]),
                          pols[index[name]]) for name in plan.selected]
        outcomes = engine.run(msg, jobs, plan.params.dp is not None)  # in job order, on any engine
        for name, out in zip(plan.selected, outcomes, strict=True):
            i = index[name]
            if not isinstance(out, core.Trained):  # diverged, declined or closed: the agent declines
                declined.append(name)
                continue
            if out.local_only is not None:
                local_only[i] = out.local_only
            personal[i] = out.personal
            delta, n, m, norm = out.update(plan.params.dp, device_noise_rng(settings.seed, i, rid))
            if settings.compression is not None:  # what the wire carries, and what the hub decodes from it
                rounding = np.random.default_rng([settings.seed, _ROUNDING, i, rid])
                codes, residuals[i] = compress(delta, settings.compression, rounding, residuals[i])
                delta = decompress(codes, shapes, settings.compression)
            agg.add(delta, n)
            r.accepted[name] = "sim"
            r.n_samples += n
            metrics.append(m)
            norms.append(norm)
        closing = close_round(r, strategy, global_head, fleet.w0, lambda h: fleet.evaluator(
            fleet.paths.artifacts, fleet.backbone_sha256, h), deployed_acc, metrics)
        if strategy.keeps_norms(plan.params) and agg.norms:
            history = record_norms(history, rid, agg.norms, NORM_WINDOW)
        detail = closing.detail
        if closing.head is not None and closing.held_back is not None:
            detail = f"sim-{rid} kept as a candidate, not deployed: {closing.held_back}"
        if closing.deploy and closing.head is not None:
            global_head, deployed_name = closing.head, f"sim-{rid}"
            deployed_acc = closing.accuracy if closing.accuracy is not None else deployed_acc
        results.append(_result(rid, closing.status, closing, tuple(r.accepted), r.n_samples, tuple(declined), t0,
                               detail, spent, settings, closing.federated))
        deployed.append(closing.deploy)
        versions.append(closing.head)
        norms_per_round.append(statistics.median(norms) if norms else None)
    rows = _final_rows(fleet, settings, global_head, personal, local_only, pols) if settings.dp is None else []
    final = _summarise(rows)
    return SimRun(results, norms_per_round, global_head, time.perf_counter() - t_start, deployed, personal,
                  [None if c is None else c.head for c in local_only], final, versions, announced, rows)


def _result(rid: int, status: RoundStatus, closing: object, devices: tuple[str, ...], n_samples: int,
            declined: tuple[str, ...], t0: float, detail: str | None, spent: list[DpEvent], settings: SimSettings,
            federated: Metrics) -> RoundResult:
    acc = getattr(closing, "accuracy", None)
    loss = getattr(closing, "loss", None)
    made = getattr(closing, "head", None) is not None
    return RoundResult(
        fleet=FLEET, round=rid, status=status, model_version=f"sim-{rid}" if made else None, accuracy=acc,
        loss=loss, devices=devices, n_samples=n_samples, rejected=0, seconds=time.perf_counter() - t0,
        detail=detail, declined=declined, epsilon=None if settings.dp is None else epsilon(spent, settings.delta),
        federated=federated)


def _final_rows(fleet: SimFleet, settings: SimSettings, head: Head, personal: list[Head | None],
                local_only: list[Choice | None], pols: list[core.DevicePolicy]) -> list[dict[str, float]]:
    """Each device's scores (``val_acc_*``, ``val_loss_*``, ``val_n``) of the deployed ``head``, its last personal
    head (the deployed head where it never trained), the source head and its local-only head on its validation rows;
    local-only heads computed where a device has none."""
    if settings.validation_fraction <= 0:
        return []
    rows = []
    for i in range(fleet.devices):
        tr, va = fleet.split(i, settings.validation_fraction)
        if not len(va):
            continue
        if local_only[i] is None:
            local_only[i] = core.local_only_head(fleet.trainer, fleet.w0, fleet.feats[i][tr], fleet.labels[i][tr],
                                                 settings.local_only_epochs, settings.lr, pols[i].seed)
        own, local = personal[i], local_only[i]
        heads = {"source": fleet.w0, "global": head, "personal": head if own is None else own,
                 "local_only": None if local is None else local.head}
        rows.append(head_scores(fleet.trainer, {k: v for k, v in heads.items() if v is not None},
                                fleet.feats[i][va], fleet.labels[i][va]))
    return rows


def _summarise(rows: list[dict[str, float]]) -> dict[str, float]:
    """Validation-size-weighted means (``val_acc_*``, ``val_loss_*``, ``val_n``), per-device medians (``median_*``)
    and the worst device (``worst_*``) of every head's accuracy."""
    out = federated_scores(rows)
    for key in sorted({k for r in rows for k in r if k.startswith("val_acc_")}):
        values = [r[key] for r in rows if key in r]
        name = key[len("val_acc_"):]
        out[f"median_{name}"] = round(float(np.median(values)), 6)
        out[f"worst_{name}"] = round(float(np.min(values)), 6)
    return out
