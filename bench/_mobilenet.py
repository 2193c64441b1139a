"""The real-backbone part of ``bench/train_step.py``: a Keras MobileNetV2 (alpha 0.35, 96x96x3, weights=None,
Dense head of 5) exported float and int8, and the int8 accuracy cost on the demo's pre-trained cnn28.

* ``mobilenet_feature_ms_per_image``: LiteRT ``features`` of the float export on ONE thread, batch of 32, best
  of 5, per image (int8: ``mobilenet_int8_feature_ms_per_image``).
* ``mobilenet_head_step_ms_<trainer>``: one head train step (batch 32 of 1280 features) on each trainer;
  ``mobilenet_head_step_ms_max`` is the slowest.
* ``mobilenet_agent_peak_rss_mb``: an agent-only process (no TensorFlow) that opens the LiteRT trainer, computes
  the features of 128 images and fine-tunes the head for 5 epochs.
* ``mobilenet_{float,int8}_tflite_bytes`` and ``mobilenet_int8_size_ratio`` (int8 .tflite bytes / float).
* ``int8_top1_drop_pts``: cnn28 pre-trained on Fashion-MNIST (2 epochs), exported float and int8 (calibrated on
  256 training images); top-1 accuracy on the 10,000 test images, float minus int8, in points.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedge.runtime.trainers import available_backends, open_trainer

ROOT = Path(__file__).resolve().parent.parent


def _tflite_bytes(d: Path) -> int:
    from fedge.protocol.manifest import load_manifest

    return sum(e.size for name, e in load_manifest(d).files.items() if name.endswith(".tflite"))


def _features_ms_per_image(d: Path, x: np.ndarray[Any, Any]) -> float:
    from fedge.runtime.trainers.litert import LiteRTTrainer

    trainer = LiteRTTrainer.open(d, num_threads=1)
    trainer.features(x)  # warm-up (allocation, XNNPACK packing)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        trainer.features(x)
        best = min(best, time.perf_counter() - t0)
    return best * 1e3 / len(x)


def _head_step_ms(d: Path, backend: str, rng: np.random.Generator) -> float:
    trainer = open_trainer(d, backend)
    f = np.abs(rng.normal(size=(trainer.batch_size, 1280))).astype(np.float32)
    y = rng.integers(0, 5, trainer.batch_size)
    for _ in range(20):
        trainer.train_step(f, y, 0.01)
    n = 300
    t0 = time.perf_counter()
    for _ in range(n):
        trainer.train_step(f, y, 0.01)
    return (time.perf_counter() - t0) * 1e3 / n


def _agent_rss(d: Path, tmp: Path, rss_child: str) -> dict[str, Any]:
    rng = np.random.default_rng(1)
    data = tmp / "mobilenet-local.npz"
    np.savez(data, x=rng.random((128, 96, 96, 3), dtype=np.float32), y=rng.integers(0, 5, 128))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", rss_child, str(d), str(data)], capture_output=True, text=True,
                          timeout=600, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"MobileNet RSS subprocess failed: {proc.stderr.strip()[-2000:]}")
    child: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    if child["tensorflow_imported"]:
        raise RuntimeError("the agent subprocess imported TensorFlow/Keras/torch")
    return child


def run_mobilenet(tmp: Path, rss_child: str) -> dict[str, Any]:
    from fedge.export.testing import export_mobilenet

    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    export_mobilenet(tmp / "mobilenet")
    out["mobilenet_export_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    export_mobilenet(tmp / "mobilenet-int8", quantize="int8")
    out["mobilenet_int8_export_s"] = round(time.perf_counter() - t0, 1)
    rng = np.random.default_rng(0)
    x = rng.random((32, 96, 96, 3), dtype=np.float32)
    out["mobilenet_feature_ms_per_image"] = round(_features_ms_per_image(tmp / "mobilenet", x), 3)
    out["mobilenet_int8_feature_ms_per_image"] = round(_features_ms_per_image(tmp / "mobilenet-int8", x), 3)
    steps = {b: round(_head_step_ms(tmp / "mobilenet", b, rng), 4) for b in available_backends()}
    out.update({f"mobilenet_head_step_ms_{b}": v for b, v in steps.items()})
    out["mobilenet_head_step_ms_max"] = max(steps.values())
    child = _agent_rss(tmp / "mobilenet", tmp, rss_child)
    out["mobilenet_agent_peak_rss_mb"] = round(child["peak_rss_mb"], 1)
    out["mobilenet_agent_loss_first_last"] = [child["loss_first"], child["loss_last"]]
    f_bytes, q_bytes = _tflite_bytes(tmp / "mobilenet"), _tflite_bytes(tmp / "mobilenet-int8")
    out.update(mobilenet_float_tflite_bytes=f_bytes, mobilenet_int8_tflite_bytes=q_bytes,
               mobilenet_int8_size_ratio=round(q_bytes / f_bytes, 4))
    return out


def int8_top1_drop(tmp: Path) -> dict[str, Any]:
    """cnn28 pre-trained on Fashion-MNIST, exported float and int8: top-1 on the 10,000 test images."""
    from fedge.datasets.source import load_source
    from fedge.export.exporter import export
    from fedge.export.pretrain import _train

    data = load_source("fashion-mnist")
    model = _train("cnn28", data.x_train, data.y_train, data.num_classes, seed=0, epochs=2)
    calib = tmp / "cnn28-calibration.npz"
    np.savez(calib, x=data.x_train[np.random.default_rng(0).permutation(len(data.x_train))[:256]])
    export(model, tmp / "cnn28-float")
    export(model, tmp / "cnn28-int8", quantize="int8", calibration=calib)
    acc = {}
    for name in ("float", "int8"):
        trainer = open_trainer(tmp / f"cnn28-{name}", "litert")
        pred = np.argmax(trainer.logits(trainer.features(data.x_test)), axis=1)
        acc[name] = float(np.mean(pred == data.y_test))
    return {
        "cnn28_float_top1": round(acc["float"], 4),
        "cnn28_int8_top1": round(acc["int8"], 4),
        "int8_top1_drop_pts": round(100 * (acc["float"] - acc["int8"]), 2),
        "cnn28_int8_size_ratio": round(_tflite_bytes(tmp / "cnn28-int8") / _tflite_bytes(tmp / "cnn28-float"), 4),
    }
