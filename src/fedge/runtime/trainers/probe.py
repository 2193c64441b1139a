"""Probing a training back-end in a child process: does it run, and does it compute what the NumPy reference does?

``probe_backend(artifacts_dir, backend)`` opens the back-end in an :class:`IsolatedTrainer` worker, computes the
backbone features of a fixed synthetic batch, runs :data:`PROBE_STEPS` SGD steps from the artifacts' head and
reads the head and the logits back. The same steps run in NumPy (``head_loss_and_grads``) on the same features;
the back-end is usable when every loss and every head parameter agree within :data:`RTOL`/:data:`ATOL` and
nothing is non-finite. A crash, an exit or a hang of the worker makes it unusable with the worker's reason
(``crashed with SIGSEGV in train_step``). The verdict is a :class:`Verdict`; nothing raises for a bad back-end.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from fedge.protocol.errors import FedgeError, TrainerCrash

__all__ = ["ATOL", "PROBE_STEPS", "RTOL", "Verdict", "probe_backend"]

PROBE_STEPS = 5
LR = 0.05
RTOL = 1e-3
ATOL = 1e-4
F32 = NDArray[np.float32]


@dataclass(frozen=True)
class Verdict:
    """A back-end's probe result: ``ok``, else ``reason`` (a few words, no local data in it)."""

    backend: str
    ok: bool
    reason: str | None = None
    seconds: float = 0.0

    def to_json(self) -> dict[str, object]:
        return {"backend": self.backend, "ok": self.ok, "reason": self.reason, "seconds": round(self.seconds, 3)}


def _disagreement(what: str, got: F32 | float, want: F32 | float) -> str | None:
    g, w = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if g.shape != w.shape:
        return f"{what} has shape {g.shape}, the NumPy reference {w.shape}"
    if not np.isfinite(g).all():
        return f"{what} is not finite"
    err = np.abs(g - w) - (ATOL + RTOL * np.abs(w))
    if (err > 0).any():
        return f"{what} differs from the NumPy reference by {float(np.abs(g - w).max()):.3g}"
    return None


def reference_steps(head: Mapping[str, F32], feats: F32, y: NDArray[np.int64], steps: int,
                    lr: float) -> tuple[list[float], dict[str, F32]]:
    """The losses and the final head of ``steps`` plain SGD steps in NumPy (every row counts)."""
    from fedge.runtime.trainers.numpy_head import head_loss_and_grads

    w = {k: np.asarray(v, np.float32).copy() for k, v in head.items()}
    mask = np.ones(feats.shape[0], np.float32)
    losses: list[float] = []
    for _ in range(steps):
        loss, grads = head_loss_and_grads(w, feats, y, mask)
        losses.append(float(loss))
        w = {k: (w[k] - np.float32(lr) * grads[k]).astype(np.float32) for k in w}
    return losses, w


def probe_backend(artifacts_dir: str | Path, backend: str, *, timeout_s: float = 120.0,
                  env: Mapping[str, str] | None = None) -> Verdict:
    """Probe ``backend`` over the artifacts in ``artifacts_dir`` (see the module docstring)."""
    from fedge.protocol.manifest import load_head, load_manifest
    from fedge.runtime.trainers.isolated import IsolatedTrainer

    t0 = time.monotonic()
    manifest = load_manifest(artifacts_dir)
    head0 = load_head(artifacts_dir)
    b = manifest.train_batch
    rng = np.random.default_rng(0)
    x = rng.random((b, *manifest.input.shape), dtype=np.float32)
    y = rng.integers(0, manifest.num_classes, b).astype(np.int64)
    try:
        with IsolatedTrainer(artifacts_dir, backend, timeout_s=timeout_s, env=env) as trainer:
            feats = trainer.features(x)
            if feats.shape != (b, manifest.feature_dim) or not np.isfinite(feats).all():
                return Verdict(backend, False, f"backbone features have shape {feats.shape} or are not finite",
                               time.monotonic() - t0)
            trainer.set_head(head0)
            losses = [trainer.train_step(feats, y, LR) for _ in range(PROBE_STEPS)]
            head = trainer.get_head()
            logits = trainer.logits(feats)
    except TrainerCrash as exc:
        return Verdict(backend, False, exc.reason, time.monotonic() - t0)
    except (FedgeError, ValueError, TypeError, KeyError) as exc:
        return Verdict(backend, False, f"failed: {type(exc).__name__}: {exc}", time.monotonic() - t0)
    want_losses, want_head = reference_steps(head0, feats, y, PROBE_STEPS, LR)
    from fedge.runtime.trainers.numpy_head import head_forward

    problems = [_disagreement("the training loss", np.array(losses), np.array(want_losses))]
    problems += [_disagreement(f"head parameter {k} after training", head.get(k, np.zeros(0, np.float32)), v)
                 for k, v in want_head.items()]
    problems.append(_disagreement("the logits", logits, head_forward(want_head, feats)))
    first = next((p for p in problems if p is not None), None)
    return Verdict(backend, first is None, first, time.monotonic() - t0)
