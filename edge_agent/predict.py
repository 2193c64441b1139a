"""``fedge-agent predict``: the device's own predictions, with its personalised head.

The personalised head is the head the device last trained from the global model (``personal_head.npz``, kept
on the device, never sent); when it does not fit the installed model, the global head the device holds is used,
then the source head. Input: ``.npz`` with ``x`` (``y`` ignored), ``.csv`` of feature rows (a trailing label
column, as in training files, is dropped when the width says so), or images (a folder of class sub-folders, or
a ``.csv`` of ``file,label``; labels ignored).
"""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from fedge.core.losses import log_softmax
from fedge.edge_agent.artifacts import artifacts_dir
from fedge.edge_agent.config import AgentConfig
from fedge.edge_agent.state import AgentState
from fedge.protocol.errors import ArtifactError, DataError
from fedge.protocol.manifest import load_head, load_manifest
from fedge.protocol.types import Head
from fedge.runtime.images import is_image_csv


def _images(path: Path) -> bool:
    if path.is_dir():
        return True
    try:
        return path.suffix.lower() == ".csv" and is_image_csv(path.read_bytes())
    except OSError:
        return False  # reported below, with the other read errors


def _inputs(path: Path, shape: tuple[int, ...], layout: str = "") -> NDArray[np.float32]:
    width = int(np.prod(shape))
    if _images(path):
        from fedge.runtime.data import load_local

        return load_local(path, shape, layout).x  # images: decoded at the model's input size
    try:
        if path.suffix.lower() == ".npz":
            with np.load(path, allow_pickle=False) as z:
                if "x" not in z.files:
                    raise DataError(f"{path}: no array 'x'")
                x = np.asarray(z["x"], dtype=np.float32)
        elif path.suffix.lower() == ".csv":
            rows = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2)
            if rows.shape[1] == width + 1:
                rows = rows[:, :width]  # a training file: the last column is the label
            x = rows.astype(np.float32)
        else:
            raise DataError(f"{path}: unknown file type {path.suffix!r}; expected .npz or .csv")
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read: {exc}") from exc
    if int(np.prod(x.shape[1:])) != width:
        raise DataError(f"{path}: samples of shape {list(x.shape[1:])}; the model takes {list(shape)}")
    return x.reshape((x.shape[0], *shape))


def choose_head(config: AgentConfig, backbone: str, spec: dict[str, tuple[int, ...]]) -> tuple[str, Head]:
    """``(which, head)``: personal, else the global head of the installed model, else the source head."""
    state = AgentState.load(config.state_dir / "state.json")
    candidates = [("personal", config.state_dir / "personal_head.npz")]
    if state.model_version:
        candidates.append((f"global {state.model_version}", config.state_dir / "heads" / f"{state.model_version}.npz"))
    for which, path in candidates:
        if path.is_file():
            try:
                head = load_head(path)
            except ArtifactError:
                continue
            if {k: v.shape for k, v in head.items()} == spec:
                return which, head
    return "source", load_head(artifacts_dir(config.state_dir / "artifacts", backbone))


def predict(config: AgentConfig, data: Path, backend: str | None = None) -> tuple[str, NDArray[np.int64],
                                                                                   NDArray[np.float64]]:
    """``(head used, predicted class, its probability)`` for every row of ``data``."""
    from fedge.runtime.trainers import open_trainer

    state = AgentState.load(config.state_dir / "state.json")
    backbone = state.versions.get(state.model_version or "")
    if backbone is None:
        raise ArtifactError(f"no model installed in {config.state_dir}: run the agent until it receives one")
    folder = artifacts_dir(config.state_dir / "artifacts", backbone)
    manifest = load_manifest(folder)
    trainer = open_trainer(folder, backend=backend or config.backend)
    which, head = choose_head(config, backbone, {p.name: p.shape for p in manifest.head})
    trainer.set_head(head)
    logp = log_softmax(trainer.logits(trainer.features(_inputs(data, manifest.input.shape, manifest.input.layout))))
    return which, logp.argmax(axis=1).astype(np.int64), np.exp(logp.max(axis=1))


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


__all__ = ["choose_head", "predict", "write_csv"]
