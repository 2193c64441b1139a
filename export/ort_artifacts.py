"""ONNX Runtime on-device training artifacts of the head (``ort/head/``).

``LossType.CrossEntropyLoss`` (mean softmax cross-entropy; labels int64, input ``labels``) and
``OptimType.SGD`` over the head graph (``features -> logits``): devices train on cached backbone features,
so no artifact holds the backbone (a full-model training graph costs 84-153 ms a step on a MobileNet and
no trainer uses it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedge.export.onnx_graphs import head_graph
from fedge.export.split import Split
from fedge.runtime.trainers.ort_shim import import_training

__all__ = ["ORT_FILES", "write_ort_artifacts"]

ORT_FILES: tuple[str, ...] = ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint")


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """ORT's gradient builder prints INFO lines straight to fd 2; show them only if something fails."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        ok = False
        try:
            yield
            ok = True
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if not ok:
                sink.seek(0)
                sys.stderr.write(sink.read().decode(errors="replace"))


class _BelowWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


def write_ort_artifacts(split: Split, ort_dir: str | Path) -> list[Path]:
    """Write ``ort_dir/head/``; returns every file written."""
    artifacts = import_training("artifacts")
    root = Path(ort_dir)
    head_params = list(split.head)
    written: list[Path] = []
    # generate_artifacts logs every file it saves at INFO straight to the root logger: filter those
    # records (a logger filter, not a level change, so nobody else's logging is affected).
    root_logger = logging.getLogger()
    quiet = _BelowWarning()
    root_logger.addFilter(quiet)
    try:
        with _quiet_stderr():
            _generate(artifacts, split, root, head_params, written)
    finally:
        root_logger.removeFilter(quiet)
    return written


def _generate(artifacts: Any, split: Split, root: Path, head_params: list[str], written: list[Path]) -> None:
    out = root / "head"
    out.mkdir(parents=True, exist_ok=True)
    artifacts.generate_artifacts(
        head_graph(split),
        requires_grad=head_params,
        frozen_params=[],
        loss=artifacts.LossType.CrossEntropyLoss,
        optimizer=artifacts.OptimType.SGD,
        artifact_directory=str(out),
    )
    written.extend(out / f for f in ORT_FILES)
