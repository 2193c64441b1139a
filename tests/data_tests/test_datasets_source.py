"""Source data sets: Fashion-MNIST IDX files and the scikit-learn digits fallback."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from fedge.datasets.source import FASHION_MNIST_DIR, as_images28, load_digits_source, load_source, read_idx
from fedge.protocol.errors import ConfigError, DataError


def test_fashion_mnist_has_60k_train_10k_test_images_in_unit_range() -> None:
    data = load_source("fashion-mnist")
    assert data.name == "fashion-mnist"
    assert data.x_train.shape == (60000, 28, 28, 1)
    assert data.x_test.shape == (10000, 28, 28, 1)
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int64
    assert data.num_classes == 10
    assert set(np.unique(data.y_train)) == set(range(10))
    assert float(data.x_train.min()) == 0.0 and float(data.x_train.max()) == 1.0
    # balanced classes: Fashion-MNIST has exactly 6000 per class in train
    assert np.bincount(data.y_train).tolist() == [6000] * 10


def test_auto_picks_fashion_mnist_when_its_files_exist() -> None:
    assert (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file()
    assert load_source("auto").name == "fashion-mnist"


def test_loaded_arrays_are_read_only_so_the_cache_stays_intact() -> None:
    data = load_source("digits")
    with pytest.raises(ValueError):
        data.x_train[0, 0] = 5.0


def test_digits_is_a_seeded_80_20_split_of_flat_unit_range_features() -> None:
    data = load_digits_source()
    again = load_digits_source()
    assert data.name == "digits" and data.num_classes == 10
    assert data.x_train.shape[1] == 64 and data.x_train.dtype == np.float32
    total = len(data.y_train) + len(data.y_test)
    assert total == 1797
    assert len(data.y_test) == round(0.2 * total)
    assert float(data.x_train.min()) >= 0.0 and float(data.x_train.max()) == 1.0
    np.testing.assert_array_equal(data.y_test, again.y_test)
    other = load_digits_source(seed=1)
    assert not np.array_equal(data.y_test, other.y_test)


def test_unknown_source_name_is_a_config_error_naming_the_field() -> None:
    with pytest.raises(ConfigError, match="dataset"):
        load_source("cifar")


def _write_idx(path: Path, arr: np.ndarray, code: int = 0x08) -> None:
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    path.write_bytes(gzip.compress(header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()))


def test_read_idx_parses_big_endian_dims_and_data(tmp_path: Path) -> None:
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", arr)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), arr)
    ints = np.array([1, -2, 300000], dtype=np.int32)
    _write_idx(tmp_path / "b.gz", ints, code=0x0C)
    np.testing.assert_array_equal(read_idx(tmp_path / "b.gz"), ints)


def test_read_idx_rejects_bad_files_naming_them(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"missing\.gz: file not found"):
        read_idx(tmp_path / "missing.gz")
    bad = tmp_path / "magic.idx"
    bad.write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x05")
    with pytest.raises(DataError, match=r"magic\.idx: not an IDX file"):
        read_idx(bad)
    short = tmp_path / "short.idx"
    short.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x00" * 3)
    with pytest.raises(DataError, match=r"short\.idx: IDX data is 3 bytes"):
        read_idx(short)


def test_as_images28_upscales_digits_to_cnn_input() -> None:
    data = load_source("digits")
    for order in ("nearest", "bilinear"):
        img = as_images28(data.x_train[:5], order=order)
        assert img.shape == (5, 28, 28, 1) and img.dtype == np.float32
        assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0
    # nearest upscale of 8 -> 28 keeps every source pixel value and a constant image stays constant
    near = as_images28(data.x_train[:1], order="nearest")
    assert set(np.unique(near)) <= set(np.unique(data.x_train[0]))
    flat = as_images28(np.full((2, 64), 0.25, dtype=np.float32))
    np.testing.assert_allclose(flat, 0.25, atol=1e-6)
    # nearest upscale keeps the corner pixels in the corners
    up = as_images28(data.x_train[:3, :], order="nearest")[..., 0]
    assert up[0, 0, 0] == data.x_train[0, 0] and up[0, 27, 27] == data.x_train[0, 63]
