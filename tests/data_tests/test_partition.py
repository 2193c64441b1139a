"""Dirichlet partitioning, device shards with jitter, and the files they are written to."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedge.datasets.partition import (
    NO_JITTER,
    Jitter,
    dirichlet_partition,
    make_device_shards,
    make_eval_set,
    run_partition,
    write_partitions,
)
from fedge.datasets.shifts import Shift
from fedge.datasets.source import Dataset, load_source
from fedge.protocol.errors import ConfigError
from fedge.runtime.data import load_local


def _labels(n: int, classes: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, classes, size=n)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(50, 400),
    classes=st.integers(1, 10),
    devices=st.integers(1, 8),
    alpha=st.floats(0.05, 100.0),
    min_per=st.integers(0, 5),
    seed=st.integers(0, 2**32 - 1),
)
def test_partition_is_disjoint_uses_every_sample_and_honours_the_minimum(
    n: int, classes: int, devices: int, alpha: float, min_per: int, seed: int
) -> None:
    y = _labels(n, classes, seed)
    parts = dirichlet_partition(y, devices, alpha, np.random.default_rng(seed), min_per_device=min_per)
    assert len(parts) == devices
    joined = np.concatenate(parts)
    assert len(joined) == len(np.unique(joined)), "an index was given to two devices"
    assert sorted(joined.tolist()) == list(range(n)), "an index was lost"
    assert all(len(p) >= min_per for p in parts)
    assert all(p.dtype == np.int64 for p in parts)


@settings(max_examples=40, deadline=None)
@given(
    devices=st.integers(1, 6),
    size=st.integers(1, 60),
    alpha=st.floats(0.05, 50.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_fixed_size_partition_gives_exactly_the_requested_sizes_without_reuse(
    devices: int, size: int, alpha: float, seed: int
) -> None:
    y = _labels(400, 5, seed)
    parts = dirichlet_partition(y, devices, alpha, np.random.default_rng(seed), min_per_device=0, size_per_device=size)
    assert [len(p) for p in parts] == [size] * devices
    joined = np.concatenate(parts)
    assert len(joined) == len(np.unique(joined))
    assert joined.min() >= 0 and joined.max() < 400


def test_fixed_size_partition_that_cannot_fit_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="devices"):
        dirichlet_partition(_labels(100, 3, 0), 5, 0.5, np.random.default_rng(0), size_per_device=30)


def test_partition_is_deterministic_for_a_seed_and_differs_across_seeds() -> None:
    y = _labels(2000, 10, 0)
    a = dirichlet_partition(y, 5, 0.5, np.random.default_rng(7))
    b = dirichlet_partition(y, 5, 0.5, np.random.default_rng(7))
    c = dirichlet_partition(y, 5, 0.5, np.random.default_rng(8))
    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c, strict=True))


def _skew(y: np.ndarray, parts: list[np.ndarray], classes: int) -> float:
    """Mean total-variation distance between each device's label mix and the global one."""
    glob = np.bincount(y, minlength=classes) / len(y)
    tvs = [0.5 * np.abs(np.bincount(y[p], minlength=classes) / len(p) - glob).sum() for p in parts]
    return float(np.mean(tvs))


def test_small_alpha_skews_labels_and_large_alpha_is_near_iid() -> None:
    y = _labels(20000, 10, 1)
    skewed = dirichlet_partition(y, 10, 0.1, np.random.default_rng(0))
    iid = dirichlet_partition(y, 10, 1000.0, np.random.default_rng(0))
    assert _skew(y, skewed, 10) > 0.4
    assert _skew(y, iid, 10) < 0.05
    fixed = dirichlet_partition(y, 10, 0.1, np.random.default_rng(0), size_per_device=500)
    assert _skew(y, fixed, 10) > 0.4


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"n_devices": 0}, "devices"), ({"alpha": 0.0}, "alpha"), ({"min_per_device": 500}, "devices")],
)
def test_bad_partition_arguments_name_the_field(kwargs: dict[str, float], field: str) -> None:
    args: dict[str, float] = {"n_devices": 3, "alpha": 0.5, "min_per_device": 1, **kwargs}
    with pytest.raises(ConfigError, match=field):
        dirichlet_partition(_labels(1000, 3, 0), rng=np.random.default_rng(0), **args)  # type: ignore[arg-type]


def _small_images() -> Dataset:
    rng = np.random.default_rng(0)
    return Dataset(
        "tiny",
        rng.random((300, 28, 28, 1), dtype=np.float32),
        rng.integers(0, 4, 300),
        rng.random((50, 28, 28, 1), dtype=np.float32),
        rng.integers(0, 4, 50),
        4,
    )


def test_device_shards_are_deterministic_and_each_device_has_its_own_jittered_shift() -> None:
    data = _small_images()
    base = Shift(rotation_deg=90, contrast=0.9)
    a = make_device_shards(data, 4, 0.5, 3, base)
    b = make_device_shards(data, 4, 0.5, 3, base)
    for sa, sb in zip(a, b, strict=True):
        np.testing.assert_array_equal(sa.x, sb.x)
        np.testing.assert_array_equal(sa.y, sb.y)
        assert sa.shift == sb.shift
    shifts = [s.shift for s in a]
    assert len(set(shifts)) == 4
    jit = Jitter()
    for s in shifts:
        assert abs(s.rotation_deg - 90) <= jit.rotation_deg + 1e-9
        assert 0.9 * jit.contrast_low - 1e-4 <= s.contrast <= 0.9 * jit.contrast_high + 1e-4
        assert 0 <= s.noise_sigma <= jit.noise_sigma + 1e-4
    assert sum(len(s.y) for s in a) == 300
    assert all(s.x.dtype == np.float32 and s.x.shape[1:] == (28, 28, 1) for s in a)


def test_without_jitter_a_shard_is_exactly_the_base_shift_of_its_samples() -> None:
    data = _small_images()
    shards = make_device_shards(data, 3, 0.5, 0, Shift(rotation_deg=90), NO_JITTER)
    for s in shards:
        assert s.shift == Shift(rotation_deg=90)
    # find each shard's rows back in the rotated train set
    rotated = np.rot90(data.x_train, 1, axes=(1, 2))
    flat = {rotated[i].tobytes(): i for i in range(len(rotated))}
    for s in shards:
        idx = [flat[row.tobytes()] for row in np.ascontiguousarray(s.x)]
        np.testing.assert_array_equal(data.y_train[idx], s.y)


def test_write_partitions_round_trips_through_load_local(tmp_path: Path) -> None:
    data = _small_images()
    shards = make_device_shards(data, 3, 0.5, 1, Shift(rotation_deg=45))
    files = write_partitions(tmp_path / "parts", shards, num_classes=4)
    assert [f.name for f in files] == ["device-00.npz", "device-01.npz", "device-02.npz"]
    meta = json.loads((tmp_path / "parts" / "partitions.json").read_text())
    for f, shard, dev in zip(files, shards, meta["devices"], strict=True):
        local = load_local(f, input_shape=[28, 28, 1])
        np.testing.assert_array_equal(local.x, shard.x)
        np.testing.assert_array_equal(local.y, shard.y)
        assert dev["file"] == f.name and dev["n"] == len(shard.y)
        assert dev["label_histogram"] == np.bincount(shard.y, minlength=4).tolist()
        assert Shift(**dev["shift"]) == shard.shift
    # no pickle in the files: they load with allow_pickle=False
    with np.load(files[0], allow_pickle=False) as z:
        assert sorted(z.files) == ["x", "y"]


def test_eval_set_uses_the_test_split_with_the_base_shift_only(tmp_path: Path) -> None:
    data = _small_images()
    x, y = make_eval_set(data, Shift(rotation_deg=90), 20, 0, tmp_path / "eval.npz")
    assert len(y) == 20
    rotated = np.rot90(data.x_test, 1, axes=(1, 2))
    lookup = {rotated[i].tobytes(): i for i in range(len(rotated))}
    idx = [lookup[row.tobytes()] for row in np.ascontiguousarray(x)]
    np.testing.assert_array_equal(data.y_test[idx], y)
    local = load_local(tmp_path / "eval.npz")
    np.testing.assert_array_equal(local.x, x)
    x_all, _ = make_eval_set(data, Shift(), 10_000, 0)
    assert len(x_all) == 50


def test_run_partition_on_digits_writes_devices_eval_and_description(tmp_path: Path) -> None:
    paths = run_partition("digits", 4, 0.5, 0, 0.0, 0.8, 0.02, tmp_path)
    names = [p.name for p in paths]
    assert names == ["device-00.npz", "device-01.npz", "device-02.npz", "device-03.npz", "eval.npz", "partitions.json"]
    assert all(p.is_file() for p in paths)
    total = sum(len(load_local(p, input_shape=[64])) for p in paths[:4])
    assert total == len(load_source("digits").y_train)
    with pytest.raises(ConfigError, match="rotate"):
        run_partition("digits", 4, 0.5, 0, 90.0, 1.0, 0.0, tmp_path / "x")
