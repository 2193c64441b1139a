"""The simulator's fleet: settings, the demo task's device shards, their cached backbone features, the hub's
evaluator, and the Generators every virtual device and the simulated hub draw from.

Each virtual device ``i`` is an agent with ``seed = device_seed(settings.seed, i)``: its shuffles, its ditto and
local-only heads come from the round core's Generators for that seed (:mod:`fedge.core.device`), exactly as an
agent configured with that seed draws them. Only the DP noise differs: an agent draws it from the operating system,
a virtual device from :func:`device_noise_rng` (so that a run is a pure function of its settings).
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedge.core import device as core_device
from fedge.core.evaluation import split_indices
from fedge.core.privacy import DpEvent, DpParams, event_for, noise_for_epsilon
from fedge.core.trainer import Trainer
from fedge.demo import DemoPaths, prepare
from fedge.protocol.errors import ConfigError, FedgeError
from fedge.protocol.types import F32, Head
from fedge.runtime.evaluate import Evaluator

__all__ = [
    "PERSONALIZATIONS",
    "Shard",
    "SimFleet",
    "SimSettings",
    "content_key",
    "device_data",
    "device_noise_rng",
    "device_seed",
    "ditto_rng",
    "fleet_from_shards",
    "hub_noise_rng",
    "load_fleet",
    "local_only_rng",
    "resolve_dp",
    "small_shards",
    "stratified_cap",
    "train_rng",
]

FLEET = "sim"
# Seed-sequence tags of the simulator's own streams (the devices' training streams are the round core's)
_DEVICE_SEED, _DEVICE_NOISE, _HUB_NOISE = 0x5EED_0001, 0x5EED_0002, 0x5EED_0003
PERSONALIZATIONS = ("auto", "finetune", "ditto")


def device_seed(seed: int, device: int) -> int:
    """The agent ``seed`` of virtual device ``device`` (its index in the fleet) in a run seeded ``seed``: a fleet of
    agents configured with these seeds draws the same shuffles as the simulator."""
    return int(np.random.SeedSequence([seed, _DEVICE_SEED, device]).generate_state(1, np.uint32)[0])


def train_rng(seed: int, device: int, round_id: int) -> np.random.Generator:
    """The shuffling Generator of device ``device`` in round ``round_id`` (the round core's, for its seed)."""
    return core_device.train_rng(device_seed(seed, device), round_id)


def local_only_rng(seed: int, device: int) -> np.random.Generator:
    """The shuffling Generator of device ``device``'s local-only head (fitted once)."""
    return core_device.local_only_rng(device_seed(seed, device))


def ditto_rng(seed: int, device: int, round_id: int) -> np.random.Generator:
    """The shuffling Generator of device ``device``'s ditto personal head in round ``round_id``."""
    return core_device.ditto_rng(device_seed(seed, device), round_id)


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
    ``amplification`` is the hub's ``[privacy] amplification``: count central rounds as Poisson-subsampled).

    Transfer quality (defaults keep a plain run as before; the command line uses the agent's and hub's defaults):
    ``validation_fraction`` (agent 0.2; 0 = no split, no federated evaluation), ``local_only_epochs`` (agent 20:
    the epochs budget of the local-only and personal heads), ``personalization`` ``auto`` | ``finetune`` |
    ``ditto`` with ``ditto_mu`` (agent 0.1), ``deploy_tolerance`` (hub 0.01; None = no deploy gate);
    ``samples_per_device`` caps every device's training rows (None: the whole shard)."""

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
    samples_per_device: int | None = None
    compression: str | None = None

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
            raise ConfigError("personalization", f"must be auto, finetune or ditto, got {self.personalization!r}")
        if self.compression not in (None, "int8", "int4"):
            raise ConfigError("compression", f"must be int8 or int4, got {self.compression!r}")
        if self.samples_per_device is not None and self.samples_per_device < 1:
            raise ConfigError("samples_per_device", f"must be >= 1, got {self.samples_per_device}")
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


def device_data(paths: DemoPaths, devices: int, seed: int, quiet: bool
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
        small = small_shards(devices, seed)
        return info, small, [content_key(x, y) for x, y in small]
    shards: list[Shard] = []
    keys = []
    for f in info["device_files"]:
        local = load_local(f)
        shards.append((local.x, np.asarray(local.y, dtype=np.int64)))
        keys.append(local.sha256)
    return info, shards, keys


def small_shards(devices: int, seed: int) -> list[tuple[NDArray[np.float32], NDArray[np.int64]]]:
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


def stratified_cap(x: NDArray[Any], y: NDArray[Any], rows: int, rng: np.random.Generator
                   ) -> tuple[NDArray[Any], NDArray[Any]]:
    """At most ``rows`` rows of ``(x, y)``, each label keeping its share (largest remainders), drawn with ``rng``;
    the rows keep their original order."""
    n = len(y)
    if rows >= n:
        return x, y
    labels, counts = np.unique(y, return_counts=True)
    quota = counts * rows / n
    take = np.floor(quota).astype(int)
    for i in np.argsort(-(quota - take), kind="stable")[: rows - int(take.sum())]:
        take[i] += 1
    keep = np.concatenate([rng.choice(np.flatnonzero(y == c), size=k, replace=False)
                           for c, k in zip(labels, take, strict=True) if k])
    keep.sort()
    return x[keep], y[keep]


def load_fleet(paths: DemoPaths, devices: int, seed: int = 0, *, backend: str = "auto", quiet: bool = True,
               samples_per_device: int | None = None, validation_fraction: float = 0.0) -> SimFleet:
    """Prepare the demo task in ``paths`` (reusing its source model and artifacts) and cache every device's
    backbone features. ``samples_per_device``: cap every device at that many training rows (stratified, seeded),
    plus the rows its ``validation_fraction`` holds out."""
    if devices < 1:
        raise ConfigError("devices", f"must be >= 1, got {devices}")
    t0 = time.perf_counter()
    info, shards, keys = device_data(paths, devices, seed, quiet)
    if samples_per_device is not None:
        if samples_per_device < 1:
            raise ConfigError("samples_per_device", f"must be >= 1, got {samples_per_device}")
        rows = samples_per_device + round(samples_per_device * validation_fraction / (1 - validation_fraction))
        shards = [stratified_cap(x, y, rows, np.random.default_rng([seed, 0x5EED_0007, i]))
                  for i, (x, y) in enumerate(shards)]
        keys = [content_key(x, y) for x, y in shards]
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
    # one call per device, as each agent computes its own features (a backbone's results may depend on the batch)
    feats = [np.ascontiguousarray(trainer.features(np.asarray(x, dtype=np.float32).reshape((len(x), *shape))))
             for x, _ in shards]
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


