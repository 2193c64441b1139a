"""``fit(..., stop=...)``: training ends between batches once ``stop()`` says so (the agent's deadline, its own
time limit, a closed round); the loop is the same for every trainer (the NumPy one here)."""

from __future__ import annotations

import numpy as np

from fedge.core.training import fit
from fedge.runtime.trainers.numpy_head import NumpyTrainer

F, C, N, B = 5, 3, 100, 8  # 13 batches per epoch


def _trainer() -> NumpyTrainer:
    rng = np.random.default_rng(0)
    head = {"h0_kernel": rng.normal(size=(F, C)).astype(np.float32), "h0_bias": np.zeros(C, np.float32)}
    spec = [("h0_kernel", (F, C)), ("h0_bias", (C,))]
    return NumpyTrainer(head, spec, ["linear"], B, lambda x: x)


def _data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    return rng.normal(size=(N, F)).astype(np.float32), rng.integers(0, C, N)


def test_stop_is_checked_before_every_batch() -> None:
    feats, y = _data()
    asked: list[int] = []

    def stop() -> bool:
        asked.append(1)
        return len(asked) > 5  # five batches, then stop

    res = fit(_trainer(), feats, y, epochs=1000, lr=0.1, rng=np.random.default_rng(2), stop=stop)
    assert res.stopped and res.steps == 5
    assert len(res.epoch_losses) == 1 and np.isfinite(res.epoch_losses[0])


def test_stop_between_epochs_and_before_the_first_step() -> None:
    feats, y = _data()
    steps_per_epoch = -(-N // B)
    done = fit(_trainer(), feats, y, epochs=2, lr=0.1, rng=np.random.default_rng(2))
    assert not done.stopped and done.steps == 2 * steps_per_epoch
    t = _trainer()
    before = t.get_head()
    res = fit(t, feats, y, epochs=3, lr=0.1, rng=np.random.default_rng(2), stop=lambda: True)
    assert res.stopped and res.steps == 0 and res.epoch_losses == ()
    assert all(np.array_equal(before[k], v) for k, v in t.get_head().items()), "no step was taken"


def test_a_stop_that_never_fires_changes_nothing() -> None:
    feats, y = _data()
    a, b = _trainer(), _trainer()
    fit(a, feats, y, 3, 0.1, np.random.default_rng(4))
    res = fit(b, feats, y, 3, 0.1, np.random.default_rng(4), stop=lambda: False)
    assert not res.stopped
    assert all(np.array_equal(a.get_head()[k], v) for k, v in b.get_head().items())
