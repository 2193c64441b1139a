"""``fedge-agent predict``: the device's own predictions, with the head that serves its data best.

The candidates are the device's personal head (``personal_head.npz``, kept on the device, never sent), the global
head of the installed model and the backbone's source head (w0); a head that does not fit the installed model is
left out. Each is scored on the device's validation split (the rows of its training file that the agent holds out:
``validation_fraction`` of ``data``, chosen by the file's sha256, as in :mod:`fedge.core.evaluation`) and the most
accurate one serves (ties: the lower loss, then personal, global, source). Without validation rows (no training
file, ``validation_fraction`` 0, labels the model cannot have) the first candidate serves, and the choice says why.

Input: every file the agent trains on (``.npz`` with ``x``, ``.csv`` with a header line and the label last, images),
labels ignored, and the same without labels (:func:`fedge.runtime.data.load_inputs`).
"""

from __future__ import annotations

import csv
import io
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from fedge.core.evaluation import split_indices
from fedge.core.losses import Score, log_softmax
from fedge.core.trainer import Trainer
from fedge.core.training import evaluate
from fedge.edge_agent.artifacts import artifacts_dir
from fedge.edge_agent.config import AgentConfig
from fedge.edge_agent.state import AgentState
from fedge.protocol.errors import ArtifactError, DataError
from fedge.protocol.manifest import Manifest, load_head, load_manifest
from fedge.protocol.types import Head
from fedge.runtime.data import conform, load_inputs, load_local

__all__ = ["HeadChoice", "Prediction", "candidate_heads", "choose_head", "predict", "write_csv"]


@dataclass(frozen=True)
class HeadChoice:
    """The head that serves (``which``: ``personal``, ``global <version>`` or ``source``), the validation score of
    every candidate (empty when none could be scored), the number of validation rows, and why nothing was
    compared (``note``, empty when the scores decided)."""

    which: str
    head: Head
    scores: dict[str, Score] = field(default_factory=dict)
    val_n: int = 0
    note: str = ""

    def describe(self) -> str:
        """One line for the operator: which head and why."""
        if not self.scores:
            return f"the {self.which} head (not compared on validation data: {self.note})"
        parts = ", ".join(f"{name} {s.accuracy:.3f} (loss {s.loss:.4f})" for name, s in self.scores.items())
        return f"the {self.which} head, the best on {self.val_n} validation rows (accuracy, loss): {parts}"


@dataclass(frozen=True)
class Prediction:
    """The head used and, for every input row, the predicted class and its probability."""

    choice: HeadChoice
    classes: NDArray[np.int64]
    probability: NDArray[np.float64]


def candidate_heads(config: AgentConfig, backbone: str, spec: dict[str, tuple[int, ...]]) -> list[tuple[str, Head]]:
    """``[(name, head)]`` in order of preference: personal, the held global head, source; those that fit ``spec``."""
    state = AgentState.load(config.state_dir / "state.json")
    files = [("personal", config.state_dir / "personal_head.npz")]
    if state.model_version:
        files.append((f"global {state.model_version}", config.state_dir / "heads" / f"{state.model_version}.npz"))
    out: list[tuple[str, Head]] = []
    for which, path in files:
        if path.is_file():
            try:
                head = load_head(path)
            except ArtifactError:
                continue
            if {k: v.shape for k, v in head.items()} == spec:
                out.append((which, head))
    out.append(("source", load_head(artifacts_dir(config.state_dir / "artifacts", backbone))))
    return out


def validation_rows(config: AgentConfig, trainer: Trainer, manifest: Manifest
                    ) -> tuple[NDArray[np.float32], NDArray[np.int64]] | str:
    """Backbone features and labels of the device's validation split, or why there are none."""
    try:
        data = load_local(config.data, manifest.input.shape, manifest.input.layout)
    except DataError as exc:
        return f"training data unreadable: {exc}"
    _, val = split_indices(len(data.y), config.validation_fraction, data.sha256)
    if len(val) == 0:
        return f"no validation rows (validation_fraction {config.validation_fraction:g}, {len(data.y)} rows)"
    y = data.y[val]
    bad = y[y >= manifest.num_classes]
    if bad.size:
        return f"{data.path}: label {int(bad[0])} is outside [0, {manifest.num_classes})"
    x = conform(data, manifest.input.shape, manifest.input.layout)[val]
    return trainer.features(x), y


def choose_head(config: AgentConfig, trainer: Trainer, manifest: Manifest, backbone: str) -> HeadChoice:
    """The candidate head (:func:`candidate_heads`) most accurate on the device's validation split."""
    candidates = candidate_heads(config, backbone, {p.name: p.shape for p in manifest.head})
    rows = validation_rows(config, trainer, manifest)
    if isinstance(rows, str):
        which, head = candidates[0]
        return HeadChoice(which, head, note=rows)
    feats, y = rows
    scores: dict[str, Score] = {}
    for which, head in candidates:
        trainer.set_head(head)
        scores[which] = evaluate(trainer, feats, y)
    rank = {which: i for i, (which, _) in enumerate(candidates)}
    best = min(scores, key=lambda w: (-scores[w].accuracy, scores[w].loss, rank[w]))
    return HeadChoice(best, dict(candidates)[best], scores, len(y))


def predict(config: AgentConfig, data: Path, backend: str | None = None) -> Prediction:
    """The predicted class and its probability for every row of ``data``, with :func:`choose_head`'s head."""
    from fedge.runtime.trainers import open_trainer

    state = AgentState.load(config.state_dir / "state.json")
    backbone = state.versions.get(state.model_version or "")
    if backbone is None:
        raise ArtifactError(f"no model installed in {config.state_dir}: run the agent until it receives one")
    folder = artifacts_dir(config.state_dir / "artifacts", backbone)
    manifest = load_manifest(folder)
    x = load_inputs(data, manifest.input.shape, manifest.input.layout)  # bad input fails before any scoring
    trainer = open_trainer(folder, backend=backend or config.backend)
    choice = choose_head(config, trainer, manifest, backbone)
    trainer.set_head(choice.head)
    logp = log_softmax(trainer.logits(trainer.features(x)))
    return Prediction(choice, logp.argmax(axis=1).astype(np.int64), np.exp(logp.max(axis=1)))


def write_csv(pred: NDArray[np.int64], prob: NDArray[np.float64], out: Path | None) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["row", "class", "probability"])
    for i, (c, p) in enumerate(zip(pred.tolist(), prob.tolist(), strict=True)):
        w.writerow([i, c, f"{p:.6f}"])
    if out is None:
        sys.stdout.write(buf.getvalue())
    else:
        out.write_text(buf.getvalue(), encoding="utf-8")
