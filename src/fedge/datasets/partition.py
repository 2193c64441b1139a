"""Non-IID device shards: Dirichlet label skew plus a per-device domain shift.

Every function is deterministic given its ``seed`` / ``np.random.Generator``. Files are written
with ``np.savez`` (no pickle): ``device-00.npz`` ... with arrays ``x`` and ``y``, ``partitions.json``
describing each device, and ``eval.npz`` (the hub's held-out set in the base domain).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import NDArray

from fedge.datasets.shifts import Shift
from fedge.datasets.source import Dataset, load_source
from fedge.protocol.errors import ConfigError
from fedge.protocol.fsio import PUBLIC_FILE, atomic_writer

__all__ = [
    "DeviceShard",
    "Jitter",
    "dirichlet_partition",
    "make_device_shards",
    "make_eval_set",
    "run_partition",
    "write_npz",
    "write_partitions",
]

IntArray = NDArray[np.int64]


class DeviceShard(NamedTuple):
    """One device's local data: its samples, labels and the domain shift applied to them."""

    x: NDArray[np.float32]
    y: NDArray[np.int64]
    shift: Shift


@dataclass(frozen=True)
class Jitter:
    """Per-device variation around the base shift.

    rotation: base ± U(0, rotation_deg) (images only); contrast: base × U(contrast_low, contrast_high);
    noise: base + U(0, noise_sigma).
    """

    rotation_deg: float = 15.0
    contrast_low: float = 0.6
    contrast_high: float = 1.0
    noise_sigma: float = 0.03

    def __post_init__(self) -> None:
        if not (0 <= self.contrast_low <= self.contrast_high):
            raise ConfigError(
                "jitter.contrast", f"need 0 <= low <= high, got {self.contrast_low}, {self.contrast_high}"
            )
        if self.rotation_deg < 0 or self.noise_sigma < 0:
            raise ConfigError("jitter", "rotation_deg and noise_sigma must be >= 0")

    def draw(self, base: Shift, rng: np.random.Generator, images: bool) -> Shift:
        rot = base.rotation_deg + (float(rng.uniform(-self.rotation_deg, self.rotation_deg)) if images else 0.0)
        con = base.contrast * float(rng.uniform(self.contrast_low, self.contrast_high))
        noise = base.noise_sigma + float(rng.uniform(0.0, self.noise_sigma))
        return Shift(
            rotation_deg=round(rot, 3), contrast=round(con, 4), noise_sigma=round(noise, 4), invert=base.invert
        )


NO_JITTER = Jitter(0.0, 1.0, 1.0, 0.0)


def _check_args(n_labels: int, n_devices: int, alpha: float, min_per_device: int) -> None:
    if n_devices < 1:
        raise ConfigError("devices", f"must be >= 1, got {n_devices}")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ConfigError("alpha", f"must be a finite number > 0, got {alpha}")
    if min_per_device < 0:
        raise ConfigError("min_per_device", f"must be >= 0, got {min_per_device}")
    if n_devices * min_per_device > n_labels:
        raise ConfigError(
            "devices", f"{n_devices} devices x {min_per_device} samples need more than the {n_labels} available"
        )


def dirichlet_partition(
    y: NDArray[Any],
    n_devices: int,
    alpha: float,
    rng: np.random.Generator,
    min_per_device: int = 10,
    size_per_device: int | None = None,
) -> list[IntArray]:
    """Split sample indices across devices with Dirichlet(alpha) label skew (small alpha = more skew).

    Without ``size_per_device``: each class is split across devices by Dir(alpha) proportions, so
    every sample is used exactly once; devices below ``min_per_device`` then take random samples
    from the largest devices. With ``size_per_device``: each device draws its own label mix
    Dir(alpha) and exactly that many samples, without replacement across devices.
    Indices in each returned array are sorted; no index appears twice.
    """
    y = np.asarray(y)
    if y.ndim != 1:
        raise ConfigError("y", f"labels must be 1-D, got shape {y.shape}")
    if size_per_device is not None:
        if size_per_device < max(1, min_per_device):
            raise ConfigError("size_per_device", f"must be >= max(1, min_per_device), got {size_per_device}")
        _check_args(len(y), n_devices, alpha, size_per_device)
        return _fixed_size_partition(y, n_devices, alpha, rng, size_per_device)
    _check_args(len(y), n_devices, alpha, min_per_device)
    shards: list[list[IntArray]] = [[] for _ in range(n_devices)]
    for label in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == label))
        props = rng.dirichlet(np.full(n_devices, alpha))
        cuts = (np.cumsum(props)[:-1] * len(idx)).astype(np.int64)
        for d, part in enumerate(np.split(idx, cuts)):
            shards[d].append(part.astype(np.int64))
    parts = [np.concatenate(s) if s else np.zeros(0, np.int64) for s in shards]
    parts = _enforce_min(parts, min_per_device, rng)
    return [np.sort(p) for p in parts]


def _enforce_min(parts: list[IntArray], min_per_device: int, rng: np.random.Generator) -> list[IntArray]:
    parts = [p.copy() for p in parts]
    for d in range(len(parts)):
        while len(parts[d]) < min_per_device:
            donor = int(np.argmax([len(p) for p in parts]))
            spare = len(parts[donor]) - min_per_device
            take = min(min_per_device - len(parts[d]), spare)
            if donor == d or take <= 0:  # cannot happen after _check_args; guard against loops
                raise ConfigError("min_per_device", "not enough samples to give every device its minimum")
            pick = rng.choice(len(parts[donor]), size=take, replace=False)
            keep = np.ones(len(parts[donor]), dtype=bool)
            keep[pick] = False
            parts[d] = np.concatenate([parts[d], parts[donor][pick]])
            parts[donor] = parts[donor][keep]
    return parts


def _fixed_size_partition(
    y: NDArray[Any], n_devices: int, alpha: float, rng: np.random.Generator, size: int
) -> list[IntArray]:
    labels = np.unique(y)
    pools = [list(rng.permutation(np.flatnonzero(y == lab))) for lab in labels]
    out: list[IntArray] = []
    for _ in range(n_devices):
        mix = rng.dirichlet(np.full(len(labels), alpha))
        counts = rng.multinomial(size, mix)
        # classes that ran out hand their excess to the others, by the device's own mix
        avail = np.array([len(p) for p in pools])
        counts = np.minimum(counts, avail)
        while counts.sum() < size:
            room = avail - counts
            weights = np.where(room > 0, mix + 1e-12, 0.0)
            k = int(rng.choice(len(labels), p=weights / weights.sum()))
            counts[k] += 1
        taken = [np.asarray(pools[k][: counts[k]], dtype=np.int64) for k in range(len(labels))]
        pools = [pools[k][counts[k] :] for k in range(len(labels))]
        out.append(np.sort(np.concatenate(taken)))
    return out


def make_device_shards(
    dataset: Dataset,
    n_devices: int,
    alpha: float,
    seed: int,
    base_shift: Shift,
    jitter: Jitter = Jitter(),
    *,
    min_per_device: int = 10,
    size_per_device: int | None = None,
) -> list[DeviceShard]:
    """Partition ``dataset``'s train split and shift each device's data (base shift + own jitter)."""
    part_rng = np.random.default_rng([seed, 0])
    indices = dirichlet_partition(dataset.y_train, n_devices, alpha, part_rng, min_per_device, size_per_device)
    shards: list[DeviceShard] = []
    for d, idx in enumerate(indices):
        dev_rng = np.random.default_rng([seed, 1, d])
        shift = jitter.draw(base_shift, dev_rng, images=dataset.x_train.ndim == 4)
        x = shift.apply(dataset.x_train[idx], dev_rng)
        shards.append(DeviceShard(x, dataset.y_train[idx].astype(np.int64), shift))
    return shards


def write_npz(path: str | Path, x: NDArray[Any], y: NDArray[Any]) -> Path:
    """Write ``x`` (float32) and ``y`` (int64) to ``path`` durably and atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(path, PUBLIC_FILE) as fh:
        np.savez(fh, x=np.asarray(x, dtype=np.float32), y=np.asarray(y, dtype=np.int64))
    return path


def write_partitions(
    out_dir: str | Path, shards: Sequence[tuple[NDArray[Any], NDArray[Any], Shift]], num_classes: int | None = None
) -> list[Path]:
    """Write ``device-XX.npz`` per shard and ``partitions.json``; returns the device files in order."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if num_classes is None:
        num_classes = max((int(np.max(s[1])) + 1 for s in shards if len(s[1])), default=0)
    files: list[Path] = []
    devices: list[dict[str, Any]] = []
    for d, (x, y, shift) in enumerate(shards):
        path = write_npz(out / f"device-{d:02d}.npz", x, y)
        files.append(path)
        hist = np.bincount(np.asarray(y, dtype=np.int64), minlength=num_classes)
        devices.append(
            {
                "device": d,
                "file": path.name,
                "n": len(y),
                "input_shape": [int(s) for s in np.shape(x)[1:]],
                "label_histogram": [int(c) for c in hist],
                "shift": shift.to_dict(),
            }
        )
    meta = {"format": 1, "num_classes": num_classes, "devices": devices}
    (out / "partitions.json").write_text(json.dumps(meta, indent=2) + "\n")
    return files


def make_eval_set(
    dataset: Dataset, base_shift: Shift, n: int, seed: int, out: str | Path | None = None
) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """``n`` test samples (all, if fewer) in the base domain (no jitter); written to ``out`` if given."""
    if n < 1:
        raise ConfigError("n", f"eval set size must be >= 1, got {n}")
    rng = np.random.default_rng([seed, 2])
    idx = np.sort(rng.permutation(len(dataset.y_test))[: min(n, len(dataset.y_test))])
    x = base_shift.apply(dataset.x_test[idx], rng)
    y = dataset.y_test[idx].astype(np.int64)
    if out is not None:
        write_npz(out, x, y)
    return x, y


def run_partition(
    dataset: str,
    devices: int,
    alpha: float,
    seed: int,
    rotate: float,
    contrast: float,
    noise: float,
    out: str | Path,
    *,
    eval_size: int = 2000,
) -> list[Path]:
    """``fedge partition``: device files, ``eval.npz`` and ``partitions.json`` in ``out``; returns their paths."""
    data = load_source(dataset)
    if not data.is_images and rotate % 360 != 0:
        raise ConfigError("rotate", f"data set {data.name!r} is feature vectors, not images; cannot rotate")
    base = Shift(rotation_deg=rotate, contrast=contrast, noise_sigma=noise)
    shards = make_device_shards(data, devices, alpha, seed, base)
    out_dir = Path(out)
    files = write_partitions(out_dir, shards, data.num_classes)
    eval_path = out_dir / "eval.npz"
    make_eval_set(data, base, eval_size, seed, eval_path)
    return [*files, eval_path, out_dir / "partitions.json"]
