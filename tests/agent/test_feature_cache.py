"""FeatureCache: hits skip the backbone, keys separate backbones, corrupt entries are recomputed."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray

from fedge.protocol.manifest import load_manifest
from fedge.runtime.features import FeatureCache
from fedge.runtime.trainers import Trainer, open_trainer

DATA = "ab" * 32
BB1 = "cd" * 32
BB2 = "ef" * 32


class CountingTrainer:
    """A real trainer that counts backbone calls (not the thing under test)."""

    def __init__(self, inner: Trainer) -> None:
        self.inner = inner
        self.name = inner.name
        self.batch_size = inner.batch_size
        self.calls = 0

    def features(self, x: NDArray[np.float32]) -> NDArray[np.float32]:
        self.calls += 1
        return self.inner.features(x)

    def get_head(self) -> dict[str, NDArray[np.float32]]:
        return self.inner.get_head()

    def set_head(self, head: Mapping[str, NDArray[np.float32]]) -> None:
        self.inner.set_head(head)

    def train_step(self, f: NDArray[np.float32], y: NDArray[np.int64], lr: float) -> float:
        return self.inner.train_step(f, y, lr)

    def logits(self, f: NDArray[np.float32]) -> NDArray[np.float32]:
        return self.inner.logits(f)


@pytest.fixture()
def trainer(artifacts_dir: Path) -> CountingTrainer:
    return CountingTrainer(open_trainer(artifacts_dir))


@pytest.fixture()
def x(artifacts_dir: Path) -> NDArray[np.float32]:
    return np.random.default_rng(0).random((40, *load_manifest(artifacts_dir).input.shape), dtype=np.float32)


def test_second_get_reads_the_cache(tmp_path: Path, trainer: CountingTrainer, x: NDArray[np.float32]) -> None:
    cache = FeatureCache(tmp_path)
    first = cache.get(trainer, x, DATA, BB1)
    assert trainer.calls == 1
    cache.flush()  # the entry is written by a writer thread, off the round's path
    assert (tmp_path / BB1[:16] / f"{DATA[:16]}.npy").is_file()
    second = cache.get(trainer, x, DATA, BB1)
    assert trainer.calls == 1
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(first, trainer.inner.features(x))
    assert FeatureCache(tmp_path).get(trainer, x, DATA, BB1).shape == first.shape  # survives a new process/object
    assert trainer.calls == 1
    assert not list(tmp_path.rglob("*.tmp"))


def test_new_backbone_gives_a_new_entry(tmp_path: Path, trainer: CountingTrainer, x: NDArray[np.float32]) -> None:
    cache = FeatureCache(tmp_path)
    cache.get(trainer, x, DATA, BB1)
    cache.get(trainer, x, DATA, BB2)
    assert trainer.calls == 2
    cache.flush()
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.npy")) == sorted(
        [f"{BB1[:16]}/{DATA[:16]}.npy", f"{BB2[:16]}/{DATA[:16]}.npy"]
    )
    cache.get(trainer, x, "12" * 32, BB1)  # new local data: new entry too
    assert trainer.calls == 3


@pytest.mark.parametrize(
    "damage",
    [
        lambda p, feats: p.write_bytes(b"not a numpy file"),
        lambda p, feats: p.write_bytes(p.read_bytes()[:100]),
        lambda p, feats: np.save(p, feats[:3]),
        lambda p, feats: np.save(p, feats.astype(np.float64)),
        lambda p, feats: np.save(p, np.full_like(feats, np.nan)),
    ],
    ids=["garbage", "truncated", "wrong-rows", "wrong-dtype", "nan"],
)
def test_corrupt_entry_is_recomputed(damage, tmp_path: Path, trainer: CountingTrainer, x: NDArray[np.float32]) -> None:  # type: ignore[no-untyped-def]
    cache = FeatureCache(tmp_path)
    good = cache.get(trainer, x, DATA, BB1)
    cache.flush()
    path = cache.path(DATA, BB1)
    damage(path, good)
    restarted = FeatureCache(tmp_path)  # a new agent process reads the damaged file
    again = restarted.get(trainer, x, DATA, BB1)
    assert trainer.calls == 2
    np.testing.assert_array_equal(again, good)
    restarted.flush()
    np.testing.assert_array_equal(np.load(path, allow_pickle=False), good)  # and the entry is repaired
    FeatureCache(tmp_path).get(trainer, x, DATA, BB1)
    assert trainer.calls == 2


def test_a_running_agent_keeps_the_entry_in_memory(tmp_path: Path, trainer: CountingTrainer,
                                                   x: NDArray[np.float32]) -> None:
    cache = FeatureCache(tmp_path)
    first = cache.get(trainer, x, DATA, BB1)
    cache.flush()
    cache.path(DATA, BB1).unlink()  # the disk copy is gone: the same cache still needs no backbone pass
    np.testing.assert_array_equal(cache.get(trainer, x, DATA, BB1), first)
    assert trainer.calls == 1
    with pytest.raises(ValueError):
        first[0, 0] = 1.0  # shared between rounds and the writer thread: read-only
    FeatureCache(tmp_path).get(trainer, x, DATA, BB1)  # a new process recomputes
    assert trainer.calls == 2


def test_keys_must_be_hex(tmp_path: Path, trainer: CountingTrainer, x: NDArray[np.float32]) -> None:
    with pytest.raises(ValueError, match="backbone_sha256"):
        FeatureCache(tmp_path).get(trainer, x, DATA, "../../etc")
