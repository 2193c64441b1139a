"""Domain shifts on image batches."""

from __future__ import annotations

import numpy as np
import pytest

from fedge.datasets.shifts import Shift, contrast, gaussian_noise, invert, rotate
from fedge.protocol.errors import ConfigError


def _images(n: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 28, 28, 1), dtype=np.float32)


@pytest.mark.parametrize("order", ["bilinear", "nearest"])
def test_rotate_90_equals_rot90_counter_clockwise(order: str) -> None:
    x = _images()
    out = rotate(x, 90, order=order)  # type: ignore[arg-type]
    np.testing.assert_allclose(out, np.rot90(x, 1, axes=(1, 2)), atol=1e-6)
    # and it is not the clockwise rotation
    assert not np.allclose(out, np.rot90(x, -1, axes=(1, 2)), atol=1e-3)


def test_rotate_180_and_minus_90() -> None:
    x = _images()
    np.testing.assert_allclose(rotate(x, 180), np.rot90(x, 2, axes=(1, 2)), atol=1e-6)
    np.testing.assert_allclose(rotate(x, -90), np.rot90(x, -1, axes=(1, 2)), atol=1e-6)


def test_rotate_0_and_360_are_identity() -> None:
    x = _images()
    np.testing.assert_array_equal(rotate(x, 0), x)
    np.testing.assert_allclose(rotate(x, 360), x, atol=1e-6)


def test_rotate_arbitrary_angle_keeps_a_centred_disc_and_zero_fills_corners() -> None:
    x = np.ones((1, 28, 28, 1), dtype=np.float32)
    out = rotate(x, 45)
    assert out.dtype == np.float32 and out.shape == x.shape
    assert out[0, 0, 0, 0] == 0.0 and out[0, 27, 27, 0] == 0.0  # corners come from outside
    np.testing.assert_allclose(out[0, 9:19, 9:19, 0], 1.0, atol=1e-5)  # the centre stays inside
    # a smooth image rotated there and back again is close in the middle
    yy, xx = np.mgrid[0:28, 0:28]
    smooth = ((np.sin(yy / 5.0) + np.cos(xx / 7.0) + 2) / 4).astype(np.float32)[None, :, :, None]
    back = rotate(rotate(smooth, 30), -30)
    assert np.abs(back - smooth)[0, 8:20, 8:20].max() < 0.05


def test_rotate_moves_a_bright_pixel_to_the_expected_place() -> None:
    x = np.zeros((1, 28, 28, 1), dtype=np.float32)
    x[0, 4, 13, 0] = 1.0  # near the top, roughly centred column
    out = rotate(x, 90, order="nearest")
    # counter-clockwise: top goes to the left
    r, c = np.argwhere(out[0, :, :, 0] == 1.0)[0]
    assert c == 4 and r == 27 - 13


def test_contrast_scales_around_each_images_mean() -> None:
    x = _images()
    out = contrast(x, 0.5)
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    np.testing.assert_allclose(out, (x - mean) * 0.5 + mean, atol=1e-6)
    np.testing.assert_allclose(contrast(x, 1.0), x, atol=1e-6)
    assert np.allclose(contrast(x, 0.0), np.broadcast_to(mean, x.shape), atol=1e-6)
    assert contrast(x, 3.0).max() <= 1.0 and contrast(x, 3.0).min() >= 0.0


def test_noise_is_seeded_clipped_and_has_about_the_right_scale() -> None:
    x = np.full((8, 28, 28, 1), 0.5, dtype=np.float32)
    a = gaussian_noise(x, 0.1, np.random.default_rng(1))
    b = gaussian_noise(x, 0.1, np.random.default_rng(1))
    np.testing.assert_array_equal(a, b)
    assert abs(float((a - 0.5).std()) - 0.1) < 0.01
    big = gaussian_noise(x, 5.0, np.random.default_rng(2))
    assert big.min() == 0.0 and big.max() == 1.0 and big.dtype == np.float32


def test_invert() -> None:
    x = _images()
    np.testing.assert_allclose(invert(x), 1.0 - x, atol=1e-7)


def test_shift_apply_combines_rotation_and_contrast_and_does_not_touch_input() -> None:
    x = _images()
    before = x.copy()
    shift = Shift(rotation_deg=90, contrast=0.5)
    out = shift.apply(x, np.random.default_rng(0))
    np.testing.assert_allclose(out, contrast(np.rot90(x, 1, axes=(1, 2)), 0.5), atol=1e-6)
    np.testing.assert_array_equal(x, before)
    assert Shift().is_identity and not shift.is_identity
    np.testing.assert_array_equal(Shift().apply(x, np.random.default_rng(0)), x)


def test_shift_on_feature_vectors_without_rotation() -> None:
    x = np.random.default_rng(0).random((5, 64), dtype=np.float32)
    out = Shift(contrast=0.8, noise_sigma=0.05).apply(x, np.random.default_rng(0))
    assert out.shape == (5, 64) and out.dtype == np.float32
    with pytest.raises(ValueError, match="images"):
        Shift(rotation_deg=10).apply(x, np.random.default_rng(0))


def test_invalid_shift_values_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="contrast"):
        Shift(contrast=-1.0)
    with pytest.raises(ConfigError, match="noise_sigma"):
        Shift(noise_sigma=float("nan"))
