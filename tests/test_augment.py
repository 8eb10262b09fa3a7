import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from digitjax import augment, steps
from digitjax.config import ConfigError

NAMES = sorted(augment.AUGMENTATIONS)
RANDOM_NAMES = [n for n in NAMES if n != "none"]


@pytest.fixture(scope="module")
def digits(mnist_idx):
    """64 real MNIST test digits as float32 [64, 28, 28, 1] in [0, 1]."""
    (_, _), (test_images, _) = mnist_idx
    return steps.to_float(jnp.asarray(test_images[:64]))


@pytest.fixture(scope="module")
def jitted():
    return {name: jax.jit(augment.get(name)) for name in NAMES}


def lit_pixel(y, x, batch=64):
    """A batch of 28 x 28 images, black but for pixel (y, x); 64 like `digits`, so the
    compiled programs are shared."""
    image = np.zeros((batch, 28, 28, 1), np.float32)
    image[:, y, x, 0] = 1.0
    return jnp.asarray(image)


def test_every_augmentation_keeps_shape_dtype_and_range(digits, jitted):
    for name in NAMES:
        out = jitted[name](digits, jax.random.key(0))
        assert out.shape == digits.shape and out.dtype == jnp.float32, name
        assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0, name


@pytest.mark.parametrize("name", NAMES)
def test_eager_and_jit_agree_for_the_same_key(name, digits, jitted):
    key = jax.random.key(3)
    eager = augment.get(name)(digits, key)
    np.testing.assert_allclose(eager, jitted[name](digits, key), atol=1e-5)


def test_same_key_same_output_and_other_key_other_output(digits, jitted):
    for name in NAMES:
        fn = jitted[name]
        first = fn(digits, jax.random.key(1))
        np.testing.assert_array_equal(first, fn(digits, jax.random.key(1)))
        other = fn(digits, jax.random.key(2))
        assert np.array_equal(first, other) == (name == "none"), name


def test_each_image_in_a_batch_gets_its_own_draw(digits, jitted):
    # A lit background, so that a cutout that misses the digit still changes the image.
    same = jnp.repeat(0.25 + 0.5 * digits[:1], len(digits), axis=0)
    for name in RANDOM_NAMES:
        out = np.asarray(jitted[name](same, jax.random.key(0))).reshape(len(digits), -1)
        distinct = len({row.tobytes() for row in out})
        assert distinct >= 16, (name, distinct)  # translate has only 25 outcomes


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown augmentation 'afine'") as err:
        augment.get("afine")
    assert "did you mean affine" in str(err.value)
    for name in NAMES:
        assert name in str(err.value)


def test_translate_moves_a_lit_pixel_by_the_drawn_shift_and_keeps_its_mass():
    # The known draw: shift by (dy, dx) = (2, -1).
    out = augment.shift(lit_pixel(14, 14, batch=1), jnp.array([2]), jnp.array([-1]), 2)
    assert float(out[0, 16, 13, 0]) == 1.0 and float(out.sum()) == 1.0


@pytest.mark.parametrize("name, max_shift", [("translate", 2), ("translate3", 3)])
def test_translate_draws_stay_within_max_shift(name, max_shift, jitted):
    out = np.asarray(jitted[name](lit_pixel(14, 14), jax.random.key(0)))
    np.testing.assert_allclose(out.sum(axis=(1, 2, 3)), 1.0)  # away from the border
    ys, xs = np.nonzero(out[..., 0])[1:]
    assert np.abs(ys - 14).max() == max_shift and np.abs(xs - 14).max() == max_shift


def test_translate_fills_the_border_with_zeros():
    out = augment.shift(jnp.ones((1, 28, 28, 1)), jnp.array([-2]), jnp.array([1]), 2)
    assert float(out.sum()) == 26 * 27 and float(out[0, 26:].max()) == 0.0


def identity_params(batch):
    zeros = jnp.zeros(batch)
    return dict(rotation=zeros, scale=jnp.ones(batch), shear=zeros, dy=zeros, dx=zeros)


@pytest.mark.parametrize("rows", [slice(None), slice(4, 24)])  # square and 20 x 28
def test_affine_with_identity_parameters_returns_the_input(digits, rows):
    images = digits[:, rows]
    _, h, w, _ = images.shape
    matrices = augment.affine_matrices(**identity_params(64), height=h, width=w)
    np.testing.assert_allclose(augment.warp_affine(images, matrices), images, atol=1e-6)


def test_affine_integer_shift_equals_translate(digits):
    params = identity_params(64) | dict(dy=jnp.full(64, 2.0), dx=jnp.full(64, -1.0))
    matrices = augment.affine_matrices(**params, height=28, width=28)
    shifted = augment.shift(digits, jnp.full(64, 2), jnp.full(64, -1), max_shift=2)
    np.testing.assert_allclose(augment.warp_affine(digits, matrices), shifted, atol=1e-6)


def test_affine_rotates_and_scales_about_the_centre():
    # The centre is (13.5, 13.5); the lit pixel is (-0.5, 3.5) from it.
    def peak(**params):
        matrices = augment.affine_matrices(**identity_params(64) | params, height=28, width=28)
        out = np.asarray(augment.warp_affine(lit_pixel(13, 17), matrices))[0, ..., 0]
        assert out.max() > 0.99  # these transforms map pixels onto pixels
        return np.unravel_index(np.argmax(out), out.shape)

    assert peak(rotation=jnp.full(64, math.pi / 2)) in {(10, 13), (17, 14)}
    assert peak(scale=jnp.full(64, 3.0)) == (12, 24)


def test_erase_zeroes_the_square_clipped_at_the_border():
    top, left = np.zeros((2, 64), np.int32)
    top[:3], left[:3] = [10, -3, 24], [10, 5, 26]
    out = augment.erase(jnp.ones((64, 28, 28, 1)), jnp.asarray(top), jnp.asarray(left), size=8)
    zeroed = (np.asarray(out) == 0).sum(axis=(1, 2, 3))
    np.testing.assert_array_equal(zeroed[:3], [64, 5 * 8, 4 * 2])


def test_cutout_zeroes_one_square_of_at_most_the_patch_size(jitted):
    out = np.asarray(jitted["cutout"](jnp.ones((64, 28, 28, 1)), jax.random.key(0)))
    for image in out[..., 0]:
        ys, xs = np.nonzero(image == 0)
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        assert 4 * 4 <= len(ys) <= 8 * 8 and box == len(ys)  # a clipped 8x8 square
        assert set(np.unique(image)) == {0.0, 1.0}


def correlations(a, b):
    a = np.asarray(a).reshape(len(a), -1)
    b = np.asarray(b).reshape(len(b), -1)
    return [np.corrcoef(x, y)[0, 1] for x, y in zip(a, b, strict=True)]


@pytest.mark.parametrize("name", ["affine", "elastic"])
def test_warps_keep_real_digits_recognisable(name, digits, jitted):
    # Pixel correlation is harsh on thin strokes: a 1 px shift alone gives ~0.8, 2 px ~0.5.
    r = correlations(digits, jitted[name](digits, jax.random.key(0)))
    assert 0.5 < np.mean(r) < 0.9, np.mean(r)


def test_elastic_field_has_simards_per_pixel_spread():
    """Simard's field alpha * G U G (U uniform in [-1, 1]) has per-pixel variance
    alpha^2 / 3 * (G @ G)[i, i] * (G @ G)[j, j]; the eigenbasis draw must match it."""
    alpha, sigma = 34.0, 4.0
    d = np.arange(28)[:, None] - np.arange(28)[None, :]
    g = np.exp(-0.5 * (d / sigma) ** 2) / (math.sqrt(2 * math.pi) * sigma)
    g2 = np.diag(g @ g)
    expected = alpha * np.sqrt(np.outer(g2, g2) / 3.0)
    field = augment.elastic_field(jax.random.key(0), 2048, 28, 28, alpha, sigma)
    measured = np.asarray(field).reshape(-1, 28, 28).std(axis=0)
    np.testing.assert_allclose(measured, expected, rtol=0.06)


def test_compose_applies_each_augmentation_with_its_own_key(digits):
    composed = augment.compose(augment.affine, augment.cutout)
    key = jax.random.key(5)
    first, second = jax.random.split(key)
    expected = augment.cutout(augment.affine(digits, first), second)
    np.testing.assert_array_equal(composed(digits, key), expected)


@settings(max_examples=10, deadline=None)
@given(name=st.sampled_from(NAMES), batch=st.integers(1, 5), height=st.integers(3, 40),
       width=st.integers(3, 40), channels=st.integers(1, 3))
def test_any_image_shape_is_kept(name, batch, height, width, channels):
    images = jax.ShapeDtypeStruct((batch, height, width, channels), jnp.float32)
    out = jax.eval_shape(augment.get(name), images, jax.random.key(0))  # traces, no compile
    assert out.shape == images.shape and out.dtype == jnp.float32


@settings(max_examples=20, deadline=None)
@given(name=st.sampled_from(NAMES), seed=st.integers(0, 2**32 - 1),
       scale=st.floats(0.0, 1.0))
def test_any_key_and_input_give_values_in_range_deterministically(name, seed, scale, digits,
                                                                  jitted):
    images = digits * scale
    out = jitted[name](images, jax.random.key(seed))
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    np.testing.assert_array_equal(out, jitted[name](images, jax.random.key(seed)))
