"""``fedge simulate``: N virtual devices in one process, no MQTT, on the demo's task.

Each device runs exactly what an agent runs in a round and the hub exactly what it runs to close one, minus
the wire: the shared trainer gets the global head (``set_head``), fine-tunes it on the device's cached backbone
features (``training.fit``), and the device's update is ``trained - global``; under DP it is clipped and noised
by ``privacy.privatize`` (local noise on the device, central noise in the hub's ``DpAggregator``). The hub side
selects the cohort (``rounds.poisson_select`` under DP, ``rounds.select_devices`` otherwise), aggregates with the
hub's strategy (``Aggregator`` / ``DpAggregator``), scores the new global head with the hub's ``Evaluator`` and
accounts every announced DP round with ``privacy.epsilon`` / ``event_for`` as the hub's ledger does (sampling
amplification only when asked for, as the hub's ``[privacy] amplification``; an empty Poisson cohort is skipped
and spends nothing). Selection here is seeded (the hub draws its cohorts from the operating system).

Backbone features are computed once for the whole device pool (one batch). Every random draw (training
shuffles, device noise, hub noise, selection) comes from a Generator seeded from ``seed``: a run is a pure
function of its settings and the data (wall-clock ``seconds`` aside).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedge.demo import DemoPaths, build_report, prepare
from fedge.edge_agent.privacy import DpEvent, DpParams, epsilon, event_for, l2_norm, noise_for_epsilon, privatize
from fedge.edge_agent.trainers.base import Trainer
from fedge.hub.evaluate import Evaluator
from fedge.protocol.errors import ConfigError, FedgeError
from fedge.protocol.messages import RoundResult, RoundStatus

__all__ = [
    "DEFAULT_OUT",
    "SimFleet",
    "SimRun",
    "SimSettings",
    "build_sim_report",
    "device_noise_rng",
    "hub_noise_rng",
    "load_fleet",
    "resolve_dp",
    "run_rounds",
    "run_simulate",
    "settings_from_args",
    "train_rng",
]

DEFAULT_OUT = "simulate-out"
FLEET = "sim"

# Seed-sequence tags: every stream of randomness is Generator([seed, TAG, ...]); 4 words, so no stream can
# coincide with the hub's selection streams ([seed, round] and [seed, round, 1]).
_TRAIN, _DEVICE_NOISE, _HUB_NOISE = 0x5EED_0001, 0x5EED_0002, 0x5EED_0003

F32 = NDArray[np.float32]
Head = dict[str, F32]


def train_rng(seed: int, device: int, round_id: int) -> np.random.Generator:
    """The shuffling Generator of device ``device`` (its index in the fleet) in round ``round_id``."""
    return np.random.default_rng([seed, _TRAIN, device, round_id])


def device_noise_rng(seed: int, device: int, round_id: int) -> np.random.Generator:
    """The Generator of the noise device ``device`` adds to its update in round ``round_id`` (local DP)."""
    return np.random.default_rng([seed, _DEVICE_NOISE, device, round_id])


def hub_noise_rng(seed: int, round_id: int) -> np.random.Generator:
    """The Generator of the noise the hub adds to round ``round_id``'s sum (central DP)."""
    return np.random.default_rng([seed, _HUB_NOISE, round_id, 0])


@dataclass(frozen=True)
class SimSettings:
    """One simulation: the fleet size and rounds, the demo hub's round settings, and the DP parameters
    (``dp`` None = no DP; ``target_epsilon`` is only recorded: ``dp.noise_multiplier`` is what runs;
    ``amplification`` is the hub's ``[privacy] amplification``: count central rounds as Poisson-subsampled)."""

    devices: int
    rounds: int
    seed: int = 0
    local_epochs: int = 2
    lr: float = 0.05
    proximal_lambda: float = 0.01
    fraction: float = 1.0
    dp: DpParams | None = None
    delta: float = 1e-5
    target_epsilon: float | None = None
    amplification: bool = False

    def __post_init__(self) -> None:
        if self.devices < 1:
            raise ConfigError("devices", f"must be >= 1, got {self.devices}")
        if self.rounds < 1:
            raise ConfigError("rounds", f"must be >= 1, got {self.rounds}")
        if self.seed < 0:
            raise ConfigError("seed", f"must be >= 0, got {self.seed}")
        if self.local_epochs < 1:
            raise ConfigError("local_epochs", f"must be >= 1, got {self.local_epochs}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError("lr", f"must be a positive number, got {self.lr}")
        if not (math.isfinite(self.proximal_lambda) and self.proximal_lambda >= 0):
            raise ConfigError("proximal_lambda", f"must be a number >= 0, got {self.proximal_lambda}")
        if not 0 < self.fraction <= 1:
            raise ConfigError("fraction", f"must be in (0, 1], got {self.fraction}")
        if not 0 < self.delta < 1:
            raise ConfigError("delta", f"must be in (0, 1), got {self.delta}")
        if self.dp is not None and self.dp.mode not in ("central", "local"):
            raise ConfigError("dp_mode", f"simulate runs central or local DP, got {self.dp.mode!r}")

    def event(self) -> DpEvent | None:
        """The accounting event of one round, as the hub's ledger records it (None without DP)."""
        return None if self.dp is None else event_for(self.dp, trust_sampling=self.amplification)


def resolve_dp(mode: str, *, noise_multiplier: float | None, target_epsilon: float | None, clip: float,
               sample_rate: float, delta: float, rounds: int, amplification: bool = False) -> DpParams | None:
    """The DP parameters of a run: None for ``off``; with ``target_epsilon`` the noise multiplier is the smallest
    z with which ``rounds`` rounds spend at most that epsilon at ``delta``, counted as the hub counts them
    (``event_for`` with ``trust_sampling=amplification``; ``noise_for_epsilon`` on that event). Without either,
    z = 1."""
    if mode == "off":
        if noise_multiplier is not None or target_epsilon is not None:
            raise ConfigError("dp_mode", "--noise-multiplier and --epsilon need --dp-mode central or local")
        return None
    if mode not in ("central", "local"):
        raise ConfigError("dp_mode", f"must be off, central or local, got {mode!r}")
    if noise_multiplier is not None and target_epsilon is not None:
        raise ConfigError("epsilon", "give --noise-multiplier or --epsilon, not both")
    if target_epsilon is not None:
        if not (math.isfinite(target_epsilon) and target_epsilon > 0):
            raise ConfigError("epsilon", f"must be a number > 0, got {target_epsilon}")
        if not 0 < sample_rate <= 1:
            raise ConfigError("sample_rate", f"must be in (0, 1], got {sample_rate}")
        try:
            # the round's accounting event is linear in z (local mode is charged at z/2): solve for the event's
            # multiplier, then scale back to the announced one
            probe = event_for(DpParams(mode, 1.0, clip, sample_rate), trust_sampling=amplification)
            event_z = noise_for_epsilon(target_epsilon, delta, max(rounds, 1), probe.sample_rate,
                                        amplified=probe.amplified)
        except ValueError as exc:
            raise ConfigError("epsilon", str(exc)) from exc
        noise_multiplier = event_z / probe.noise_multiplier
    z = 1.0 if noise_multiplier is None else noise_multiplier
    if not z > 0:
        raise ConfigError("noise_multiplier", f"must be > 0 under DP, got {z}")
    try:
        return DpParams(mode, z, clip, sample_rate)
    except ValueError as exc:
        raise ConfigError("dp", str(exc)) from exc


# -- the fleet: data, features, trainer, evaluator ---------------------------------------------------------------


@dataclass
class SimFleet:
    """Everything a run needs, built once: the shared trainer, the source head w0, each device's cached backbone
    features and labels, and the hub's evaluator on ``eval.npz``."""

    paths: DemoPaths
    info: dict[str, Any]
    trainer: Trainer
    w0: Head
    names: tuple[str, ...]
    feats: list[F32]
    labels: list[NDArray[np.int64]]
    evaluator: Evaluator
    backbone_sha256: str
    source_accuracy: float
    prepare_seconds: float
    features_seconds: float

    @property
    def devices(self) -> int:
        return len(self.names)

    def score(self, head: Head) -> tuple[float, float]:
        """(loss, accuracy) of ``head`` on the hub's eval set, by the hub's own evaluator."""
        result = self.evaluator(self.paths.artifacts, self.backbone_sha256, head)
        if result is None:
            raise FedgeError(f"no hub eval data at {self.paths.data / 'eval.npz'}")
        return float(result.loss), float(result.accuracy)


def _device_data(paths: DemoPaths, devices: int, seed: int, quiet: bool
                 ) -> tuple[dict[str, Any], list[tuple[NDArray[np.float32], NDArray[np.int64]]]]:
    """The demo's device shards for ``devices`` devices (``demo.prepare``: pre-trains and exports on first use).

    ``demo.prepare`` gives every device at least 10 samples; past that (more than 1,200 devices on
    Fashion-MNIST's 12,000 held-back images) the shards are made here with the same recipe, the pool split evenly
    (``size_per_device`` = pool // devices, at least 1)."""
    from fedge.edge_agent.data import load_local

    try:
        info = prepare(paths, devices, seed, quiet)
    except ConfigError as exc:
        if exc.field not in ("size_per_device", "devices"):
            raise
        info = prepare(paths, 1, seed, quiet)  # source model, artifacts and eval set; the shards follow
        return info, _small_shards(devices, seed)
    shards = []
    for f in info["device_files"]:
        local = load_local(f)
        shards.append((local.x, np.asarray(local.y, dtype=np.int64)))
    return info, shards


def _small_shards(devices: int, seed: int) -> list[tuple[NDArray[np.float32], NDArray[np.int64]]]:
    """``demo.prepare``'s partition (same pool, base shift, Dirichlet 0.5, seed) with fewer than 10 samples each."""
    from fedge.datasets.partition import make_device_shards
    from fedge.datasets.shifts import Shift
    from fedge.datasets.source import load_source
    from fedge.demo import BASE_CONTRAST, BASE_ROTATION, SOURCE_FRACTION

    data = load_source("auto")
    n_source = int(len(data.x_train) * SOURCE_FRACTION)
    pool = type(data)(name=data.name, x_train=data.x_train[n_source:], y_train=data.y_train[n_source:],
                      x_test=data.x_test, y_test=data.y_test, num_classes=data.num_classes)
    per_device = len(pool.x_train) // devices
    if per_device < 1:
        raise ConfigError("devices", f"{devices} devices need more than the {len(pool.x_train)} held-back samples")
    base = Shift(rotation_deg=BASE_ROTATION, contrast=BASE_CONTRAST, noise_sigma=0.0)
    if data.x_train.ndim != 4:
        base = Shift(rotation_deg=0.0, contrast=1.0, noise_sigma=0.05)
    shards = make_device_shards(pool, devices, 0.5, seed, base, min_per_device=per_device,
                                size_per_device=per_device)
    return [(s.x, s.y) for s in shards]


def load_fleet(paths: DemoPaths, devices: int, seed: int = 0, *, backend: str = "auto", quiet: bool = True
               ) -> SimFleet:
    """Prepare the demo task in ``paths`` (reusing its source model and artifacts) and cache every device's
    backbone features, computed in one batch by the trainer that then trains all the devices."""
    from fedge.edge_agent.trainers import open_trainer
    from fedge.protocol.manifest import load_head, load_manifest

    if devices < 1:
        raise ConfigError("devices", f"must be >= 1, got {devices}")
    t0 = time.perf_counter()
    info, shards = _device_data(paths, devices, seed, quiet)
    t1 = time.perf_counter()
    trainer = open_trainer(paths.artifacts, backend)
    manifest = load_manifest(paths.artifacts)
    sizes = [len(y) for _, y in shards]
    if min(sizes) < 1:
        raise FedgeError("a device shard is empty")
    all_feats = trainer.features(np.concatenate([x for x, _ in shards]))
    cuts = np.cumsum(sizes)[:-1]
    feats = [np.ascontiguousarray(f) for f in np.split(all_feats, cuts)]
    evaluator = Evaluator(paths.data / "eval.npz", trainer.name)
    fleet = SimFleet(
        paths=paths, info=info, trainer=trainer, w0=load_head(paths.artifacts),
        names=tuple(f"device-{i:02d}" for i in range(devices)), feats=feats, labels=[y for _, y in shards],
        evaluator=evaluator, backbone_sha256=manifest.backbone_sha256, source_accuracy=math.nan,
        prepare_seconds=t1 - t0, features_seconds=0.0,
    )
    fleet.source_accuracy = fleet.score(fleet.w0)[1]  # also computes the eval features once
    fleet.features_seconds = time.perf_counter() - t1
    return fleet


# -- the rounds ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SimRun:
    """The rounds of one run (as the hub's round results), the median update norm of each round (before
    clipping; None for a round nobody took part in), the final global head and the rounds' wall time."""

    results: list[RoundResult]
    update_norms: list[float | None]
    head: Head
    seconds: float


def _train_device(fleet: SimFleet, i: int, global_head: Head, settings: SimSettings, rid: int
                  ) -> tuple[dict[str, F32], int, float]:
    """What device ``i`` publishes in round ``rid`` (the agent's ``_run_round`` without the wire): its update,
    the sample count it reports (1 under DP, as the agent sends), and its update's norm before clipping."""
    from fedge.edge_agent.training import fit

    trainer = fleet.trainer
    trainer.set_head(global_head)
    fit(trainer, fleet.feats[i], fleet.labels[i], settings.local_epochs, settings.lr,
        train_rng(settings.seed, i, rid))
    trained = trainer.get_head()
    delta = {k: (np.asarray(trained[k], dtype=np.float32) - global_head[k]).astype(np.float32) for k in global_head}
    if settings.dp is None:
        return delta, len(fleet.labels[i]), l2_norm(delta)
    private, norm = privatize(delta, settings.dp, device_noise_rng(settings.seed, i, rid))
    return private, 1, norm


def run_rounds(fleet: SimFleet, settings: SimSettings) -> SimRun:
    """``settings.rounds`` rounds over ``fleet`` from the source head, as the hub runs them."""
    from fedge.hub.rounds import poisson_select, select_devices
    from fedge.hub.strategies import Aggregator, DpAggregator, make_strategy

    if settings.devices != fleet.devices:
        raise ConfigError("devices", f"the fleet has {fleet.devices} devices, the settings {settings.devices}")
    index = {name: i for i, name in enumerate(fleet.names)}
    shapes = {k: tuple(v.shape) for k, v in fleet.w0.items()}
    strategy = make_strategy("fedavg", settings.proximal_lambda)
    event = settings.event()
    spent: list[DpEvent] = []  # the ledger: one event per announced DP round
    global_head: Head = {k: v.copy() for k, v in fleet.w0.items()}
    results: list[RoundResult] = []
    norms_per_round: list[float | None] = []
    t_start = time.perf_counter()
    for rid in range(1, settings.rounds + 1):
        t0 = time.perf_counter()
        agg: Aggregator
        if settings.dp is None:
            selected = select_devices(fleet.names, settings.fraction, 1, settings.seed, rid)
            agg = strategy.aggregator(shapes)
        else:
            dp = settings.dp
            selected = poisson_select(fleet.names, dp.sample_rate, settings.seed, rid)
            expected = dp.sample_rate * fleet.devices
            agg = DpAggregator(shapes, settings.proximal_lambda, dp, max(expected, 1.0),
                               hub_noise_rng(settings.seed, rid))
        norms: list[float] = []
        n_samples = 0
        for name in selected:
            delta, n, norm = _train_device(fleet, index[name], global_head, settings, rid)
            agg.add(delta, n)
            norms.append(norm)
            n_samples += n
        acc = loss = None
        if selected and event is not None:  # an empty Poisson cohort is not announced and spends nothing
            spent.append(event)
        if agg.count >= 1:  # quorum: one device (the simulated hub's min_devices)
            global_head = agg.result(global_head, fleet.w0)
            loss, acc = fleet.score(global_head)
        status = RoundStatus.COMPLETED if acc is not None else RoundStatus.FAILED_QUORUM
        eps = None if event is None else epsilon(spent, settings.delta)
        results.append(RoundResult(
            fleet=FLEET, round=rid, status=status, model_version=f"sim-{rid}" if acc is not None else None,
            accuracy=acc, loss=loss, devices=tuple(selected), n_samples=n_samples, rejected=0,
            seconds=time.perf_counter() - t0, epsilon=eps,
        ))
        norms_per_round.append(statistics.median(norms) if norms else None)
    return SimRun(results, norms_per_round, global_head, time.perf_counter() - t_start)


# -- report --------------------------------------------------------------------------------------------------------


def _r(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(x, digits)


def build_sim_report(fleet: SimFleet, settings: SimSettings, run: SimRun) -> dict[str, Any]:
    """The demo's report (``demo.build_report``: rounds, source/final accuracy, passed ...) plus each round's
    epsilon and median update norm, the DP settings and the timings."""
    report = build_report(fleet.info, settings.devices, fleet.source_accuracy, run.results, fleet.paths)
    for entry, res, norm in zip(report["rounds"], run.results, run.update_norms, strict=True):
        entry["epsilon"] = _r(res.epsilon)
        entry["update_norm_median"] = _r(norm, 5)
    dp = settings.dp
    report.update(
        simulated=True, backend=fleet.trainer.name, seed=settings.seed, local_epochs=settings.local_epochs,
        lr=settings.lr, proximal_lambda=settings.proximal_lambda,
        fraction=None if dp is not None else settings.fraction,
        dp=None if dp is None else {
            "mode": dp.mode, "noise_multiplier": dp.noise_multiplier, "clip": dp.clip, "sample_rate": dp.sample_rate,
            "delta": settings.delta, "target_epsilon": settings.target_epsilon,
            "amplification": settings.amplification,
            "expected_cohort": dp.sample_rate * settings.devices, "accountant": "RDP (dp-accounting)",
        },
        epsilon=None if dp is None else _r(run.results[-1].epsilon),
        prepare_seconds=round(fleet.prepare_seconds, 3), features_seconds=round(fleet.features_seconds, 3),
        rounds_seconds=round(run.seconds, 3),
    )
    return report


def _table_row(res: RoundResult) -> str:
    acc = f"{res.accuracy:8.3f}" if res.accuracy is not None else f"{'failed':>8}"
    eps = f"{res.epsilon:8.3f}" if res.epsilon is not None else f"{'-':>8}"
    return f"{res.round:>5}  {len(res.devices):>7}  {acc}  {res.seconds:7.2f}  {eps}"


def _print_table(report: dict[str, Any], run: SimRun) -> None:
    print(f"\n{'round':>5}  {'devices':>7}  {'accuracy':>8}  {'seconds':>7}  {'epsilon':>8}")
    print(f"{'src':>5}  {'-':>7}  {report['source_accuracy']:8.3f}  {'-':>7}  {'-':>8}")
    for res in run.results:
        print(_table_row(res))
    final = report["final_accuracy"]
    dp = report["dp"]
    amplified = " (amplified by sampling)" if dp is not None and dp["amplification"] else ""
    privacy = "no DP" if dp is None else (
        f"{dp['mode']} DP: z {dp['noise_multiplier']:.4g}, C {dp['clip']:g}, q {dp['sample_rate']:g}, "
        f"epsilon {report['epsilon']} at delta {dp['delta']:g}{amplified}")
    print(f"\n{report['devices']} simulated devices, {privacy}; {report['rounds_seconds']:.2f} s of rounds "
          f"({report['prepare_seconds']:.1f} s preparing, {report['features_seconds']:.1f} s features)")
    print(f"source-only accuracy {report['source_accuracy']:.3f} → federated "
          f"{'-' if final is None else f'{final:.3f}'} (chance {report['chance_accuracy']:.3f})")
    if not report["passed"]:
        print("FAILED: the federated model did not beat the source model and chance + margin")
    print(f"report: {report['report']}\nplot:   {report['plot']}")


def run_simulate(settings: SimSettings, out: str | Path, *, as_json: bool = False, backend: str = "auto",
                 plot: bool = True) -> int:
    """``fedge simulate``: prepare (or reuse) the demo task in ``out``, run the rounds, write ``report.json`` (and
    the plot), print a table or one JSON object. 0 when the final model beats the source model and chance."""
    from fedge.demo import _plot

    paths = DemoPaths(Path(out).resolve())
    if not as_json:
        print(f"preparing {settings.devices} devices in {paths.root}", flush=True)
    fleet = load_fleet(paths, settings.devices, settings.seed, backend=backend, quiet=as_json)
    run = run_rounds(fleet, settings)
    report = build_sim_report(fleet, settings, run)
    paths.report.write_text(json.dumps(report, indent=2) + "\n")
    if plot:
        _plot(report, paths.plot)
    if as_json:
        print(json.dumps(report))
    else:
        _print_table(report, run)
    return 0 if report["passed"] else 1


def settings_from_args(devices: int, rounds: int, seed: int, *, dp_mode: str, noise_multiplier: float | None,
                       target_epsilon: float | None, clip: float, sample_rate: float, delta: float,
                       local_epochs: int, lr: float, proximal_lambda: float, fraction: float,
                       amplification: bool = False) -> SimSettings:
    """The settings of ``fedge simulate``'s command line (the noise multiplier resolved from ``--epsilon``)."""
    if amplification and dp_mode != "central":
        raise ConfigError("amplification", "applies to --dp-mode central only")
    dp = resolve_dp(dp_mode, noise_multiplier=noise_multiplier, target_epsilon=target_epsilon, clip=clip,
                    sample_rate=sample_rate, delta=delta, rounds=rounds, amplification=amplification)
    return SimSettings(devices=devices, rounds=rounds, seed=seed, local_epochs=local_epochs, lr=lr,
                       proximal_lambda=proximal_lambda, fraction=fraction, dp=dp, delta=delta,
                       target_epsilon=target_epsilon if dp is not None else None, amplification=amplification)
