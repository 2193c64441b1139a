"""The edge agent's local data loader: good files load, every bad file is a DataError naming it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from fedge.protocol.errors import DataError
from fedge.runtime.data import load_local


def _npz(path: Path, **arrays: object) -> Path:
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)  # type: ignore[arg-type]
    return path


def test_npz_loads_as_float32_and_int64_with_the_file_hash(tmp_path: Path) -> None:
    x = np.random.default_rng(0).random((6, 28, 28, 1))
    path = _npz(tmp_path / "d.npz", x=x, y=np.array([0, 1, 2, 3, 4, 5], dtype=np.int32))
    data = load_local(path, input_shape=[28, 28, 1])
    assert data.x.dtype == np.float32 and data.y.dtype == np.int64
    np.testing.assert_allclose(data.x, x.astype(np.float32))
    assert data.y.tolist() == [0, 1, 2, 3, 4, 5]
    assert data.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert data.path == path and len(data) == 6


def test_hash_changes_with_content(tmp_path: Path) -> None:
    a = load_local(_npz(tmp_path / "a.npz", x=np.zeros((2, 3)), y=np.array([0, 1])))
    b = load_local(_npz(tmp_path / "b.npz", x=np.ones((2, 3)), y=np.array([0, 1])))
    assert a.sha256 != b.sha256


def test_images_without_channel_axis_get_one(tmp_path: Path) -> None:
    path = _npz(tmp_path / "c.npz", x=np.zeros((3, 28, 28), np.float32), y=np.array([1, 2, 3]))
    assert load_local(path, input_shape=(28, 28, 1)).x.shape == (3, 28, 28, 1)


def test_csv_with_header_and_without(tmp_path: Path) -> None:
    with_header = tmp_path / "h.csv"
    with_header.write_text("f0,f1,label\n0.5,1.0,2\n0.25,0.0,0\n\n")
    data = load_local(with_header, input_shape=[2])
    np.testing.assert_allclose(data.x, [[0.5, 1.0], [0.25, 0.0]])
    assert data.y.tolist() == [2, 0] and data.y.dtype == np.int64
    plain = tmp_path / "p.csv"
    plain.write_text("1,2,3,4\n5,6,7,1.0\n")
    got = load_local(plain)
    assert got.x.shape == (2, 3) and got.y.tolist() == [4, 1]


def test_flat_csv_rows_reshape_to_the_image_input(tmp_path: Path) -> None:
    rows = np.random.default_rng(0).random((2, 784))
    path = tmp_path / "img.csv"
    path.write_text("\n".join(",".join(f"{v:.6f}" for v in r) + f",{i}" for i, r in enumerate(rows)))
    data = load_local(path, input_shape=[28, 28, 1])
    assert data.x.shape == (2, 28, 28, 1)
    np.testing.assert_allclose(data.x[1, 0, :, 0], rows[1, :28], atol=1e-6)


def _bad_cases(tmp: Path) -> list[tuple[Path, str, list[int] | None]]:
    cases: list[tuple[Path, str, list[int] | None]] = []

    def add(path: Path, problem: str, shape: list[int] | None = None) -> None:
        cases.append((path, problem, shape))

    add(tmp / "nothere.npz", "file not found")
    (tmp / "data.txt").write_text("1,2\n")
    add(tmp / "data.txt", "unknown file type")
    add(_npz(tmp / "nox.npz", features=np.zeros((2, 2)), y=np.array([0, 1])), "missing array(s) x")
    add(_npz(tmp / "noy.npz", x=np.zeros((2, 2))), "missing array(s) y")
    add(_npz(tmp / "mismatch.npz", x=np.zeros((3, 2)), y=np.array([0, 1])), "length mismatch")
    nan = np.zeros((2, 2))
    nan[1, 1] = np.nan
    add(_npz(tmp / "nan.npz", x=nan, y=np.array([0, 1])), "non-finite")
    add(_npz(tmp / "inf.npz", x=np.full((2, 2), np.inf), y=np.array([0, 1])), "non-finite")
    add(_npz(tmp / "frac.npz", x=np.zeros((2, 2)), y=np.array([0.0, 1.5])), "non-integer labels")
    add(_npz(tmp / "neg.npz", x=np.zeros((2, 2)), y=np.array([0, -1])), "negative labels")
    add(_npz(tmp / "strlabels.npz", x=np.zeros((2, 2)), y=np.array(["a", "b"])), "non-numeric")
    add(_npz(tmp / "shape.npz", x=np.zeros((2, 27, 28)), y=np.array([0, 1])), "wrong shape", [28, 28, 1])
    add(_npz(tmp / "empty.npz", x=np.zeros((0, 4)), y=np.zeros(0, np.int64)), "empty")
    add(_npz(tmp / "flat.npz", x=np.zeros(4), y=np.zeros(4, np.int64)), "at least 2 dimensions")
    obj = np.empty(2, dtype=object)
    obj[0], obj[1] = [1, 2], {"a": 1}
    with open(tmp / "pickled.npz", "wb") as fh:
        np.savez(fh, x=obj, y=np.array([0, 1]))
    add(tmp / "pickled.npz", "object/pickled array")
    (tmp / "garbage.npz").write_bytes(b"this is not a zip archive at all")
    add(tmp / "garbage.npz", "not a readable .npz")
    np.save(tmp / "single.npy", np.zeros(3))
    (tmp / "single.npy").rename(tmp / "single.npz")
    add(tmp / "single.npz", "single .npy array")
    (tmp / "empty.csv").write_text("a,b,label\n")
    add(tmp / "empty.csv", "empty")
    (tmp / "ragged.csv").write_text("1,2,0\n1,2\n")
    add(tmp / "ragged.csv", "line 2: 2 columns, expected 3")
    (tmp / "text.csv").write_text("1,2,0\n1,x,1\n")
    add(tmp / "text.csv", "line 2: non-numeric")
    (tmp / "negcsv.csv").write_text("0.1,0.2,-3\n")
    add(tmp / "negcsv.csv", "negative labels")
    (tmp / "onecol.csv").write_text("1\n2\n")
    add(tmp / "onecol.csv", "label column")
    (tmp / "nancsv.csv").write_text("nan,1,0\n")
    add(tmp / "nancsv.csv", "non-finite")
    (tmp / "latin.csv").write_bytes(b"\xff\xfe1,2,0\n")
    add(tmp / "latin.csv", "not UTF-8")
    add(tmp, "no image files")  # a directory without a data suffix is an image folder: this one has no images
    (tmp / "notes.txt").write_text("x")
    add(tmp / "notes.txt", "unknown file type")
    (tmp / "dir.npz").mkdir()
    add(tmp / "dir.npz", "is a directory")
    return cases


def test_every_bad_file_is_a_data_error_naming_the_file_and_the_problem(tmp_path: Path) -> None:
    cases = _bad_cases(tmp_path)
    assert len(cases) >= 20
    for path, problem, shape in cases:
        with pytest.raises(DataError) as info:
            load_local(path, input_shape=shape)
        message = str(info.value)
        assert path.name in message, f"{path.name}: message does not name the file: {message}"
        assert problem in message, f"{path.name}: expected {problem!r} in {message!r}"


def test_inputs_for_prediction_read_the_training_files_and_unlabelled_ones(tmp_path: Path) -> None:
    """``load_inputs`` (fedge-agent predict): the header CSV the agent trains on (its label column dropped), rows of
    exactly the model's width, an .npz with or without y; a width that is neither names the file and both widths."""
    from fedge.runtime.data import load_inputs

    (tmp_path / "train.csv").write_text("age,income,gender,label\n31,52000.5,1,0\n45,61000,0,2\n")
    x = load_inputs(tmp_path / "train.csv", (3,))
    np.testing.assert_allclose(x, [[31, 52000.5, 1], [45, 61000, 0]])
    np.testing.assert_array_equal(x, load_local(tmp_path / "train.csv", (3,)).x)  # what training reads
    (tmp_path / "new.csv").write_text("age,income,gender\n29,48000,1\n")
    np.testing.assert_allclose(load_inputs(tmp_path / "new.csv", (3,)), [[29, 48000, 1]])
    np.testing.assert_allclose(load_inputs(tmp_path / "new.csv", (1, 3)), [[[29, 48000, 1]]])
    _npz(tmp_path / "x.npz", x=np.ones((2, 4, 4)))
    assert load_inputs(tmp_path / "x.npz", (4, 4, 1)).shape == (2, 4, 4, 1)
    with pytest.raises(DataError, match=r"new\.csv: rows have 3 columns; the model takes 5 features"):
        load_inputs(tmp_path / "new.csv", (5,))
    (tmp_path / "bad.csv").write_text("a,b,c\n1,2,3\n1,oops,3\n")
    with pytest.raises(DataError, match=r"bad\.csv: line 3: non-numeric"):
        load_inputs(tmp_path / "bad.csv", (3,))
    _npz(tmp_path / "nox.npz", y=np.zeros(2))
    with pytest.raises(DataError, match=r"nox\.npz: missing array\(s\) x"):
        load_inputs(tmp_path / "nox.npz", (3,))
