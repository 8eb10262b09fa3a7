import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from digitjax import models, steps

# Hand-counted: conv 3x3 (9*in+1)*out, dense (in+1)*out.
EXPECTED_PARAMS = {
    "flax_cnn": (9 + 1) * 32 + (9 * 32 + 1) * 64 + (3136 + 1) * 256 + (256 + 1) * 10,
    "keras_cnn": (9 + 1) * 32 + (9 * 32 + 1) * 64 + (9216 + 1) * 128 + (128 + 1) * 10,
    "lean_cnn": (25 + 1) * 16 + (9 * 16 + 1) * 32 + (1568 + 1) * 128 + (128 + 1) * 10,
    "mlp": (784 + 1) * 256 + (256 + 1) * 10,
    "linear": (784 + 1) * 10,
}


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_every_model_outputs_logits_of_the_right_shape(name):
    model = models.create(name, num_classes=10, in_channels=1, rngs=nnx.Rngs(0))
    x = jnp.zeros((3, 28, 28, 1))
    assert model(x, train=False).shape == (3, 10)
    assert model(x, train=True, key=jax.random.key(1)).shape == (3, 10)


@pytest.mark.parametrize("name,count", sorted(EXPECTED_PARAMS.items()))
def test_parameter_counts(name, count):
    model = models.create(name, num_classes=10, in_channels=1, rngs=nnx.Rngs(0))
    _, params, _ = steps.split_model(model)
    assert models.count_params(params) == count


def test_every_model_has_a_test_of_its_parameter_count():
    assert set(EXPECTED_PARAMS) == set(models.MODELS)


def test_reshape_pooling_matches_reduce_window():
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
    ref_max = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    ref_avg = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") / 4
    np.testing.assert_allclose(models.pool(x, 2, "max"), ref_max)
    np.testing.assert_allclose(models.pool(x, 2, "avg"), ref_avg, rtol=1e-6)


def test_dropout_depends_on_the_key_only_when_training():
    model = models.create("keras_cnn", num_classes=10, in_channels=1, rngs=nnx.Rngs(0))
    x = jax.random.uniform(jax.random.key(0), (4, 28, 28, 1))
    a = model(x, train=True, key=jax.random.key(1))
    b = model(x, train=True, key=jax.random.key(2))
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(a, model(x, train=True, key=jax.random.key(1)))
    np.testing.assert_array_equal(model(x), model(x))


def test_forward_flops_of_the_flax_cnn():
    model = models.create("flax_cnn", num_classes=10, in_channels=1, rngs=nnx.Rngs(0))
    graphdef, params, rest = steps.split_model(model)
    flops = models.forward_flops(graphdef, params, rest, (28, 28, 1))
    # Two multiply-adds per weight use: conv1 28*28*32*9, conv2 14*14*64*288, dense 3136*256.
    macs = 28 * 28 * 32 * 9 + 14 * 14 * 64 * 288 + 3136 * 256 + 256 * 10
    assert flops == 2 * macs
