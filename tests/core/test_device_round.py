"""The round core's device side on a real (NumPy) head trainer over synthetic features: the adaptive personal head
and the learning-rate back-off. Nothing is mocked: the trainer is fedge's own NumPy head with an identity backbone."""

from __future__ import annotations

import numpy as np
import pytest

from fedge.core import device as core
from fedge.core.personal import choose, local_baseline
from fedge.core.training import fit
from fedge.protocol.errors import TrainingDiverged
from fedge.protocol.messages import RoundAnnounce
from fedge.runtime.trainers.numpy_head import NumpyTrainer

F, C = 8, 4
SPEC = [("h0_kernel", (F, C)), ("h0_bias", (C,))]


def _trainer(batch: int = 16) -> NumpyTrainer:
    zero = {"h0_kernel": np.zeros((F, C), np.float32), "h0_bias": np.zeros(C, np.float32)}
    return NumpyTrainer(zero, SPEC, ["linear"], batch, lambda x: x)


def _task(n: int, seed: int, perm: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rows x ~ N(0, 1); labels argmax(x W) for one fixed W (the fleet's task), or permuted (a device unlike it)."""
    w = np.random.default_rng(0).normal(size=(F, C))
    x = np.random.default_rng(seed).normal(size=(n, F)).astype(np.float32)
    y = np.argmax(x @ w, axis=1)
    if perm is not None:
        y = np.asarray(perm)[y]
    return x, y.astype(np.int64)


@pytest.fixture(scope="module")
def global_head() -> dict[str, np.ndarray]:
    """A head trained on the fleet's task (plenty of data): what federation gives a device."""
    t = _trainer()
    x, y = _task(2000, 1)
    fit(t, x, y, 10, 0.5, np.random.default_rng(0))
    return t.get_head()


W0 = {"h0_kernel": np.zeros((F, C), np.float32), "h0_bias": np.zeros(C, np.float32)}


def test_a_device_unlike_the_fleet_keeps_a_local_model(global_head: dict[str, np.ndarray]) -> None:
    x, y = _task(240, 2, perm=[2, 3, 0, 1])  # same inputs, other labels: the global head is wrong here
    t = _trainer()
    local = local_baseline(t, W0, x, y, 20, 0.5, seed=3)
    choice = choose(t, global_head, local, x, y, 20, 0.5, seed=3)
    assert choice.name != "global"
    assert choice.cv_accuracy > 0.8
    t.set_head(global_head)
    assert float((t.logits(x).argmax(1) == y).mean()) < 0.3  # what keeping the global head would have cost


def test_a_device_with_little_data_leans_on_the_global_model(global_head: dict[str, np.ndarray]) -> None:
    x, y = _task(6, 4)  # the fleet's task, 6 rows: too few to learn it alone
    t = _trainer()
    local = local_baseline(t, W0, x, y, 20, 0.5, seed=5)
    choice = choose(t, global_head, local, x, y, 20, 0.5, seed=5)
    assert choice.name in ("global", "finetune"), choice  # built on the global head, not on its 6 rows alone
    test_x, test_y = _task(2000, 6)
    t.set_head(choice.head)
    ours = float((t.logits(test_x).argmax(1) == test_y).mean())
    t.set_head(local.head)
    alone = float((t.logits(test_x).argmax(1) == test_y).mean())
    assert ours > alone + 0.1  # leaning on the fleet pays off on data the device never saw


def _announce(lr: float) -> RoundAnnounce:
    return RoundAnnounce(fleet="f", round=1, model_version="v0", backbone_sha256="0" * 64, deadline=1e12,
                         min_devices=1, selected=("d",), local_epochs=3, lr=lr)


def test_a_learning_rate_that_diverges_is_halved_until_training_helps() -> None:
    x, y = _task(64, 7)
    data = core.DeviceData(x * 20.0, y, "ab" * 32)  # unscaled inputs: the announced rate blows training up
    heads = core.RoundHeads(W0, W0)
    policy = core.DevicePolicy(validation_fraction=0.0, personalization=core.Personalization.FINETUNE)
    out = core.train(_announce(2.0), _trainer(), data, heads, policy, private=True)
    assert isinstance(out, core.Trained)
    assert out.metrics["lr_backoffs"] >= 1 and out.metrics["loss_after"] < out.metrics["loss_before"]
    with pytest.raises(TrainingDiverged):  # no rate a few halvings away helps: the device declines
        core.train(_announce(1e6), _trainer(), core.DeviceData(x * 1e4, y, "cd" * 32), heads, policy, private=True)
