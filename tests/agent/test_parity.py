"""Every installed back-end trains the head exactly like a plain NumPy reference (and like each other).

Same initial head, same data order, SGD lr 0.1, batch 32 with a short last batch, 20 steps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray

from fedge.protocol.manifest import load_manifest
from fedge.runtime.trainers import available_backends, open_trainer

BACKENDS = available_backends()
STEPS = 20
LR = 0.1
N = 77  # 32 + 32 + 13 per epoch: every third step is a short batch
RTOL = 1e-4

Head = dict[str, NDArray[np.float64]]
Setup = tuple[dict[str, NDArray[np.float32]], list[NDArray[np.int64]], NDArray[np.float32], NDArray[np.int64]]


def reference_sgd(head: Head, batches: list[tuple[NDArray[np.float64], NDArray[np.int64]]], lr: float) -> list[float]:
    """Independent float64 reference: ReLU MLP, mean softmax cross-entropy over the rows given, SGD."""
    n_layers = len(head) // 2
    losses = []
    for f, y in batches:
        xs, zs = [f], []
        for i in range(n_layers):
            z = xs[-1] @ head[f"h{i}_kernel"] + head[f"h{i}_bias"][None, :]
            zs.append(z)
            xs.append(np.maximum(z, 0.0) if i < n_layers - 1 else z)
        logits = xs[-1]
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        onehot = np.eye(logits.shape[1])[y]
        losses.append(float(-(onehot * np.log(p)).sum() / len(y)))
        delta = (p - onehot) / len(y)
        for i in reversed(range(n_layers)):
            gk, gb = xs[i].T @ delta, delta.sum(0)
            if i > 0:
                delta = (delta @ head[f"h{i}_kernel"].T) * (zs[i - 1] > 0)
            head[f"h{i}_kernel"] = head[f"h{i}_kernel"] - lr * gk
            head[f"h{i}_bias"] = head[f"h{i}_bias"] - lr * gb
    return losses


def _rel(a: NDArray[np.floating], b: NDArray[np.floating]) -> float:
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-12))


@pytest.fixture(scope="module")
def setup(artifacts_dir: Path) -> Setup:
    m = load_manifest(artifacts_dir)
    rng = np.random.default_rng(42)
    head = {}
    for p in m.head:
        scale = 1.0 / np.sqrt(p.shape[0]) if p.name.endswith("kernel") else 0.1
        head[p.name] = rng.normal(0.0, scale, p.shape).astype(np.float32)
    feats = np.abs(rng.normal(0.0, 1.0, (N, m.feature_dim))).astype(np.float32)
    y = rng.integers(0, m.num_classes, N).astype(np.int64)
    order: list[NDArray[np.int64]] = []
    while len(order) < STEPS:
        perm = rng.permutation(N)
        order += [perm[s : s + m.train_batch] for s in range(0, N, m.train_batch)]
    return head, order[:STEPS], feats, y


def _train(backend: str, artifacts_dir: Path, setup: Setup) -> tuple[list[float], dict[str, NDArray[np.float32]]]:
    head, order, feats, y = setup
    t = open_trainer(artifacts_dir, backend)
    assert t.name == backend and t.batch_size == 32
    t.set_head(head)
    losses = [t.train_step(feats[idx], y[idx], LR) for idx in order]
    return losses, t.get_head()


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_matches_numpy_reference(backend: str, artifacts_dir: Path, setup: Setup) -> None:
    head, order, feats, y = setup
    assert any(len(idx) < 32 for idx in order)  # the short, padded+masked batch is exercised
    ref_head = {k: v.astype(np.float64) for k, v in head.items()}
    ref_losses = reference_sgd(ref_head, [(feats[i].astype(np.float64), y[i]) for i in order], LR)
    losses, final = _train(backend, artifacts_dir, setup)
    np.testing.assert_allclose(losses, ref_losses, rtol=RTOL)
    assert ref_losses[-1] < ref_losses[0]
    for name, ref in ref_head.items():
        assert final[name].dtype == np.float32
        assert _rel(final[name], ref) < RTOL, (name, _rel(final[name], ref))
        assert _rel(final[name], head[name].astype(np.float64)) > 1e-3  # training moved every parameter


@pytest.mark.parametrize("backend", BACKENDS[1:])
def test_backends_agree_with_each_other(backend: str, artifacts_dir: Path, setup: Setup) -> None:
    base_losses, base_head = _train(BACKENDS[0], artifacts_dir, setup)
    losses, final = _train(backend, artifacts_dir, setup)
    np.testing.assert_allclose(losses, base_losses, rtol=RTOL)
    for name, ref in base_head.items():
        assert _rel(final[name], ref) < RTOL, name


@pytest.mark.full_env
def test_full_env_has_every_backend() -> None:
    assert available_backends() == ["litert", "ort", "numpy"]
