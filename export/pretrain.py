"""Pre-train the source model at the hub (full model, Adam) and save it as ``.keras``.

On a built-in source data set: a fixed number of epochs (:data:`DEFAULT_EPOCHS`). On the user's own data
(``--data``): the inputs are scaled by a ``Normalization`` layer (the first layer of the backbone, so every exported
artifact scales device data the same way) whose statistics are those of the training rows, and the epochs are
picked by validation: a held-out part of the training rows (:data:`VALIDATION_FRACTION`) is scored after every
epoch, training stops once its loss has not improved for :data:`PATIENCE` epochs (at most :data:`MAX_EPOCHS`), and
the weights of the best epoch are kept.

Deterministic given ``seed``: weights are drawn from ``np.random.default_rng(seed)`` and the data
is shuffled with the same generator (Keras' own shuffling is off; nothing is seeded globally); the test and
validation rows are chosen by the data's sha256.
"""

from __future__ import annotations

import hashlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedge.core.losses import Score, ScoreSum
from fedge.export.tfenv import import_tensorflow
from fedge.export.zoo import ZOO, build_zoo_model, init_weights, set_normalization
from fedge.protocol.errors import ConfigError

__all__ = ["DEFAULT_EPOCHS", "MAX_EPOCHS", "PATIENCE", "VALIDATION_FRACTION", "Fitted", "PretrainResult",
           "fit_zoo", "model_for_input", "pretrain", "pretrain_arrays", "pretrain_report"]

DEFAULT_EPOCHS = 2
"""Epochs on a built-in source data set (fixed: seconds on Fashion-MNIST)."""
MAX_EPOCHS = 200
"""On the user's data: the most epochs early stopping may run (``--epochs`` sets another bound)."""
PATIENCE = 10
"""Early stopping: epochs without a lower validation loss before training stops."""
MIN_DELTA = 1e-4
"""Early stopping: a validation loss must be this much lower than the best one to count as an improvement."""
VALIDATION_FRACTION = 0.15
"""On the user's data: the share of the training rows held out to pick the epochs (never trained on)."""
TEST_FRACTION = 0.1
"""On the user's data: the share of the rows held out to measure the test accuracy."""
BATCH = 64
LEARNING_RATE = 2e-3
EVAL_CHUNK = 512


@dataclass(frozen=True)
class PretrainResult:
    """What ``pretrain_report`` did: output path, test accuracy (NaN without a test set), seconds, the epochs
    whose weights were kept and how many ran, the kept weights' validation loss (NaN: no early stopping) and
    whether the inputs are normalised inside the model."""

    path: Path
    test_accuracy: float
    seconds: float
    model: str
    dataset: str
    epochs: int = 0
    epochs_run: int = 0
    val_loss: float = math.nan
    normalized: bool = False


@dataclass(frozen=True)
class Fitted:
    """A trained zoo model: ``epochs`` trained into the kept weights, ``epochs_run`` run in all, ``val_loss`` of
    the kept weights (NaN without validation data)."""

    model: Any
    epochs: int
    epochs_run: int
    val_loss: float = math.nan


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


def fit_zoo(
    model_name: str,
    x: NDArray[Any],
    y: NDArray[Any],
    num_classes: int,
    seed: int,
    epochs: int,
    *,
    validation: tuple[NDArray[Any], NDArray[Any]] | None = None,
    normalize: bool = False,
    patience: int = PATIENCE,
    progress: bool = False,
) -> Fitted:
    """Train the zoo model ``model_name`` on ``(x, y)`` for ``epochs`` epochs, or, with ``validation`` rows, for
    at most ``epochs``: early stopping on their loss (``patience`` epochs), the best epoch's weights kept.
    ``normalize`` puts a ``Normalization`` layer with the statistics of ``x`` in front of the backbone."""
    import_tensorflow()
    import keras
    from tqdm import tqdm

    if epochs < 0:
        raise ConfigError("epochs", "must be >= 0")
    if patience < 1:
        raise ConfigError("patience", "must be >= 1")
    rng = np.random.default_rng(seed)
    model = build_zoo_model(model_name, num_classes, input_dim=int(x.shape[-1]), normalize=normalize)
    init_weights(model, rng)
    x32 = np.asarray(x, dtype=np.float32)
    y64 = np.asarray(y, dtype=np.int64)
    if normalize:
        set_normalization(model, x32)
    model.compile(
        optimizer=keras.optimizers.Adam(LEARNING_RATE),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    val = None
    if validation is not None and len(validation[1]):
        val = (np.asarray(validation[0], dtype=np.float32), np.asarray(validation[1], dtype=np.int64))
    best = (math.inf, 0, model.get_weights())  # (validation loss, epoch, weights)
    steps = -(-len(y64) // BATCH)
    show = progress and sys.stderr.isatty()  # no carriage-return spam in logs and pipes
    run = 0
    with tqdm(total=epochs * steps, desc="pre-training", unit="batch", disable=not show, leave=False) as bar:
        for epoch in range(1, epochs + 1):
            order = rng.permutation(len(y64))
            for step, s in enumerate(range(0, len(y64), BATCH)):
                rows = order[s : s + BATCH]
                logs = model.train_on_batch(x32[rows], y64[rows], return_dict=True)
                bar.update(1)
                if show and step % 50 == 0:
                    bar.set_postfix(loss=f"{float(logs.get('loss', math.nan)):.3f}",
                                    acc=f"{float(logs.get('accuracy', math.nan)):.3f}")
            run = epoch
            if val is None:
                continue
            loss = _score(model, *val).loss
            if loss < best[0] - MIN_DELTA:
                best = (loss, epoch, model.get_weights())
            elif epoch - best[1] >= patience:
                break
    if val is None or best[1] == 0:  # no validation rows, or no finite validation loss: the last epoch's weights
        return Fitted(model, run, run, math.nan if val is None else best[0])
    model.set_weights(best[2])
    return Fitted(model, best[1], run, best[0])


def _score(model: Any, x: NDArray[np.float32], y: NDArray[np.int64]) -> Score:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)`` (inference mode, in chunks)."""
    total = ScoreSum()
    for s in range(0, len(y), EVAL_CHUNK):
        total.add(np.asarray(model(x[s : s + EVAL_CHUNK], training=False)), y[s : s + EVAL_CHUNK])
    return total.score()


def _train(
    model_name: str,
    x: NDArray[Any],
    y: NDArray[Any],
    num_classes: int,
    seed: int,
    epochs: int,
    progress: bool = False,
) -> Any:
    """The zoo model trained for exactly ``epochs`` epochs (no normalisation, no early stopping)."""
    return fit_zoo(model_name, x, y, num_classes, seed, epochs, progress=progress).model


def _accuracy(model: Any, x: NDArray[Any], y: NDArray[Any]) -> float:
    return _score(model, np.asarray(x, dtype=np.float32), np.asarray(y, dtype=np.int64)).accuracy


def _holdout(n: int, fraction: float, key: str) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """``(kept, held out)`` row indices, chosen by ``key`` (a hex digest) as the devices choose theirs."""
    from fedge.core.evaluation import split_indices

    return split_indices(n, fraction, key)


def _derived_key(key: str, purpose: str) -> str:
    """Another split of the same data: ``key`` (a hex digest) hashed with ``purpose``."""
    return hashlib.sha256(f"{key}:{purpose}".encode()).hexdigest()


def _fit_split(name: str, x: NDArray[Any], y: NDArray[Any], num_classes: int, seed: int, epochs: int, key: str,
               validation_fraction: float, normalize: bool, progress: bool) -> Fitted:
    """:func:`fit_zoo`, early-stopped on ``validation_fraction`` of the rows when it is above 0."""
    if not 0.0 <= validation_fraction < 1.0:
        raise ConfigError("validation_fraction", f"must be in [0, 1), got {validation_fraction}")
    if validation_fraction == 0.0:
        return fit_zoo(name, x, y, num_classes, seed, epochs, normalize=normalize, progress=progress)
    fit_idx, val_idx = _holdout(len(y), validation_fraction, _derived_key(key, "validation"))
    return fit_zoo(name, x[fit_idx], y[fit_idx], num_classes, seed, epochs, validation=(x[val_idx], y[val_idx]),
                   normalize=normalize, progress=progress)


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
    normalize: bool = False,
    validation_fraction: float = 0.0,
) -> Path:
    """Train a zoo model on ``(x, y)`` and save it to ``out_path`` (``.keras``); ``progress`` shows a bar.

    ``normalize``: scale the inputs inside the model (statistics of the training rows); ``validation_fraction``
    > 0: hold that share of the rows out and stop early on it (``epochs`` is then the most that may run)."""
    name = model_for_input(model_name, x)
    key = hashlib.sha256(np.ascontiguousarray(x).tobytes() + np.ascontiguousarray(y).tobytes()).hexdigest()
    model = _fit_split(name, x, y, num_classes, seed, epochs, key, validation_fraction, normalize, progress).model
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
    epochs: int | None = None,
    seed: int = 0,
    out_path: str | Path = "model.keras",
    data_file: str | Path | None = None,
    progress: bool = False,
) -> PretrainResult:
    """Train on ``fedge.datasets.source.load_source(dataset)`` for ``epochs`` (default :data:`DEFAULT_EPOCHS`), or
    on the user's ``data_file`` (.npz with x, y or .csv with the label last; :data:`TEST_FRACTION` of the rows
    held out, deterministically, to measure accuracy) with normalised inputs and early stopping (``epochs``: at
    most that many, default :data:`MAX_EPOCHS`); save ``.keras``."""
    start = time.perf_counter()
    if data_file is not None:
        x_train, y_train, x_test, y_test, num_classes, source, key = _user_data(Path(data_file))
        name = model_for_input(model_name, x_train)
        fitted = _fit_split(name, x_train, y_train, num_classes, seed, MAX_EPOCHS if epochs is None else epochs,
                            key, VALIDATION_FRACTION, True, progress)
    else:
        from fedge.datasets.source import load_source

        data = load_source(dataset)
        x_train, y_train, x_test, y_test = data.x_train, data.y_train, data.x_test, data.y_test
        num_classes, source = data.num_classes, data.name
        name = model_for_input(model_name, x_train)
        fitted = fit_zoo(name, x_train, y_train, num_classes, seed, DEFAULT_EPOCHS if epochs is None else epochs,
                         progress=progress)
    acc = _accuracy(fitted.model, x_test, y_test) if len(y_test) else float("nan")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fitted.model.save(out)
    return PretrainResult(out, acc, time.perf_counter() - start, name, source, fitted.epochs, fitted.epochs_run,
                          fitted.val_loss, data_file is not None)


def _user_data(path: Path) -> tuple[NDArray[Any], NDArray[Any], NDArray[Any], NDArray[Any], int, str, str]:
    """The user's source data: images ``[N, 28, 28(, 1)]`` go to the CNN, anything else is flattened for the MLP.
    Returns the training and test rows, the number of classes, the file's name and its sha256."""
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
    train, test = _holdout(len(y), TEST_FRACTION, local.sha256)
    return x[train], y[train], x[test], y[test], int(y.max()) + 1, path.name, local.sha256
