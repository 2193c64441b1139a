"""Score a head on the hub's held-out data: backbone features once per backbone, then heads are cheap.

The trainer (``fedge.runtime.trainers.open_trainer``) runs the backbone and the head forward; the
features of the eval set are computed once per backbone sha256 and kept in memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedge.core.losses import Score, score
from fedge.protocol.errors import ArtifactError

log = logging.getLogger("fedge.runtime.evaluate")

EvalFn = Callable[[Path, str, Mapping[str, NDArray[np.float32]]], Score | None]


class Evaluator:
    """``evaluator(artifacts_dir, backbone_sha256, head) -> Score(loss, accuracy)``; None without eval data."""

    def __init__(self, eval_data: Path | None, backend: str = "auto") -> None:
        self.eval_data = eval_data
        self.backend = backend
        self._trainers: dict[str, Any] = {}
        self._features: dict[str, NDArray[np.float32]] = {}
        self._y: NDArray[np.int64] | None = None

    def __call__(self, artifacts_dir: Path, backbone_sha256: str,
                 head: Mapping[str, NDArray[np.float32]]) -> Score | None:
        if self.eval_data is None:
            return None
        from fedge.protocol.manifest import load_manifest
        from fedge.runtime.data import load_local
        from fedge.runtime.trainers import open_trainer

        trainer = self._trainers.get(backbone_sha256)
        if trainer is None:
            trainer = open_trainer(artifacts_dir, self.backend)
            manifest = load_manifest(artifacts_dir)
            data = load_local(self.eval_data, manifest.input.shape, manifest.input.layout)
            self._features = {backbone_sha256: trainer.features(data.x)}
            self._trainers = {backbone_sha256: trainer}
            self._y = data.y
            log.info("eval features for backbone %s: %s", backbone_sha256[:16], self._features[backbone_sha256].shape)
        if self._y is None:
            raise ArtifactError(f"no labels loaded from {self.eval_data}")
        trainer.set_head(dict(head))
        return score(trainer.logits(self._features[backbone_sha256]), self._y)


__all__ = ["EvalFn", "Evaluator", "Score"]
