"""Pre-train the source model at the hub (full model, Adam, a few epochs) and save it as ``.keras``.

Deterministic given ``seed``: weights are drawn from ``np.random.default_rng(seed)`` and the data
is shuffled with the same generator (Keras' own shuffling is off; nothing is seeded globally).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedge.export.tfenv import import_tensorflow
from fedge.export.zoo import ZOO, build_zoo_model, init_weights
from fedge.protocol.errors import ConfigError

__all__ = ["PretrainResult", "model_for_input", "pretrain", "pretrain_arrays", "pretrain_report"]

DEFAULT_EPOCHS = 2
BATCH = 64
LEARNING_RATE = 2e-3


@dataclass(frozen=True)
class PretrainResult:
    """What ``pretrain_report`` did: output path, test accuracy (NaN without a test set), seconds."""

    path: Path
    test_accuracy: float
    seconds: float
    model: str
    dataset: str


def model_for_input(model_name: str, x: NDArray[Any]) -> str:
    """Resolve ``auto`` (cnn28 for 28x28x1 images, mlp for flat vectors) and check the input fits."""
    if model_name == "auto":
        model_name = "cnn28" if x.ndim == 4 else "mlp"
    if model_name not in ZOO:
        raise ConfigError("model", f"unknown zoo model {model_name!r} (known: auto, {', '.join(ZOO)})")
    if model_name == "cnn28" and tuple(x.shape[1:]) != (28, 28, 1):
        raise ConfigError("model", f"cnn28 needs [N, 28, 28, 1] images, the data is {list(x.shape)}")
    if model_name == "mlp" and x.ndim != 2:
        raise ConfigError("model", f"mlp needs flat [N, D] vectors, the data is {list(x.shape)}")
    return model_name


def _train(
    model_name: str,
    x: NDArray[Any],
    y: NDArray[Any],
    num_classes: int,
    seed: int,
    epochs: int,
    progress: bool = False,
) -> Any:
    import_tensorflow()
    import keras
    from tqdm import tqdm

    if epochs < 0:
        raise ConfigError("epochs", "must be >= 0")
    rng = np.random.default_rng(seed)
    model = build_zoo_model(model_name, num_classes, input_dim=int(x.shape[-1]))
    init_weights(model, rng)
    model.compile(
        optimizer=keras.optimizers.Adam(LEARNING_RATE),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    x32 = np.asarray(x, dtype=np.float32)
    y64 = np.asarray(y, dtype=np.int64)
    steps = -(-len(y64) // BATCH)
    show = progress and sys.stderr.isatty()  # no carriage-return spam in logs and pipes
    with tqdm(total=epochs * steps, desc="pre-training", unit="batch", disable=not show, leave=False) as bar:

        class _Bar(keras.callbacks.Callback):  # type: ignore[misc]
            def on_train_batch_end(self, batch: int, logs: dict[str, float] | None = None) -> None:
                bar.update(1)
                if logs and batch % 50 == 0:
                    bar.set_postfix(loss=f"{logs.get('loss', float('nan')):.3f}",
                                    acc=f"{logs.get('accuracy', float('nan')):.3f}")

        for _ in range(epochs):
            order = rng.permutation(len(y64))
            model.fit(x32[order], y64[order], batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
                      callbacks=[_Bar()])
    return model


def _accuracy(model: Any, x: NDArray[Any], y: NDArray[Any]) -> float:
    logits = model.predict(np.asarray(x, dtype=np.float32), batch_size=512, verbose=0)
    return float(np.mean(np.argmax(logits, axis=1) == np.asarray(y)))


def pretrain_arrays(
    model_name: str,
    x: NDArray[Any],
    y: NDArray[Any],
    num_classes: int,
    seed: int,
    out_path: str | Path,
    epochs: int = DEFAULT_EPOCHS,
    *,
    progress: bool = False,
) -> Path:
    """Train a zoo model on ``(x, y)`` and save it to ``out_path`` (``.keras``); ``progress`` shows a bar."""
    name = model_for_input(model_name, x)
    model = _train(name, x, y, num_classes, seed, epochs, progress)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    model.save(out)
    return out


def pretrain(
    model_name: str = "auto",
    dataset: str = "auto",
    epochs: int = DEFAULT_EPOCHS,
    seed: int = 0,
    out_path: str | Path = "model.keras",
) -> Path:
    """Train on the hub's source data set and save it; returns the ``.keras`` path."""
    return pretrain_report(model_name, dataset, epochs, seed, out_path).path


def pretrain_report(
    model_name: str = "auto",
    dataset: str = "auto",
    epochs: int = DEFAULT_EPOCHS,
    seed: int = 0,
    out_path: str | Path = "model.keras",
    data_file: str | Path | None = None,
    progress: bool = False,
) -> PretrainResult:
    """Train on ``fedge.datasets.source.load_source(dataset)`` or on the user's ``data_file`` (.npz with x, y or
    .csv with the label last; 10 % held out, deterministically, to measure accuracy), save ``.keras``."""
    start = time.perf_counter()
    if data_file is not None:
        x_train, y_train, x_test, y_test, num_classes, source = _user_data(Path(data_file))
    else:
        from fedge.datasets.source import load_source

        data = load_source(dataset)
        x_train, y_train, x_test, y_test = data.x_train, data.y_train, data.x_test, data.y_test
        num_classes, source = data.num_classes, data.name
    name = model_for_input(model_name, x_train)
    model = _train(name, x_train, y_train, num_classes, seed, epochs, progress)
    acc = _accuracy(model, x_test, y_test) if len(y_test) else float("nan")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    model.save(out)
    return PretrainResult(out, acc, time.perf_counter() - start, name, source)


def _user_data(path: Path) -> tuple[NDArray[Any], NDArray[Any], NDArray[Any], NDArray[Any], int, str]:
    """The user's source data: images ``[N, 28, 28(, 1)]`` go to the CNN, anything else is flattened for the MLP."""
    from fedge.core.evaluation import split_indices
    from fedge.runtime.data import load_local

    local = load_local(path)
    x = np.asarray(local.x, dtype=np.float32)
    if x.ndim == 3 and x.shape[1:] == (28, 28):
        x = x[..., None]
    elif not (x.ndim == 4 and x.shape[1:] == (28, 28, 1)):
        x = x.reshape(len(x), -1)
    y = np.asarray(local.y, dtype=np.int64)
    if y.size == 0 or y.min() < 0:
        raise ConfigError("data", f"{path}: labels must be integers >= 0")
    train, test = split_indices(len(y), 0.1, local.sha256)
    return x[train], y[train], x[test], y[test], int(y.max()) + 1, path.name
