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

Transfer quality, as the agent and hub run it: each device holds out a fixed validation split
(``evaluation.split_indices``, keyed on its data's sha256; only the rest trains), keeps a personal head
(``finetune``: the head it trained; ``ditto``: a separate head, from its previous personal head or the global one,
fitted with ``Prox(global, ditto_mu)``) and, outside DP, scores the source head w0, the global head it received,
its trained and personal heads and a local-only head (w0 fitted on its train split alone for ``local_only_epochs``,
once per device) on its validation data; the hub averages those with ``hub.daemon.federated_scores``. Scores use
the NumPy head forward (``head_forward`` + ``losses.score``) on the cached features. The deploy gate is the hub's:
a new version whose held-out accuracy is below the deployed one's by more than ``deploy_tolerance`` is kept as a
candidate and the next round starts from the deployed one (w0, scored on the eval set, is deployed at first).

Backbone features are computed once for the whole device pool (one batch). Every random draw (training
shuffles, device noise, hub noise, selection) comes from a Generator seeded from ``seed``: a run is a pure
function of its settings and the data (wall-clock ``seconds`` aside).
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedge.core.evaluation import split_indices
from fedge.core.losses import score
from fedge.core.privacy import DpEvent, DpParams, epsilon, event_for, l2_norm, noise_for_epsilon, privatize
from fedge.core.trainer import Trainer
from fedge.core.training import Prox, fit
from fedge.demo import DemoPaths, build_report, prepare
from fedge.hub.daemon import federated_scores
from fedge.hub.evaluate import Evaluator
from fedge.protocol.errors import ConfigError, FedgeError
from fedge.protocol.messages import RoundResult, RoundStatus
from fedge.runtime.trainers.numpy_head import head_forward

__all__ = [
    "DEFAULT_OUT",
    "SimFleet",
    "SimRun",
    "SimSettings",
    "build_sim_report",
    "device_noise_rng",
    "ditto_rng",
    "fleet_from_shards",
    "hub_noise_rng",
    "load_fleet",
    "local_only_rng",
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
_LOCAL_ONLY, _DITTO = 0x5EED_0004, 0x5EED_0005
PERSONALIZATIONS = ("finetune", "ditto")

F32 = NDArray[np.float32]
Head = dict[str, F32]


def train_rng(seed: int, device: int, round_id: int) -> np.random.Generator:
    """The shuffling Generator of device ``device`` (its index in the fleet) in round ``round_id``."""
    return np.random.default_rng([seed, _TRAIN, device, round_id])


def device_noise_rng(seed: int, device: int, round_id: int) -> np.random.Generator:
    """The Generator of the noise device ``device`` adds to its update in round ``round_id`` (local DP)."""
    return np.random.default_rng([seed, _DEVICE_NOISE, device, round_id])


def local_only_rng(seed: int, device: int) -> np.random.Generator:
    """The shuffling Generator of device ``device``'s local-only head (fitted once)."""
    return np.random.default_rng([seed, _LOCAL_ONLY, device, 0])


def ditto_rng(seed: int, device: int, round_id: int) -> np.random.Generator:
    """The shuffling Generator of device ``device``'s ditto personal head in round ``round_id``."""
    return np.random.default_rng([seed, _DITTO, device, round_id])


def hub_noise_rng(seed: int, round_id: int) -> np.random.Generator:
    """The Generator of the noise the hub adds to round ``round_id``'s sum (central DP)."""
    return np.random.default_rng([seed, _HUB_NOISE, round_id, 0])


@dataclass(frozen=True)
class SimSettings:
    """One simulation: the fleet size and rounds, the demo hub's round settings, and the DP parameters
    (``dp`` None = no DP; ``target_epsilon`` is only recorded: ``dp.noise_multiplier`` is what runs;
    ``amplification`` is the hub's ``[privacy] amplification``: count central rounds as Poisson-subsampled).

    Transfer quality (defaults keep a plain run as before; the command line uses the agent's and hub's defaults):
    ``validation_fraction`` (agent 0.2; 0 = no split, no federated evaluation), ``local_only_epochs`` (agent 10),
    ``personalization`` ``finetune`` | ``ditto`` with ``ditto_mu`` (agent 0.1), ``deploy_tolerance`` (hub 0.05;
    None = no deploy gate)."""

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
    validation_fraction: float = 0.0
    local_only_epochs: int = 10
    personalization: str = "finetune"
    ditto_mu: float = 0.1
    deploy_tolerance: float | None = None

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
        if not 0 <= self.validation_fraction < 1:
            raise ConfigError("validation_fraction", f"must be in [0, 1), got {self.validation_fraction}")
        if self.local_only_epochs < 1:
            raise ConfigError("local_only_epochs", f"must be >= 1, got {self.local_only_epochs}")
        if self.personalization not in PERSONALIZATIONS:
            raise ConfigError("personalization", f"must be finetune or ditto, got {self.personalization!r}")
        if not (math.isfinite(self.ditto_mu) and self.ditto_mu >= 0):
            raise ConfigError("ditto_mu", f"must be a number >= 0, got {self.ditto_mu}")
        if self.deploy_tolerance is not None and not (math.isfinite(self.deploy_tolerance)
                                                      and self.deploy_tolerance >= 0):
            raise ConfigError("deploy_tolerance", f"must be a number >= 0, got {self.deploy_tolerance}")
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
    features and labels, and the hub's evaluator on ``eval.npz``. ``keys``: each device's data sha256 (what the
    agent keys its validation split on); ``cache``: per-fleet memo of the local-only heads."""

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
    keys: tuple[str, ...] = ()
    cache: dict[Any, Any] = field(default_factory=dict, repr=False)

    @property
    def devices(self) -> int:
        return len(self.names)

    def score(self, head: Head) -> tuple[float, float]:
        """(loss, accuracy) of ``head`` on the hub's eval set, by the hub's own evaluator."""
        result = self.evaluator(self.paths.artifacts, self.backbone_sha256, head)
        if result is None:
            raise FedgeError(f"no hub eval data at {self.paths.data / 'eval.npz'}")
        return float(result.loss), float(result.accuracy)

    def split(self, i: int, fraction: float) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """Device ``i``'s ``(train, validation)`` rows, as the agent splits its data (``split_indices``)."""
        return split_indices(len(self.labels[i]), fraction, self.keys[i])


Shard = tuple[NDArray[np.float32], NDArray[np.int64]]


def content_key(x: NDArray[Any], y: NDArray[Any]) -> str:
    """sha256 of a shard's arrays (the split key of shards that have no file)."""
    h = hashlib.sha256(np.ascontiguousarray(x, dtype=np.float32).tobytes())
    h.update(np.ascontiguousarray(y, dtype=np.int64).tobytes())
    return h.hexdigest()


def _device_data(paths: DemoPaths, devices: int, seed: int, quiet: bool
                 ) -> tuple[dict[str, Any], list[Shard], list[str]]:
    """The demo's device shards for ``devices`` devices (``demo.prepare``: pre-trains and exports on first use),
    with their data keys (the shard file's sha256, as the agent's ``load_local`` gives it).

    ``demo.prepare`` gives every device at least 10 samples; past that (more than 1,200 devices on
    Fashion-MNIST's 12,000 held-back images) the shards are made here with the same recipe, the pool split evenly
    (``size_per_device`` = pool // devices, at least 1)."""
    from fedge.runtime.data import load_local

    try:
        info = prepare(paths, devices, seed, quiet)
    except ConfigError as exc:
        if exc.field not in ("size_per_device", "devices"):
            raise
        info = prepare(paths, 1, seed, quiet)  # source model, artifacts and eval set; the shards follow
        small = _small_shards(devices, seed)
        return info, small, [content_key(x, y) for x, y in small]
    shards: list[Shard] = []
    keys = []
    for f in info["device_files"]:
        local = load_local(f)
        shards.append((local.x, np.asarray(local.y, dtype=np.int64)))
        keys.append(local.sha256)
    return info, shards, keys


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
    if devices < 1:
        raise ConfigError("devices", f"must be >= 1, got {devices}")
    t0 = time.perf_counter()
    info, shards, keys = _device_data(paths, devices, seed, quiet)
    return fleet_from_shards(paths, info, shards, keys, backend=backend, prepare_seconds=time.perf_counter() - t0)


def fleet_from_shards(paths: DemoPaths, info: dict[str, Any], shards: list[Shard], keys: list[str] | None = None,
                      *, backend: str = "auto", prepare_seconds: float = 0.0) -> SimFleet:
    """A fleet over any task: exported artifacts in ``paths.artifacts``, the hub's held-out set in
    ``paths.data / "eval.npz"``, one ``(x, y)`` shard per device (``keys``: their data sha256, by default of
    the arrays). ``info`` needs ``dataset``, ``model`` and ``num_classes`` (the report's)."""
    from fedge.protocol.manifest import load_head, load_manifest
    from fedge.runtime.trainers import open_trainer

    t1 = time.perf_counter()
    trainer = open_trainer(paths.artifacts, backend)
    manifest = load_manifest(paths.artifacts)
    sizes = [len(y) for _, y in shards]
    if not sizes or min(sizes) < 1:
        raise FedgeError("a device shard is empty")
    if keys is None:
        keys = [content_key(x, y) for x, y in shards]
    if len(keys) != len(shards):
        raise ConfigError("keys", f"{len(keys)} keys for {len(shards)} shards")
    shape = manifest.input.shape
    all_x = np.concatenate([np.asarray(x, dtype=np.float32) for x, _ in shards])
    all_feats = trainer.features(all_x.reshape((all_x.shape[0], *shape)))
    cuts = np.cumsum(sizes)[:-1]
    feats = [np.ascontiguousarray(f) for f in np.split(all_feats, cuts)]
    evaluator = Evaluator(paths.data / "eval.npz", trainer.name)
    fleet = SimFleet(
        paths=paths, info=info, trainer=trainer, w0=load_head(paths.artifacts),
        names=tuple(f"device-{i:02d}" for i in range(len(shards))), feats=feats,
        labels=[np.asarray(y, dtype=np.int64) for _, y in shards],
        evaluator=evaluator, backbone_sha256=manifest.backbone_sha256, source_accuracy=math.nan,
        prepare_seconds=prepare_seconds, features_seconds=0.0, keys=tuple(keys),
    )
    fleet.source_accuracy = fleet.score(fleet.w0)[1]  # also computes the eval features once
    fleet.features_seconds = time.perf_counter() - t1
    return fleet


# -- the rounds ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SimRun:
    """The rounds of one run (as the hub's round results, ``federated`` holding the federated evaluation), the
    median update norm of each round (before clipping; None for a round nobody took part in), whether each round's
    version was deployed (the deploy gate), the final deployed global head, the devices' personal and local-only
    heads (None where a device has none), the federated scores of the final heads on every device's validation
    data (``final``: source, global = the deployed head, personal, local_only; empty without evaluation) and the
    rounds' wall time."""

    results: list[RoundResult]
    update_norms: list[float | None]
    head: Head
    seconds: float
    deployed: list[bool] = field(default_factory=list)
    personal: list[Head | None] = field(default_factory=list)
    local_only: list[Head | None] = field(default_factory=list)
    final: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class _Split:
    """Every device's training rows and validation rows (features and labels)."""

    train_f: list[F32]
    train_y: list[NDArray[np.int64]]
    val_f: list[F32]
    val_y: list[NDArray[np.int64]]


def _split_fleet(fleet: SimFleet, fraction: float) -> _Split:
    key = ("split", fraction)
    if key not in fleet.cache:
        parts: tuple[list[Any], list[Any], list[Any], list[Any]] = ([], [], [], [])
        for i in range(fleet.devices):
            tr, va = fleet.split(i, fraction)
            f, y = fleet.feats[i], fleet.labels[i]
            for out, value in zip(parts, (f[tr], y[tr], f[va], y[va]), strict=True):
                out.append(np.ascontiguousarray(value))
        fleet.cache[key] = _Split(*parts)
    split: _Split = fleet.cache[key]
    return split


def _local_only_heads(fleet: SimFleet, settings: SimSettings, split: _Split) -> list[Head | None]:
    """Each device's local-only head (w0 fitted on its train split for ``local_only_epochs``, as
    ``evaluation.local_only_head`` does), for the devices with validation data; computed once per fleet and
    settings."""
    key = ("local_only", settings.validation_fraction, settings.local_only_epochs, settings.lr, settings.seed)
    if key not in fleet.cache:
        heads: list[Head | None] = []
        trainer = fleet.trainer
        for i in range(fleet.devices):
            if len(split.val_y[i]) == 0:
                heads.append(None)
                continue
            trainer.set_head(fleet.w0)
            fit(trainer, split.train_f[i], split.train_y[i], settings.local_only_epochs, settings.lr,
                local_only_rng(settings.seed, i))
            heads.append({k: np.asarray(v, dtype=np.float32) for k, v in trainer.get_head().items()})
        fleet.cache[key] = heads
    local: list[Head | None] = fleet.cache[key]
    return local


def _scores(prefix: str, logits: NDArray[np.floating], y: NDArray[np.int64]) -> dict[str, float]:
    s = score(logits, y)
    return {f"val_acc_{prefix}": float(s.accuracy), f"val_loss_{prefix}": float(s.loss)}


def _train_device(fleet: SimFleet, i: int, global_head: Head, settings: SimSettings, rid: int, split: _Split
                  ) -> tuple[Head, dict[str, F32], int, float]:
    """What device ``i`` computes in round ``rid`` (the agent's ``_run_round`` without the wire): the head it
    trained on its train split, its update, the sample count it reports (1 under DP, as the agent sends), and its
    update's norm before clipping."""
    trainer = fleet.trainer
    feats, y = split.train_f[i], split.train_y[i]
    trainer.set_head(global_head)
    fit(trainer, feats, y, settings.local_epochs, settings.lr, train_rng(settings.seed, i, rid))
    trained = {k: np.asarray(v, dtype=np.float32) for k, v in trainer.get_head().items()}
    delta = {k: (trained[k] - global_head[k]).astype(np.float32) for k in global_head}
    if settings.dp is None:
        return trained, delta, len(y), l2_norm(delta)
    private, norm = privatize(delta, settings.dp, device_noise_rng(settings.seed, i, rid))
    return trained, private, 1, norm


def _personal_head(fleet: SimFleet, i: int, trained: Head, global_head: Head, previous: Head | None,
                   settings: SimSettings, rid: int, split: _Split) -> Head:
    """The agent's ``_personal_head``: ``finetune`` keeps the trained head; ``ditto`` fits the previous personal
    head (or the global one) on the train split with a pull ``ditto_mu * ||v - global||^2``."""
    if settings.personalization != "ditto":
        return trained
    trainer = fleet.trainer
    trainer.set_head(global_head if previous is None else previous)
    fit(trainer, split.train_f[i], split.train_y[i], settings.local_epochs, settings.lr,
        ditto_rng(settings.seed, i, rid), prox=Prox(global_head, settings.ditto_mu))
    return {k: np.asarray(v, dtype=np.float32) for k, v in trainer.get_head().items()}


class _FedEval:
    """Federated evaluation on the devices' validation rows with the NumPy head forward: the source and
    local-only scores of a device are fixed (computed once), the global head is scored once per round on every
    validation row at once."""

    def __init__(self, fleet: SimFleet, split: _Split, local_only: list[Head | None]) -> None:
        self.split = split
        self.local_only = local_only
        self.have = [len(y) > 0 and local_only[i] is not None for i, y in enumerate(split.val_y)]
        self.rows = [i for i, ok in enumerate(self.have) if ok]
        self.fixed: dict[int, dict[str, float]] = {}
        sizes = [len(split.val_y[i]) for i in self.rows]
        self.cuts = np.cumsum(sizes)[:-1]
        self.all_f = np.concatenate([split.val_f[i] for i in self.rows]) if self.rows else None
        self.w0 = fleet.w0
        self._global: dict[int, NDArray[np.floating]] = {}

    def set_global(self, head: Head) -> None:
        self._global = {}
        if self.all_f is not None:
            logits = head_forward(head, self.all_f)
            self._global = dict(zip(self.rows, np.split(logits, self.cuts), strict=True))

    def base(self, i: int) -> dict[str, float]:
        """``val_n`` and the fixed scores (source, local_only) of device ``i``."""
        if i not in self.fixed:
            f, y = self.split.val_f[i], self.split.val_y[i]
            local = self.local_only[i]
            if local is None:
                raise FedgeError(f"device {i} has no local-only head")
            self.fixed[i] = {"val_n": float(len(y)), **_scores("source", head_forward(self.w0, f), y),
                             **_scores("local_only", head_forward(local, f), y)}
        return self.fixed[i]

    def device(self, i: int, trained: Head, personal: Head) -> dict[str, float]:
        """The ``val_*`` metrics device ``i`` sends with its update (``evaluation.head_scores``' keys)."""
        f, y = self.split.val_f[i], self.split.val_y[i]
        out = dict(self.base(i))
        out.update(_scores("global", self._global[i], y))
        trained_scores = _scores("trained", head_forward(trained, f), y)
        out.update(trained_scores)
        if personal is trained:
            out.update({k.replace("_trained", "_personal"): v for k, v in trained_scores.items()})
        else:
            out.update(_scores("personal", head_forward(personal, f), y))
        return out

    def final(self, head: Head, personal: list[Head | None]) -> dict[str, float]:
        """Federated scores of the deployed ``head`` and each device's last personal head (the deployed head
        where a device never trained) on every device's validation data."""
        self.set_global(head)
        rows = []
        for i in self.rows:
            y = self.split.val_y[i]
            own = personal[i]
            m = dict(self.base(i))
            m.update(_scores("global", self._global[i], y))
            m.update(_scores("personal", self._global[i] if own is None else head_forward(own, self.split.val_f[i]),
                             y))
            rows.append(m)
        return federated_scores(rows)


def run_rounds(fleet: SimFleet, settings: SimSettings, *, start: Head | None = None) -> SimRun:
    """``settings.rounds`` rounds over ``fleet``, as the agents and the hub run them, from the deployed head
    ``start`` (default the source head w0; scored on the eval set as the deployed version the gate compares with;
    the proximal pull is toward w0 either way)."""
    from fedge.core.strategies import Aggregator, DpAggregator, make_strategy
    from fedge.hub.rounds import poisson_select, select_devices

    if settings.devices != fleet.devices:
        raise ConfigError("devices", f"the fleet has {fleet.devices} devices, the settings {settings.devices}")
    index = {name: i for i, name in enumerate(fleet.names)}
    shapes = {k: tuple(v.shape) for k, v in fleet.w0.items()}
    strategy = make_strategy("fedavg", settings.proximal_lambda)
    event = settings.event()
    spent: list[DpEvent] = []  # the ledger: one event per announced DP round
    t_start = time.perf_counter()
    split = _split_fleet(fleet, settings.validation_fraction)
    fed: _FedEval | None = None
    local_only: list[Head | None] = [None] * fleet.devices
    if settings.validation_fraction > 0 and settings.dp is None:
        local_only = _local_only_heads(fleet, settings, split)
        fed = _FedEval(fleet, split, local_only)
    personal: list[Head | None] = [None] * fleet.devices
    global_head: Head = {k: np.asarray(v, dtype=np.float32).copy() for k, v in (start or fleet.w0).items()}
    deployed_acc = fleet.source_accuracy if start is None else fleet.score(global_head)[1]
    results: list[RoundResult] = []
    deployed: list[bool] = []
    norms_per_round: list[float | None] = []
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
        evaluating = fed is not None and settings.dp is None  # never under DP: it describes the local data
        if evaluating and fed is not None:
            fed.set_global(global_head)
        norms: list[float] = []
        metrics: list[dict[str, float]] = []
        declined: list[str] = []
        n_samples = 0
        for name in selected:
            i = index[name]
            trained, delta, n, norm = _train_device(fleet, i, global_head, settings, rid, split)
            if not all(np.isfinite(v).all() for v in delta.values()):  # the agent declines a diverged round
                declined.append(name)
                continue
            own = _personal_head(fleet, i, trained, global_head, personal[i], settings, rid, split)
            personal[i] = own
            if evaluating and fed is not None and fed.have[i]:
                metrics.append(fed.device(i, trained, own))
            agg.add(delta, n)
            norms.append(norm)
            n_samples += n
        acc = loss = None
        detail = None
        if selected and event is not None:  # an empty Poisson cohort is not announced and spends nothing
            spent.append(event)
        made = False
        if agg.count >= 1:  # quorum: one device (the simulated hub's min_devices)
            candidate = agg.result(global_head, fleet.w0)
            if all(np.isfinite(a).all() for a in candidate.values()):
                loss, acc = fleet.score(candidate)
                tol = settings.deploy_tolerance
                if tol is not None and acc < deployed_acc - tol:  # the hub's deploy gate
                    detail = (f"sim-{rid} kept as a candidate, not deployed: held-out accuracy {acc:.4f} is below "
                              f"the deployed version's {deployed_acc:.4f} by more than {tol:g}")
                else:
                    global_head, deployed_acc, made = candidate, acc, True
            else:
                detail = "the aggregate is not finite: no version registered"
        status = RoundStatus.COMPLETED if acc is not None else RoundStatus.FAILED_QUORUM
        eps = None if event is None else epsilon(spent, settings.delta)
        results.append(RoundResult(
            fleet=FLEET, round=rid, status=status, model_version=f"sim-{rid}" if acc is not None else None,
            accuracy=acc, loss=loss, devices=tuple(n for n in selected if n not in declined), n_samples=n_samples,
            rejected=0, seconds=time.perf_counter() - t0, detail=detail, declined=tuple(declined), epsilon=eps,
            federated=federated_scores(metrics),
        ))
        deployed.append(made)
        norms_per_round.append(statistics.median(norms) if norms else None)
    final = fed.final(global_head, personal) if fed is not None and settings.dp is None else {}
    return SimRun(results, norms_per_round, global_head, time.perf_counter() - t_start, deployed, personal,
                  local_only, final)


# -- report --------------------------------------------------------------------------------------------------------


def _r(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(x, digits)


def build_sim_report(fleet: SimFleet, settings: SimSettings, run: SimRun) -> dict[str, Any]:
    """The demo's report (``demo.build_report``: rounds, source/final accuracy, passed ...) plus each round's
    epsilon and median update norm, the DP settings and the timings."""
    report = build_report(fleet.info, settings.devices, fleet.source_accuracy, run.results, fleet.paths)
    for entry, res, norm, made in zip(report["rounds"], run.results, run.update_norms, run.deployed, strict=True):
        entry["epsilon"] = _r(res.epsilon)
        entry["update_norm_median"] = _r(norm, 5)
        entry["deployed"] = made
        if res.detail is not None:
            entry["detail"] = res.detail
        if res.declined:
            entry["declined"] = len(res.declined)
    deployed_acc = next((r.accuracy for r, made in zip(reversed(run.results), reversed(run.deployed), strict=True)
                         if made), fleet.source_accuracy)
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
        validation_fraction=settings.validation_fraction, local_only_epochs=settings.local_only_epochs,
        personalization=settings.personalization,
        ditto_mu=settings.ditto_mu if settings.personalization == "ditto" else None,
        deploy_gate=settings.deploy_tolerance is not None, deploy_tolerance=settings.deploy_tolerance,
        deployed_accuracy=_r(deployed_acc),
        final_federated={k[len("val_acc_"):]: v for k, v in run.final.items() if k.startswith("val_acc_")},
        final_val_n=int(run.final.get("val_n", 0)),
        prepare_seconds=round(fleet.prepare_seconds, 3), features_seconds=round(fleet.features_seconds, 3),
        rounds_seconds=round(run.seconds, 3),
    )
    return report


def _cell(x: float | None, width: int = 8) -> str:
    return f"{x:{width}.3f}" if x is not None else f"{'-':>{width}}"


def _table_row(res: RoundResult, made: bool) -> str:
    acc = f"{res.accuracy:8.3f}" if res.accuracy is not None else f"{'failed':>8}"
    fed = res.federated
    cells = "  ".join(_cell(fed.get(f"val_acc_{h}")) for h in ("source", "local_only", "global", "personal"))
    deployed = "yes" if made else ("kept" if res.accuracy is not None else "-")
    return (f"{res.round:>5}  {len(res.devices):>7}  {acc}  {deployed:>8}  {cells}  {res.seconds:7.2f}  "
            f"{_cell(res.epsilon)}")


def _print_table(report: dict[str, Any], run: SimRun) -> None:
    print("\n(held-out: the hub's eval set; src, local, global, personal: federated, on the devices' validation data)")
    print(f"{'round':>5}  {'devices':>7}  {'held-out':>8}  {'deployed':>8}  {'src':>8}  {'local':>8}  {'global':>8}  "
          f"{'personal':>8}  {'seconds':>7}  {'epsilon':>8}")
    print(f"{'src':>5}  {'-':>7}  {report['source_accuracy']:8.3f}  {'-':>8}  " + "  ".join([f"{'-':>8}"] * 4)
          + f"  {'-':>7}  {'-':>8}")
    for res, made in zip(run.results, run.deployed, strict=True):
        print(_table_row(res, made))
    if run.final:
        fin = report["final_federated"]
        print(f"{'final':>5}  {'-':>7}  {report['deployed_accuracy']:8.3f}  {'-':>8}  "
              + "  ".join(_cell(fin.get(h)) for h in ("source", "local_only", "global", "personal")))
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
                 plot: bool = True, candidates: dict[str, Path] | None = None) -> int:
    """``fedge simulate``: prepare (or reuse) the demo task in ``out``, run the rounds, write ``report.json`` (and
    the plot), print a table or one JSON object. 0 when the final model beats the source model and chance."""
    from fedge.demo import _plot

    paths = DemoPaths(Path(out).resolve())
    if not as_json:
        print(f"preparing {settings.devices} devices in {paths.root}", flush=True)
    selection = None
    if candidates:  # a selection round first (fedge.simulate_selection); the rounds start from the winner
        from fedge.simulate_selection import select_and_load

        selection, fleet = select_and_load(paths, settings, candidates, backend=backend, quiet=as_json)
    else:
        fleet = load_fleet(paths, settings.devices, settings.seed, backend=backend, quiet=as_json)
    run = run_rounds(fleet, settings)
    report = build_sim_report(fleet, settings, run)
    if selection is not None:
        report["selection"] = selection.as_dict()
    paths.report.write_text(json.dumps(report, indent=2) + "\n")
    if plot:
        _plot(report, paths.plot)
    if as_json:
        print(json.dumps(report))
    else:
        _print_table(report, run)
        if selection is not None:
            print("selection: " + ", ".join(f"{c.name} {c.accuracy:.4f}" for c in selection.ranking)
                  + f" -> {selection.winner} (rounds ran from its w0)")
    return 0 if report["passed"] else 1


def settings_from_args(devices: int, rounds: int, seed: int, *, dp_mode: str, noise_multiplier: float | None,
                       target_epsilon: float | None, clip: float, sample_rate: float, delta: float,
                       local_epochs: int, lr: float, proximal_lambda: float, fraction: float,
                       amplification: bool = False, validation_fraction: float = 0.0, local_only_epochs: int = 10,
                       personalization: str = "finetune", ditto_mu: float = 0.1,
                       deploy_tolerance: float | None = None) -> SimSettings:
    """The settings of ``fedge simulate``'s command line (the noise multiplier resolved from ``--epsilon``)."""
    if amplification and dp_mode != "central":
        raise ConfigError("amplification", "applies to --dp-mode central only")
    dp = resolve_dp(dp_mode, noise_multiplier=noise_multiplier, target_epsilon=target_epsilon, clip=clip,
                    sample_rate=sample_rate, delta=delta, rounds=rounds, amplification=amplification)
    return SimSettings(devices=devices, rounds=rounds, seed=seed, local_epochs=local_epochs, lr=lr,
                       proximal_lambda=proximal_lambda, fraction=fraction, dp=dp, delta=delta,
                       target_epsilon=target_epsilon if dp is not None else None, amplification=amplification,
                       validation_fraction=validation_fraction, local_only_epochs=local_only_epochs,
                       personalization=personalization, ditto_mu=ditto_mu, deploy_tolerance=deploy_tolerance)
