"""Behaviour common to every installed trainer, and back-end selection."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedge.core.training import evaluate, fit
from fedge.protocol.errors import ArtifactError, ConfigError
from fedge.protocol.manifest import load_head, load_manifest
from fedge.runtime.trainers import Trainer, available_backends, open_trainer
from fedge.runtime.trainers.litert import LiteRTTrainer

BACKENDS = available_backends()


@pytest.mark.parametrize("backend", BACKENDS)
def test_trainer_contract(backend: str, artifacts_dir: Path) -> None:
    m = load_manifest(artifacts_dir)
    t = open_trainer(artifacts_dir, backend)
    assert isinstance(t, Trainer) and t.name == backend and t.batch_size == m.train_batch
    head0 = t.get_head()
    assert list(head0) == [p.name for p in m.head]
    initial = load_head(artifacts_dir)
    for k, v in initial.items():  # every back-end starts from the exported head
        np.testing.assert_allclose(head0[k], v, rtol=1e-6, atol=1e-7)
    rng = np.random.default_rng(0)
    x = rng.random((45, *m.input.shape), dtype=np.float32)
    feats = t.features(x)
    assert feats.shape == (45, m.feature_dim) and feats.dtype == np.float32
    y = rng.integers(0, m.num_classes, 45)
    logits = t.logits(feats)
    assert logits.shape == (45, m.num_classes)
    loss = t.train_step(feats[:7], y[:7], 0.05)
    assert np.isfinite(loss) and loss > 0
    assert any(not np.array_equal(v, head0[k]) for k, v in t.get_head().items())
    with pytest.raises(ValueError):
        t.train_step(feats[:33], y[:33], 0.05)
    t.set_head(head0)
    for k, v in t.get_head().items():
        np.testing.assert_array_equal(v, head0[k])
    np.testing.assert_allclose(t.logits(feats), logits, rtol=1e-5, atol=1e-5)
    before, _ = evaluate(t, feats, y)
    res = fit(t, feats, y, epochs=15, lr=0.1, rng=np.random.default_rng(1))
    assert res.steps == 15 * 2
    after, acc = evaluate(t, feats, y)
    assert after < before and 0.0 <= acc <= 1.0


def test_set_head_rejects_wrong_shapes(artifacts_dir: Path) -> None:
    t = open_trainer(artifacts_dir, BACKENDS[0])
    head = t.get_head()
    head["h0_bias"] = np.zeros(3, np.float32)
    with pytest.raises(ArtifactError, match="h0_bias"):
        t.set_head(head)


def test_auto_prefers_litert(artifacts_dir: Path) -> None:
    assert BACKENDS[0] == "litert"
    assert open_trainer(artifacts_dir).name == "litert"


def test_litert_features_pad_without_leaking_between_rows(artifacts_dir: Path) -> None:
    t = LiteRTTrainer.open(artifacts_dir)
    m = load_manifest(artifacts_dir)
    x = np.random.default_rng(3).random((70, *m.input.shape), dtype=np.float32)
    full = t.features(x)
    np.testing.assert_allclose(t.features(x[:5]), full[:5], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(t.features(x[64:]), full[64:], rtol=1e-6, atol=1e-6)
    assert t.features(x[:0]).shape == (0, m.feature_dim)


@pytest.mark.full_env
def test_litert_features_match_backbone_onnx(artifacts_dir: Path) -> None:
    from fedge.runtime.trainers.backbone import OnnxBackbone

    m = load_manifest(artifacts_dir)
    x = np.random.default_rng(4).random((50, *m.input.shape), dtype=np.float32)
    lite = LiteRTTrainer.open(artifacts_dir).features(x)
    onnx = OnnxBackbone(artifacts_dir / "backbone.onnx")(x)
    assert float(np.abs(lite).max()) > 0
    np.testing.assert_allclose(lite, onnx, rtol=1e-4, atol=1e-5 * float(np.abs(onnx).max()))


def test_unknown_backend_is_a_config_error(artifacts_dir: Path) -> None:
    with pytest.raises(ConfigError, match="backend"):
        open_trainer(artifacts_dir, "tensorflow")


def test_missing_artifacts_raise_artifact_error(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError):
        open_trainer(tmp_path, BACKENDS[0])


@pytest.mark.parametrize(
    ("hidden", "backend", "hint"),
    [("onnxruntime", "ort", "onnxruntime-training-cpu"), ("ai_edge_litert", "litert", "ai-edge-litert")],
)
def test_requested_backend_not_installed_says_how_to_install(
    hidden: str, backend: str, hint: str, artifacts_dir: Path
) -> None:
    code = (
        "import sys\n"
        f"sys.modules[{hidden!r}] = None; sys.modules['tflite_runtime'] = None\n"
        "from fedge.runtime.trainers import open_trainer, available_backends\n"
        "from fedge.protocol.errors import ConfigError\n"
        f"assert {backend!r} not in available_backends(), available_backends()\n"
        "try:\n"
        f"    open_trainer({str(artifacts_dir)!r}, {backend!r})\n"
        "except ConfigError as exc:\n"
        "    print(exc)\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "not installed" in out.stdout and hint in out.stdout


def test_proximal_pull_is_the_same_on_every_trainer_and_does_what_it_says(artifacts_dir: Path) -> None:
    """fit(..., prox=Prox(anchor, mu)): the same heads on every installed trainer (parity), mu = 0 is plain SGD,
    and a strong pull keeps the head near its anchor."""
    from fedge.core.training import Prox

    rng = np.random.default_rng(5)
    head0 = load_head(artifacts_dir)
    anchor = {k: v + np.float32(0.05) for k, v in head0.items()}
    trainers = {b: open_trainer(artifacts_dir, b) for b in available_backends()}
    feats = np.abs(rng.normal(size=(96, load_manifest(artifacts_dir).feature_dim))).astype(np.float32)
    y = rng.integers(0, load_manifest(artifacts_dir).num_classes, 96)

    def run(t: Trainer, mu: float) -> dict[str, np.ndarray]:
        t.set_head(head0)
        fit(t, feats, y, 2, 0.1, np.random.default_rng(1), prox=Prox(anchor, mu) if mu else None)
        return {k: np.asarray(v) for k, v in t.get_head().items()}

    pulled = {b: run(t, 0.5) for b, t in trainers.items()}
    ref = pulled["numpy"]
    for b, head in pulled.items():
        for k in ref:
            np.testing.assert_allclose(head[k], ref[k], rtol=1e-3, atol=1e-4, err_msg=f"{b}: {k}")
    free = run(trainers["numpy"], 0.0)
    strong = run(trainers["numpy"], 50.0)

    def dist(h: dict[str, np.ndarray]) -> float:
        return float(np.sqrt(sum(np.square(h[k] - anchor[k]).sum() for k in h)))

    assert dist(strong) < 0.1 * dist(free) and dist(strong) < dist(pulled["numpy"]) < dist(free)
