import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from digitjax import data_device, models, registry, steps
from digitjax.train import Trainer

# Hand-counted: conv k x k (k*k*in+1)*out, dense (in+1)*out; before a batch norm, convs and
# dense layers have no bias and the batch norm adds a scale and a shift per channel.
EXPECTED_PARAMS = {
    "flax_cnn": (9 + 1) * 32 + (9 * 32 + 1) * 64 + (3136 + 1) * 256 + (256 + 1) * 10,
    "keras_cnn": (9 + 1) * 32 + (9 * 32 + 1) * 64 + (9216 + 1) * 128 + (128 + 1) * 10,
    "lean_cnn": (25 + 1) * 16 + (9 * 16 + 1) * 32 + (1568 + 1) * 128 + (128 + 1) * 10,
    "mlp": (784 + 1) * 256 + (256 + 1) * 10,
    "linear": (784 + 1) * 10,
    "lenet5": (25 + 1) * 6 + (25 * 6 + 1) * 16 + (400 + 1) * 120 + (120 + 1) * 84 + (84 + 1) * 10,
    # convs 3x3, 3x3, 5x5 at 32 then 64 channels; BN on 6 convs and dense128; dense 4*4*64.
    "bn_cnn": (9 * 1 + 9 * 32 + 25 * 32) * 32 + (9 * 32 + 9 * 64 + 25 * 64) * 64
    + 2 * (3 * 32 + 3 * 64 + 128) + 1024 * 128 + (128 + 1) * 10,
    "bn_cnn_half": (9 * 1 + 9 * 16 + 25 * 16) * 16 + (9 * 16 + 9 * 32 + 25 * 32) * 32
    + 2 * (3 * 16 + 3 * 32 + 128) + 512 * 128 + (128 + 1) * 10,
    # stem; one block per stage (two 3x3 convs, then a 1x1 projection when the width grows).
    "resnet_small": 9 * 32 + 2 * 32
    + 2 * 9 * 32 * 32 + 2 * 2 * 32
    + 9 * 32 * 64 + 9 * 64 * 64 + 32 * 64 + 3 * 2 * 64
    + 9 * 64 * 128 + 9 * 128 * 128 + 64 * 128 + 3 * 2 * 128
    + (128 + 1) * 10,
}
# Hand-counted multiply-adds per image: conv out_h*out_w*out_c*(k*k*in_c), dense in*out.
EXPECTED_MACS = {
    "lenet5": 28 * 28 * 6 * 25 + 10 * 10 * 16 * 150 + 400 * 120 + 120 * 84 + 84 * 10,
    # 28 -> 26 -> 24 -> 12 (stride 2) -> 10 -> 8 -> 4 (stride 2).
    "bn_cnn": 26 * 26 * 32 * 9 + 24 * 24 * 32 * 288 + 12 * 12 * 32 * 800
    + 10 * 10 * 64 * 288 + 8 * 8 * 64 * 576 + 4 * 4 * 64 * 1600 + 1024 * 128 + 128 * 10,
    "bn_cnn_half": 26 * 26 * 16 * 9 + 24 * 24 * 16 * 144 + 12 * 12 * 16 * 400
    + 10 * 10 * 32 * 144 + 8 * 8 * 32 * 288 + 4 * 4 * 32 * 800 + 512 * 128 + 128 * 10,
    # stem at 28x28, maxpool, stages at 14x14, 7x7 and 4x4 (with 1x1 projections).
    "resnet_small": 28 * 28 * 32 * 9 + 2 * 14 * 14 * 32 * 288
    + 7 * 7 * 64 * (288 + 576 + 32) + 4 * 4 * 128 * (576 + 1152 + 64) + 128 * 10,
}
BATCH_NORM_MODELS = ["bn_cnn_half", "resnet_small"]  # bn_cnn is bn_cnn_half at twice the width


def create(name) -> nnx.Module:
    return models.create(name, num_classes=10, in_channels=1, rngs=nnx.Rngs(0))


@functools.cache
def _created(name):
    return nnx.split(create(name))


def build(name) -> nnx.Module:
    """A fresh seed-0 model. The eager init compiles a truncated normal per weight shape
    (~1 s each on 2 busy cores), so it runs once per name."""
    # copy=True: merged models otherwise share Variables, so batch-norm updates would leak.
    return nnx.merge(*_created(name), copy=True)


def images():
    # One batch shape for every test: eager ops compile once per shape.
    return jax.random.uniform(jax.random.key(0), (3, 28, 28, 1))


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_every_model_outputs_logits_of_the_right_shape(name):
    model = build(name)
    x = jnp.zeros((3, 28, 28, 1))
    assert model(x, train=False).shape == (3, 10)
    assert model(x, train=True, key=jax.random.key(1)).shape == (3, 10)


@pytest.mark.parametrize("name,count", sorted(EXPECTED_PARAMS.items()))
def test_parameter_counts(name, count):
    # Abstract (shapes only), as the trainer counts them: no init to compile.
    _, params, _ = steps.split_model(nnx.eval_shape(lambda: create(name)))
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
    # In eval, no dropout: a key changes nothing.
    np.testing.assert_array_equal(model(x, train=False, key=jax.random.key(1)),
                                  model(x, train=False, key=jax.random.key(2)))


def test_forward_flops_of_the_flax_cnn():
    model = models.create("flax_cnn", num_classes=10, in_channels=1, rngs=nnx.Rngs(0))
    graphdef, params, rest = steps.split_model(model)
    flops = models.forward_flops(graphdef, params, rest, (28, 28, 1))
    # Two multiply-adds per weight use: conv1 28*28*32*9, conv2 14*14*64*288, dense 3136*256.
    macs = 28 * 28 * 32 * 9 + 14 * 14 * 64 * 288 + 3136 * 256 + 256 * 10
    assert flops == 2 * macs


@pytest.mark.parametrize("name,macs", sorted(EXPECTED_MACS.items()))
def test_forward_flops_match_the_hand_count(name, macs):
    graphdef, params, rest = steps.split_model(nnx.eval_shape(lambda: create(name)))
    assert models.forward_flops(graphdef, params, rest, (28, 28, 1)) == 2 * macs


def _batch_stats(model):
    return [np.asarray(v) for v in jax.tree.leaves(steps.split_model(model)[2])]


@pytest.mark.parametrize("name", BATCH_NORM_MODELS)
def test_batch_norm_statistics_update_in_training_and_not_in_eval(name):
    model, x = build(name), images()
    before = _batch_stats(model)
    model(x)
    after_eval = _batch_stats(model)
    model(x, train=True, key=jax.random.key(1))
    after_train = _batch_stats(model)
    assert before  # the mean and variance of every batch norm
    assert all(np.array_equal(a, b) for a, b in zip(before, after_eval, strict=True))
    assert not any(np.array_equal(a, b) for a, b in zip(before, after_train, strict=True))
    # Models from build() are independent: a new one still has the initial statistics.
    assert all(np.array_equal(a, b)
               for a, b in zip(before, _batch_stats(build(name)), strict=True))


@pytest.mark.parametrize("name", ["lenet5", *BATCH_NORM_MODELS])
def test_eval_is_deterministic_and_per_example(name):
    model, x = build(name), images()
    logits = model(x)
    np.testing.assert_array_equal(logits, model(x))
    # Batch norm normalizes with running statistics in eval: an image's logits do not
    # depend on the rest of its batch (batch statistics would make them).
    for i in (0, len(x) - 1):
        np.testing.assert_allclose(model(x[i:i + 1]), logits[i:i + 1], rtol=1e-5, atol=1e-5)


def test_bn_cnn_dropout_depends_on_the_key_only_when_training():
    model, x = build("bn_cnn_half"), images()
    a = model(x, train=True, key=jax.random.key(1))
    assert not np.allclose(a, model(x, train=True, key=jax.random.key(2)))
    # Training normalizes with batch statistics, so the same key gives the same logits.
    np.testing.assert_array_equal(a, model(x, train=True, key=jax.random.key(1)))


def test_bn_cnn_half_trains_through_the_trainer_and_evaluates_with_its_statistics(mnist_idx):
    (x, y), _ = mnist_idx
    data = data_device.from_arrays((x[:1024], y[:1024]), (x[-500:], y[-500:]),
                                   (x[-500:], y[-500:]), num_classes=10, eval_batch_size=250)
    # One step per call: compiling a 4-step chunk of this net costs ~10 s more on 2 cores.
    cfg = registry.resolve("quick", ["model.name=bn_cnn_half", "train.batch_size=64",
                                     "train.steps_per_call=1", "train.log_every_steps=1"])
    tr = Trainer(cfg, data)
    keys, state = tr.keys(0), tr.init_state(0)
    tr.compile(state, keys)
    before = tr.evaluate(state, "val")
    initial_stats = [np.asarray(v) for v in jax.tree.leaves(state.rest)]
    perm = steps.epoch_permutation(keys["data"], 0, tr.data.num_train)
    for offset in range(0, 16 * 64, 64):
        state, _ = tr.run_chunk(state, 1, perm, offset, keys)
    after = tr.evaluate(state, "val")
    stats = [np.asarray(v) for v in jax.tree.leaves(state.rest)]
    assert initial_stats and not any(np.array_equal(a, b)
                                     for a, b in zip(initial_stats, stats, strict=True))
    # Evaluated with the running statistics: 16 steps from chance (loss 2.30) reach ~1.3.
    assert after["loss"] < before["loss"] * 0.7 and after["accuracy"] > 0.5
