"""Property-based tests: config overrides, the IDX reader, image preprocessing, augmentations.

Each property holds for every input hypothesis draws; the failures it can find are the
ones hand-picked examples miss (an int64 overflow in a corrupt IDX header, an infinite
learning rate that passed the range checks).
"""

import dataclasses
import gzip
import io
import math
import typing

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from digitjax import augment, config, idx, preprocess
from digitjax.config import Config, ConfigError
from digitjax.idx import DataError

KEY_TYPES = config._field_types(Config)


# -- config overrides ----------------------------------------------------------------------

def _value(typ):
    """A strategy for valid values of a config field type."""
    if typ is bool:
        return st.booleans()
    if typ is int:
        return st.integers(-(10**12), 10**12)
    if typ is float:
        return st.floats(allow_nan=False, allow_infinity=False)
    if typ is str:
        return st.text(max_size=20)
    return st.lists(st.integers(0, 10**6), min_size=1, max_size=5).map(
        lambda seeds: tuple(dict.fromkeys(seeds)))


def _text(value) -> str:
    """How a user writes a value after `--set key=`."""
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return repr(value) if isinstance(value, float) else str(value)


@st.composite
def overrides(draw):
    keys = draw(st.lists(st.sampled_from(sorted(KEY_TYPES)), unique=True, max_size=8))
    return {k: draw(_value(KEY_TYPES[k])) for k in keys}


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=overrides())
def test_overrides_set_exactly_the_values_given_and_round_trip_through_a_dict(values):
    cfg = config.apply_overrides(Config(), {k: _text(v) for k, v in values.items()})
    flat = config.flatten(config.to_dict(cfg))
    for key, value in values.items():
        assert flat[key] == value, key
    untouched = config.flatten(config.to_dict(Config()))
    assert {k: v for k, v in flat.items() if k not in values} == {
        k: v for k, v in untouched.items() if k not in values}
    assert config.from_dict(config.to_dict(cfg)) == cfg


@given(key=st.sampled_from(sorted(KEY_TYPES)), text=st.text(max_size=30))
def test_any_text_for_any_key_is_a_value_of_its_type_or_a_one_line_config_error(key, text):
    typ = KEY_TYPES[key]
    try:
        value = config.parse_value(key, text, typ)
    except ConfigError as e:
        assert str(e).startswith(f"{key}=") and "\n" not in str(e)
        return
    expected = tuple if typing.get_origin(typ) is tuple else typ
    assert type(value) is expected
    if typ is float:
        assert math.isfinite(value)


@given(value=st.floats(allow_nan=False, allow_infinity=False))
def test_finite_floats_parse_back_exactly(value):
    assert config.parse_value("k", repr(value), float) == value


@given(text=st.sampled_from(["nan", "NaN", "inf", "-inf", "Infinity", "1e999", "-1e400"]))
def test_non_finite_floats_are_refused(text):
    with pytest.raises(ConfigError, match="expected a finite float"):
        config.parse_value("optimizer.learning_rate", text, float)


@given(word=st.sampled_from(["1", "true", "yes", "on", "0", "false", "no", "off"]),
       upper=st.lists(st.booleans(), min_size=5, max_size=5), pad=st.sampled_from(["", " "]))
def test_bool_spellings_in_any_case(word, upper, pad):
    upper = upper[:len(word)]
    text = pad + "".join(c.upper() if u else c for c, u in zip(word, upper, strict=True)) + pad
    assert config.parse_value("k", text, bool) is (word in ("1", "true", "yes", "on"))


@given(seeds=st.lists(st.integers(0, 10**6), min_size=1, max_size=8),
       lo=st.integers(0, 1000), n=st.integers(0, 50))
def test_seed_lists_and_ranges(seeds, lo, n):
    assert config.parse_seeds(",".join(map(str, seeds))) == tuple(dict.fromkeys(seeds))
    assert config.parse_seeds(f"{lo}-{lo + n}") == tuple(range(lo, lo + n + 1))
    with pytest.raises(ValueError):
        config.parse_seeds(f"{lo + n + 1}-{lo}")


@given(key=st.text(min_size=1, max_size=30))
def test_unknown_keys_are_refused_by_name(key):
    assume(key.strip() not in KEY_TYPES and "=" not in key)
    with pytest.raises(ConfigError, match="unknown config key"):
        config.apply_overrides(Config(), [f"{key}=1"])


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=overrides())
def test_check_values_only_ever_raises_a_config_error(values):
    cfg = config.apply_overrides(Config(), {k: _text(v) for k, v in values.items()})
    try:
        config.check_values(cfg)
    except ConfigError as e:
        assert "\n" not in str(e)


@given(name=st.text(max_size=10), description=st.text(max_size=10),
       seeds=_value(tuple[int, ...]))
def test_the_config_hash_ignores_names_and_seeds(name, description, seeds):
    cfg = dataclasses.replace(Config(), name=name, description=description, seeds=seeds)
    assert config.config_hash(cfg) == config.config_hash(Config())


# -- the IDX reader ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("idx")


arrays_u8 = hnp.arrays(np.uint8, hnp.array_shapes(min_dims=1, max_dims=4, min_side=0,
                                                   max_side=6))


@given(array=arrays_u8, gz=st.booleans())
def test_idx_round_trips_any_uint8_array_read_only(array, gz, scratch):
    path = idx.write_idx(scratch / ("a.idx.gz" if gz else "a.idx"), array)
    out = idx.read_idx(path)
    assert out.dtype == np.uint8 and out.shape == array.shape
    np.testing.assert_array_equal(out, array)
    assert not out.flags.writeable


def _read(path, data: bytes, magic=None):
    """read_idx of `data`: the array, or None for a DataError; anything else fails."""
    path.write_bytes(data)
    try:
        return idx.read_idx(path, magic=magic)
    except DataError as e:
        assert "\n" not in str(e) and str(path) in str(e)
        return None


@given(array=arrays_u8, gz=st.booleans(), data=st.data())
def test_any_truncation_is_a_data_error(array, gz, data, scratch):
    raw = idx.write_idx(scratch / ("t.gz" if gz else "t"), array).read_bytes()
    cut = data.draw(st.integers(0, len(raw) - 1))
    assume(array.size or cut < 4 + 4 * array.ndim)  # cutting no data bytes leaves a valid file
    assert _read(scratch / "cut", raw[:cut]) is None


@given(array=arrays_u8, extra=st.binary(min_size=1, max_size=16))
def test_trailing_bytes_are_a_data_error(array, extra, scratch):
    raw = idx.write_idx(scratch / "x", array).read_bytes()
    assert _read(scratch / "trail", raw + extra) is None


@given(array=arrays_u8, data=st.data())
def test_a_changed_header_byte_is_a_data_error_or_a_consistent_array(array, data, scratch):
    raw = bytearray(idx.write_idx(scratch / "h", array).read_bytes())
    i = data.draw(st.integers(0, 3 + 4 * array.ndim))
    raw[i] = data.draw(st.integers(0, 255).filter(lambda b: b != raw[i]))
    out = _read(scratch / "hdr", bytes(raw))
    if out is not None:  # e.g. a changed size next to a zero dimension: still consistent
        assert out.size == len(raw) - (4 + 4 * out.ndim)


# Sizes near the int32 limit and powers of two reach products that wrap around in int64.
dims_ = st.one_of(st.integers(0, 8), st.sampled_from([2**16, 2**31 - 1]),
                  st.integers(0, 2**31 - 1))


@example(dims=[2**16] * 4, body=b"")  # 2**64: wrapped to 0 in int64, "matching" no data
@example(dims=[0, 2**31 - 1, 2**31 - 1, 2**31 - 1], body=b"")  # too big for numpy
@given(dims=st.lists(dims_, min_size=1, max_size=6), body=st.binary(max_size=64))
def test_any_header_dimensions_are_checked_against_the_data(dims, body, scratch):
    header = bytes([0, 0, 8, len(dims)]) + np.asarray(dims, ">i4").tobytes()
    out = _read(scratch / "dims", header + body)
    if out is not None:
        assert out.shape == tuple(dims) and out.size == len(body)


@given(blob=st.binary(max_size=200), gz=st.booleans(),
       magic=st.sampled_from([None, idx.IMAGES_MAGIC, idx.LABELS_MAGIC]))
def test_arbitrary_bytes_never_raise_anything_but_a_data_error(blob, gz, magic, scratch):
    data = gzip.compress(blob, mtime=0) if gz else blob
    out = _read(scratch / "blob", data, magic)
    if out is not None and magic is not None:
        assert out.ndim == magic & 0xFF


@given(array=arrays_u8)
def test_an_unexpected_magic_number_is_a_data_error(array, scratch):
    assume(array.ndim != 3)
    raw = idx.write_idx(scratch / "m", array).read_bytes()
    assert _read(scratch / "magic", raw, magic=idx.IMAGES_MAGIC) is None


# -- image preprocessing -------------------------------------------------------------------

def _check_mnist_like(out):
    assert out.shape == (28, 28) and out.dtype == np.uint8
    assert out.max() == 255  # the strongest stroke is full white, as in MNIST
    rows, cols = np.flatnonzero(out.any(axis=1)), np.flatnonzero(out.any(axis=0))
    assert rows[-1] - rows[0] < preprocess.BOX and cols[-1] - cols[0] < preprocess.BOX


grey_images = hnp.arrays(np.float64, st.tuples(st.integers(1, 48), st.integers(1, 48)),
                         elements=st.floats(0.0, 1.0))


@settings(max_examples=60, deadline=None)
@given(grey=grey_images)
def test_any_grey_image_becomes_an_mnist_like_digit_or_a_one_line_error(grey):
    try:
        out = preprocess.to_mnist(grey, "img")
    except DataError as e:
        assert str(e).startswith("img: ") and "\n" not in str(e)
        return
    _check_mnist_like(out)
    np.testing.assert_array_equal(out, preprocess.to_mnist(grey.copy(), "img"))


# Ink levels k/256 are exact in binary, so 1 - (1 - v) == v: inverting twice changes no bit.
patterns = hnp.arrays(np.float64, st.tuples(st.integers(1, 24), st.integers(1, 24)),
                      elements=st.integers(0, 255).map(lambda k: k / 256))
pads = st.tuples(*[st.integers(4, 12)] * 4)


def _place(pattern, pad):
    top, bottom, left, right = pad
    return np.pad(pattern, ((top, bottom), (left, right)))


def _outcome(grey):
    try:
        return preprocess.to_mnist(grey)
    except DataError as e:
        return str(e)


@settings(max_examples=60, deadline=None)
@given(pattern=patterns, a=pads, b=pads)
def test_where_the_digit_sits_on_its_page_and_its_polarity_do_not_matter(pattern, a, b):
    first = _outcome(_place(pattern, a))
    for other in (_place(pattern, b), 1.0 - _place(pattern, a)):
        again = _outcome(other)
        if isinstance(first, str):
            assert isinstance(again, str)
        else:
            _check_mnist_like(first)
            np.testing.assert_array_equal(again, first)


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pixels=hnp.arrays(np.uint8, st.tuples(st.integers(1, 30), st.integers(1, 30))),
       mode=st.sampled_from(["L", "RGB", "RGBA"]), fmt=st.sampled_from(["PNG", "BMP", "TIFF"]))
def test_image_files_read_back_as_grey_in_0_1(pixels, mode, fmt, tmp_path):
    path = tmp_path / f"img.{fmt.lower()}"
    Image.fromarray(pixels, "L").convert(mode).save(path, fmt)
    grey = preprocess.read_grey(path)
    assert grey.shape == pixels.shape
    np.testing.assert_allclose(grey, pixels / 255.0, atol=1e-9)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_garbage_or_truncated_image_files_are_data_errors(data, tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16)).save(buf, "PNG")
    png = buf.getvalue()
    blob = data.draw(st.one_of(st.binary(max_size=300),
                               st.integers(0, len(png) - 1).map(lambda n: png[:n])))
    path = tmp_path / "digit.png"
    path.write_bytes(blob)
    try:
        out = preprocess.load_digit(path)
    except DataError as e:
        assert str(path) in str(e) and "\n" not in str(e)
    else:  # a PNG cut inside its end marker can still decode whole
        assert out.shape == (28, 28, 1) and out.dtype == np.uint8


# -- augmentations (tests/test_augment.py has the per-name behaviour) -----------------------

NAMES = sorted(augment.AUGMENTATIONS)
RANDOM_NAMES = [n for n in NAMES if n != "none"]
# A few shapes, so the compiled programs are reused across examples.
SHAPES = [(1, 28, 28, 1), (3, 16, 20, 2), (8, 12, 12, 1)]
DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]


@pytest.fixture(scope="module")
def jitted():
    return {name: jax.jit(augment.get(name)) for name in NAMES}


def _images(seed, shape, dtype):
    return jax.random.uniform(jax.random.key(seed), shape).astype(dtype)


@settings(max_examples=15, deadline=None)
@given(name=st.sampled_from(NAMES), shape=st.sampled_from(SHAPES),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1),
       key=st.integers(0, 2**32 - 1))
def test_any_input_keeps_shape_dtype_and_the_unit_range_deterministically(
        name, shape, dtype, seed, key, jitted):
    images = _images(seed, shape, dtype)
    out = jitted[name](images, jax.random.key(key))
    assert out.shape == images.shape and out.dtype == images.dtype
    values = np.asarray(out, np.float32)
    assert np.isfinite(values).all() and values.min() >= 0.0 and values.max() <= 1.0
    np.testing.assert_array_equal(out, jitted[name](images, jax.random.key(key)))


@settings(max_examples=30, deadline=None)
@given(name=st.sampled_from(RANDOM_NAMES), seed=st.integers(0, 2**31 - 1),
       keys=st.lists(st.integers(0, 2**32 - 1), min_size=2, max_size=2, unique=True))
def test_another_key_draws_another_augmentation(name, seed, keys, jitted):
    images = _images(seed, SHAPES[2], jnp.float32)  # 8 images: equal draws for all ~never
    a, b = (jitted[name](images, jax.random.key(k)) for k in keys)
    assert not np.array_equal(a, b)


@settings(max_examples=30, deadline=None)
@given(name=st.sampled_from(NAMES), seed=st.integers(0, 2**31 - 1),
       key=st.integers(0, 2**32 - 1), changed=st.integers(1, 7))
def test_each_image_depends_only_on_itself_and_the_key(name, seed, key, changed, jitted):
    images = _images(seed, SHAPES[2], jnp.float32)
    other = images.at[changed].set(1.0 - images[changed])
    a, b = (jitted[name](x, jax.random.key(key)) for x in (images, other))
    keep = [i for i in range(8) if i != changed]
    np.testing.assert_array_equal(np.asarray(a)[keep], np.asarray(b)[keep])


@settings(max_examples=20, deadline=None)
@given(name=st.sampled_from(NAMES), shape=st.sampled_from(SHAPES),
       key=st.integers(0, 2**32 - 1))
def test_black_stays_black(name, shape, key, jitted):
    out = jitted[name](jnp.zeros(shape, jnp.float32), jax.random.key(key))
    assert not np.asarray(out).any()


@given(shape=st.sampled_from(SHAPES), seed=st.integers(0, 2**31 - 1),
       key=st.integers(0, 2**32 - 1))
def test_none_is_the_identity(shape, seed, key, jitted):
    images = _images(seed, shape, jnp.float32)
    np.testing.assert_array_equal(jitted["none"](images, jax.random.key(key)), images)
