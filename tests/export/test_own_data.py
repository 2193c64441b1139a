"""``fedge pretrain --data`` on the user's own, unscaled data (issue 20, item 4): the inputs are normalised inside
the exported backbone and the epochs are picked by early stopping on held-out rows, so the export verifies and a
device trains on its raw rows with the loss going down.

Real tables with unscaled columns: UCI wine (13 columns, standard deviations 0.12 to 314) and breast cancer (30
columns, 0.003 to 569), both bundled with scikit-learn. Before this change ``pretrain --data`` trained 2 epochs
on the raw values (wine: test accuracy 0.50) and ``fedge-agent selftest`` on the export diverged ("training did not
lower the loss (22.8 -> 534)").
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from fedge.runtime.trainers import available_backends

WINE_COLUMNS = ["alcohol", "malic_acid", "ash", "alcalinity", "magnesium", "phenols", "flavanoids", "nonflavanoid",
                "proanthocyanins", "color", "hue", "od280", "proline"]


def _wine() -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    from sklearn.datasets import load_wine

    x, y = load_wine(return_X_y=True)
    return np.asarray(x, np.float64), np.asarray(y, np.int64)


def _csv(path: Path, x: NDArray[Any], y: NDArray[Any], names: list[str]) -> Path:
    np.savetxt(path, np.column_stack([x, y]), delimiter=",", header=",".join([*names, "label"]), comments="",
               fmt="%.10g")
    return path


def _selftest(*args: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "fedge.edge_agent.selftest", *args], capture_output=True, text=True,
                         timeout=120)
    report: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    assert out.returncode == 0, (report, out.stderr[-2000:])
    return report


def test_an_unscaled_csv_pretrains_exports_and_trains_on_the_device(tmp_path: Path) -> None:
    """wine.csv as a user has it (header, raw units) -> `fedge pretrain --data` (at most 60 epochs: quick; the
    default bound is 200) -> export -> selftest on another part of the table, with every installed trainer."""
    from fedge.export.exporter import export

    x, y = _wine()
    order = np.random.default_rng(0).permutation(len(y))
    source = _csv(tmp_path / "source.csv", x[order[:120]], y[order[:120]], WINE_COLUMNS)
    device = _csv(tmp_path / "device.csv", x[order[120:]], y[order[120:]], WINE_COLUMNS)
    out = subprocess.run([sys.executable, "-m", "fedge.cli", "pretrain", "--data", str(source), "--epochs", "60",
                          "--out", str(tmp_path / "wine.keras")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "pre-trained mlp on source.csv" in out.stdout and "inputs normalised inside the model" in out.stdout
    epochs = re.search(r"(\d+) epoch\(s\) kept of (\d+) run \(early stopping", out.stdout)
    assert epochs is not None, out.stdout
    assert 1 <= int(epochs[1]) <= int(epochs[2]) <= 60, out.stdout
    assert float(out.stdout.split("test accuracy ")[1].split()[0]) > 0.85, out.stdout  # 3 classes

    lines: list[str] = []
    result = export(str(tmp_path / "wine.keras"), tmp_path / "artifacts", report=lines.append)
    assert result.manifest.num_classes == 3 and list(result.manifest.input.shape) == [13]
    assert len(lines) >= 2 and all(line.endswith(" ok") for line in lines), lines  # tflite and onnx trainers agree
    for backend in available_backends():
        rep = _selftest("--artifacts", str(tmp_path / "artifacts"), "--data", str(device), "--backend", backend)
        assert rep["ok"] and rep["backend"] == backend and rep["samples"] == len(y) - 120
        assert rep["loss_last"] < rep["loss_first"] < 1.5, rep  # a sane start (chance: ln 3) and going down


def test_early_stopping_keeps_the_weights_of_the_best_epoch() -> None:
    from fedge.export.pretrain import _score, fit_zoo

    x, y = _wine()
    order = np.random.default_rng(1).permutation(len(y))
    fit, val = order[:140], order[140:]
    fitted = fit_zoo("mlp", x[fit], y[fit], 3, seed=0, epochs=300, validation=(x[val], y[val]), normalize=True,
                     patience=3)
    assert fitted.epochs_run == fitted.epochs + 3 < 300  # stopped 3 epochs after the best one
    val_loss = _score(fitted.model, x[val].astype(np.float32), y[val]).loss
    assert val_loss == pytest.approx(fitted.val_loss, rel=1e-6)  # the best epoch's weights, not the last ones
    fixed = fit_zoo("mlp", x[fit], y[fit], 3, seed=0, epochs=4)  # no validation rows: exactly the epochs asked
    assert (fixed.epochs, fixed.epochs_run) == (4, 4) and np.isnan(fixed.val_loss)
    assert [layer.name for layer in fixed.model.layers] == ["dense1", "features", "head0"]  # no normalisation


def test_the_normalisation_holds_the_training_rows_statistics_and_spares_constant_columns() -> None:
    from fedge.export.zoo import NORM_LAYER, build_zoo_model, init_weights, set_normalization

    x, _ = _wine()
    x = np.column_stack([x, np.full(len(x), 7.0)])  # a column constant in the source data
    model = build_zoo_model("mlp", 3, x.shape[1], normalize=True)
    init_weights(model, np.random.default_rng(0))
    mean, std = set_normalization(model, x)
    np.testing.assert_allclose(mean, x.mean(axis=0))
    np.testing.assert_allclose(std[:-1], x[:, :-1].std(axis=0))
    assert std[-1] == 1.0  # centred only: a device value of 8 maps to 1, not to 1e7
    z = np.asarray(model.get_layer(NORM_LAYER)(np.array([[*x[0, :-1], 8.0]], np.float32)))
    np.testing.assert_allclose(z[0], (np.array([*x[0, :-1], 8.0]) - mean) / std, rtol=1e-4, atol=1e-4)


def test_a_model_normalising_tiny_scale_columns_verifies_without_calibration_data(tmp_path: Path) -> None:
    """Breast-cancer columns as small as 0.003: uniform [0, 1) samples would sit hundreds of standard deviations
    away from any data (logits in the thousands, float32 rounding above the 1e-4 limit); the export samples around
    the statistics the Normalization layer holds instead."""
    import keras
    from sklearn.datasets import load_breast_cancer

    from fedge.export.exporter import export
    from fedge.export.pretrain import pretrain_arrays
    from fedge.export.split import split_keras
    from fedge.export.verify import SAMPLES, input_statistics, sample_inputs

    x, y = load_breast_cancer(return_X_y=True)
    path = pretrain_arrays("mlp", x[:450], y[:450], 2, 0, tmp_path / "bc.keras", epochs=200, normalize=True,
                           validation_fraction=0.15)
    split = split_keras(keras.models.load_model(path, compile=False))
    stats = input_statistics(split)
    assert stats is not None
    assert np.all(np.abs(stats[0] - x[:450].mean(axis=0)) < 0.3 * x[:450].std(axis=0))  # the training rows'
    samples = sample_inputs(split, None)
    assert samples.shape == (SAMPLES, 30)
    assert np.all(np.abs(samples - stats[0]) <= 6 * stats[1])  # around the data, not uniform [0, 1)
    lines: list[str] = []
    export(str(path), tmp_path / "artifacts", report=lines.append)
    assert lines and all(line.endswith(" ok") for line in lines), lines
