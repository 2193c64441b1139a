"""The NumPy head maths against an independent float64 reference and finite differences."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
from numpy.typing import NDArray

from fedge.core.losses import softmax_xent
from fedge.core.training import evaluate, fit
from fedge.protocol.errors import ArtifactError
from fedge.runtime.trainers.numpy_head import NumpyTrainer, head_forward, head_loss_and_grads

F = 6


def make_head(rng: np.random.Generator, sizes: list[int]) -> dict[str, NDArray[np.float32]]:
    head: dict[str, NDArray[np.float32]] = {}
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        head[f"h{i}_kernel"] = rng.normal(0, 0.5, (a, b)).astype(np.float32)
        head[f"h{i}_bias"] = rng.normal(0, 0.1, (b,)).astype(np.float32)
    return head


def ref_loss(
    head: dict[str, NDArray[np.float64]], f: NDArray[np.float64], y: NDArray[np.int64], mask: NDArray[np.float64]
) -> float:
    n_layers = len(head) // 2
    a = f
    for i in range(n_layers):
        a = a @ head[f"h{i}_kernel"] + head[f"h{i}_bias"]
        if i < n_layers - 1:
            a = np.where(a > 0, a, 0.0)
    m = a.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(a - m).sum(axis=1))
    nll = lse - a[np.arange(len(y)), y]
    return float((mask * nll).sum() / max(mask.sum(), 1.0))


@pytest.mark.parametrize("sizes", [[F, 5, 4], [F, 3], [F, 7, 5, 4]])
def test_gradients_match_central_differences(sizes: list[int]) -> None:
    rng = np.random.default_rng(1)
    head = make_head(rng, sizes)
    f = rng.normal(size=(9, F)).astype(np.float32)
    y = rng.integers(0, sizes[-1], 9)
    mask = np.array([1, 1, 1, 0, 1, 1, 0, 1, 1], dtype=np.float32)
    loss, grads = head_loss_and_grads(head, f, y, mask)
    h64 = {k: v.astype(np.float64) for k, v in head.items()}
    assert loss == pytest.approx(ref_loss(h64, f.astype(np.float64), y, mask.astype(np.float64)), rel=1e-5)
    eps = 1e-6
    for name, p in h64.items():
        num = np.zeros_like(p)
        for idx in np.ndindex(p.shape):
            old = p[idx]
            p[idx] = old + eps
            up = ref_loss(h64, f.astype(np.float64), y, mask.astype(np.float64))
            p[idx] = old - eps
            down = ref_loss(h64, f.astype(np.float64), y, mask.astype(np.float64))
            p[idx] = old
            num[idx] = (up - down) / (2 * eps)
        assert grads[name].dtype == np.float32
        np.testing.assert_allclose(grads[name], num, rtol=2e-3, atol=2e-5, err_msg=name)


def test_masked_rows_do_not_change_loss_or_gradient() -> None:
    rng = np.random.default_rng(2)
    head = make_head(rng, [F, 5, 3])
    f = rng.normal(size=(4, F)).astype(np.float32)
    y = rng.integers(0, 3, 4)
    loss_a, g_a = head_loss_and_grads(head, f, y, np.ones(4, np.float32))
    fp = np.concatenate([f, rng.normal(size=(3, F)).astype(np.float32)])
    yp = np.concatenate([y, [2, 0, 1]])
    mask = np.array([1, 1, 1, 1, 0, 0, 0], np.float32)
    loss_b, g_b = head_loss_and_grads(head, fp, yp, mask)
    assert loss_b == pytest.approx(loss_a, rel=1e-6)
    for k in g_a:
        np.testing.assert_allclose(g_b[k], g_a[k], rtol=1e-5, atol=1e-7)


def test_softmax_xent_is_stable_for_large_logits() -> None:
    logits = np.array([[1000.0, 0.0, -1000.0], [0.0, 0.0, 0.0]], np.float32)
    loss, g = softmax_xent(logits, np.array([0, 1]), np.ones(2, np.float32))
    assert np.isfinite(loss) and loss == pytest.approx(np.log(3) / 2, rel=1e-5)
    assert np.isfinite(g).all()


def test_all_masked_batch_has_zero_loss_and_gradient() -> None:
    loss, g = softmax_xent(np.ones((2, 3), np.float32), np.array([0, 1]), np.zeros(2, np.float32))
    assert loss == 0.0 and not g.any()


def linear_backbone(x: NDArray[np.float32]) -> NDArray[np.float32]:
    return np.asarray(x.reshape(x.shape[0], -1)[:, :F], dtype=np.float32)


def make_trainer(seed: int = 3, batch: int = 8) -> NumpyTrainer:
    head = make_head(np.random.default_rng(seed), [F, 5, 3])
    spec = [(k, tuple(v.shape)) for k, v in head.items()]
    return NumpyTrainer(head, spec, ["relu", "linear"], batch, linear_backbone)


def test_train_step_is_sgd_on_the_reference_gradient() -> None:
    t = make_trainer()
    before = t.get_head()
    rng = np.random.default_rng(4)
    f = rng.normal(size=(5, F)).astype(np.float32)
    y = rng.integers(0, 3, 5)
    loss = t.train_step(f, y, 0.1)
    ref, grads = head_loss_and_grads(before, f, y, np.ones(5, np.float32))
    assert loss == pytest.approx(ref)
    after = t.get_head()
    for k in before:
        np.testing.assert_allclose(after[k], before[k] - np.float32(0.1) * grads[k], rtol=1e-6, atol=1e-7)


def test_set_head_copies_and_checks_shapes() -> None:
    t = make_trainer()
    h = t.get_head()
    t.set_head(h)
    t.train_step(np.ones((2, F), np.float32), np.array([0, 1]), 0.5)
    assert not np.array_equal(t.get_head()["h0_bias"], h["h0_bias"])  # the caller's array was not mutated in place
    bad = dict(h)
    bad["h0_bias"] = np.zeros(4, np.float32)
    with pytest.raises(ArtifactError, match="h0_bias"):
        t.set_head(bad)
    with pytest.raises(ArtifactError):
        t.set_head({"h0_kernel": h["h0_kernel"]})


def test_train_step_rejects_oversized_batch() -> None:
    with pytest.raises(ValueError, match=r"1\.\.8"):
        make_trainer().train_step(np.zeros((9, F), np.float32), np.zeros(9, np.int64), 0.1)


def test_fit_learns_a_separable_problem_and_counts_steps() -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(50, F)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0.5).astype(np.int64)
    t = make_trainer()
    loss0, _ = evaluate(t, x, y)
    res = fit(t, x, y, epochs=30, lr=0.3, rng=np.random.default_rng(0), clock=time.perf_counter)
    assert res.steps == 30 * 7  # 50 rows in batches of 8: 6 full + 1 short per epoch
    assert len(res.epoch_losses) == 30 and res.epoch_losses[-1] < res.epoch_losses[0]
    loss1, acc1 = evaluate(t, x, y)
    assert loss1 < 0.5 * loss0 and acc1 > 0.85
    assert res.seconds > 0


def test_fit_is_deterministic_given_the_generator() -> None:
    rng = np.random.default_rng(6)
    x = rng.normal(size=(20, F)).astype(np.float32)
    y = rng.integers(0, 3, 20)
    a, b = make_trainer(), make_trainer()
    fit(a, x, y, 2, 0.1, np.random.default_rng(9))
    fit(b, x, y, 2, 0.1, np.random.default_rng(9))
    for k, v in a.get_head().items():
        np.testing.assert_array_equal(v, b.get_head()[k])


def test_fit_rejects_bad_arguments() -> None:
    t = make_trainer()
    with pytest.raises(ValueError, match="no samples"):
        fit(t, np.zeros((0, F), np.float32), np.zeros(0, np.int64), 1, 0.1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="lr"):
        fit(t, np.zeros((2, F), np.float32), np.zeros(2, np.int64), 1, -1.0, np.random.default_rng(0))


def test_head_forward_matches_reference() -> None:
    rng = np.random.default_rng(7)
    head = make_head(rng, [F, 4, 3])
    f = rng.normal(size=(5, F)).astype(np.float32)
    a = np.maximum(f @ head["h0_kernel"] + head["h0_bias"], 0) @ head["h1_kernel"] + head["h1_bias"]
    np.testing.assert_allclose(head_forward(head, f), a, rtol=1e-6)


def _conv_head_loss64(head: dict[str, NDArray[np.float64]], f: NDArray[np.float32], y: NDArray[np.int64]) -> float:
    """An independent float64 reference of a conv head: einsum over sliding windows, mean pool, dense."""
    a = f.astype(np.float64)
    n = len(head) // 2
    for i in range(n):
        w, b = head[f"h{i}_kernel"], head[f"h{i}_bias"]
        if w.ndim == 4:
            kh, kw = w.shape[:2]
            pt, pl = (kh - 1) // 2, (kw - 1) // 2
            ap = np.pad(a, ((0, 0), (pt, kh - 1 - pt), (pl, kw - 1 - pl), (0, 0)))
            z = np.einsum("nhwcij,ijco->nhwo", np.lib.stride_tricks.sliding_window_view(ap, (kh, kw), axis=(1, 2)),
                          w) + b
        else:
            a = a.mean(axis=(1, 2)) if a.ndim == 4 else a
            z = a @ w + b
        a = np.maximum(z, 0) if i < n - 1 else z
    z = a - a.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean())


def test_conv_head_gradients_match_central_differences_of_a_float64_reference() -> None:
    rng = np.random.default_rng(0)
    head = {"h0_kernel": rng.normal(0, 0.3, (3, 2, 4, 5)), "h0_bias": rng.normal(0, 0.1, 5),  # an even kernel side
            "h1_kernel": rng.normal(0, 0.3, (1, 1, 5, 6)), "h1_bias": rng.normal(0, 0.1, 6),
            "h2_kernel": rng.normal(0, 0.3, (6, 3)), "h2_bias": rng.normal(0, 0.1, 3)}
    head32 = {k: v.astype(np.float32) for k, v in head.items()}
    f = rng.normal(size=(4, 5, 5, 4)).astype(np.float32)
    y = np.array([0, 1, 2, 1])
    loss, grads = head_loss_and_grads(head32, f, y, np.ones(4, np.float32))
    ref64 = {k: v.astype(np.float64) for k, v in head32.items()}
    assert loss == pytest.approx(_conv_head_loss64(ref64, f, y), rel=1e-5)
    np.testing.assert_allclose(head_forward(head32, f).shape, (4, 3))
    for name, g in grads.items():
        num = np.zeros(g.shape)
        for idx in np.ndindex(g.shape):
            plus, minus = dict(ref64), dict(ref64)
            plus[name], minus[name] = ref64[name].copy(), ref64[name].copy()
            plus[name][idx] += 1e-5
            minus[name][idx] -= 1e-5
            num[idx] = (_conv_head_loss64(plus, f, y) - _conv_head_loss64(minus, f, y)) / 2e-5
        np.testing.assert_allclose(g, num, atol=1e-6, err_msg=name)
