"""ONNX Runtime on-device training artifacts (``ort/head/`` and ``ort/full/``).

Both use ``LossType.CrossEntropyLoss`` (mean softmax cross-entropy; labels int64, input
``labels``) and ``OptimType.SGD``. Only head parameters require gradients; in ``ort/full``
the backbone parameters are frozen.
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

from fedge.export.onnx_builder import full_graph, head_graph
from fedge.export.zoo import SplitModel
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


def write_ort_artifacts(split: SplitModel, ort_dir: str | Path) -> list[Path]:
    """Write ``ort_dir/head/`` and ``ort_dir/full/``; returns every file written."""
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


def _generate(artifacts: Any, split: SplitModel, root: Path, head_params: list[str], written: list[Path]) -> None:
    for sub, model, frozen in (
        ("head", head_graph(split), []),
        ("full", full_graph(split), split.backbone_param_names()),
    ):
        out = root / sub
        out.mkdir(parents=True, exist_ok=True)
        artifacts.generate_artifacts(
            model,
            requires_grad=head_params,
            frozen_params=frozen,
            loss=artifacts.LossType.CrossEntropyLoss,
            optimizer=artifacts.OptimType.SGD,
            artifact_directory=str(out),
        )
        written.extend(out / f for f in ORT_FILES)
