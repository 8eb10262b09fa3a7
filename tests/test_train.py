import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from digitjax import data_device, records, registry, steps
from digitjax.config import ConfigError
from digitjax.loop import mean_std
from digitjax.train import Trainer, chunk_sizes, crossed


def small_data(mnist_idx, n_train=1024, n_eval=500):
    (x, y), (tx, ty) = mnist_idx
    return data_device.from_arrays((x[:n_train], y[:n_train]),
                                   (x[-n_eval:], y[-n_eval:]), (tx[:n_eval], ty[:n_eval]),
                                   num_classes=10, eval_batch_size=250)


def quick_config(*overrides):
    return registry.resolve("quick", ["train.steps_per_call=4", "train.log_every_steps=4",
                                      *overrides])


def test_chunks_cover_the_epoch_and_cadences_fire_on_crossings():
    assert chunk_sizes(429, 12) == [12] * 35 + [9]
    assert chunk_sizes(24, 12) == [12, 12]
    assert crossed(48, 60, 60) and not crossed(60, 72, 60) and crossed(55, 61, 60)
    assert not crossed(0, 12, 0)


def test_cadence_must_be_a_multiple_of_the_steps_per_call(mnist_idx):
    cfg = registry.resolve("quick", ["train.steps_per_call=4", "train.log_every_steps=6"])
    with pytest.raises(ConfigError, match="multiple of train.steps_per_call=4"):
        Trainer(cfg, small_data(mnist_idx))


def test_batch_larger_than_the_data_is_a_config_error(mnist_idx):
    with pytest.raises(ConfigError, match="larger than the training split"):
        Trainer(quick_config("train.batch_size=4096"), small_data(mnist_idx))


def test_a_chunk_of_train_steps_decreases_the_loss(mnist_idx):
    tr = Trainer(quick_config("train.batch_size=64"), small_data(mnist_idx))
    keys = tr.keys(0)
    state = tr.init_state(0)
    tr.compile(state, keys)
    before = tr.evaluate(state, "val")["loss"]
    perm = steps.epoch_permutation(keys["data"], 0, tr.data.num_train)
    for offset in range(0, 16 * 64, 4 * 64):
        state, metrics = tr.run_chunk(state, 4, perm, offset, keys)
    assert int(state.step) == 16
    assert metrics["loss"].shape == (4,)
    assert tr.evaluate(state, "val")["loss"] < before * 0.7


def test_overfits_a_tiny_batch_to_accuracy_one(mnist_idx):
    (x, y), _ = mnist_idx
    tiny = (x[:32], y[:32])
    data = data_device.from_arrays(tiny, tiny, tiny, num_classes=10, eval_batch_size=32)
    cfg = registry.resolve("quick", ["train.batch_size=32", "train.steps_per_call=1",
                                     "train.log_every_steps=1", "optimizer.name=adam",
                                     "optimizer.learning_rate=1e-3"])
    tr = Trainer(cfg, data)
    keys, state = tr.keys(0), tr.init_state(0)
    tr.compile(state, keys)
    for epoch in range(60):
        perm = steps.epoch_permutation(keys["data"], epoch, 32)
        state, _ = tr.run_chunk(state, 1, perm, 0, keys)
    assert tr.evaluate(state, "val")["accuracy"] == 1.0


def test_same_seed_gives_identical_records_and_another_seed_differs(mnist_idx, tmp_path):
    data = small_data(mnist_idx)
    cfg = quick_config("train.epochs=2", "train.batch_size=64")
    tr = Trainer(cfg, data)
    a = tr.fit(0, tmp_path / "a", progress=False)
    b = Trainer(cfg, data).fit(0, tmp_path / "b", progress=False)
    c = tr.fit(1, tmp_path / "c", progress=False)
    timing = {"time", "train_seconds", "compile_seconds", "eval_seconds", "total_seconds",
              "images_per_second"}

    def strip(d):
        return {k: v for k, v in d.items() if k not in timing}

    assert a["final_param_hash"] == b["final_param_hash"] != c["final_param_hash"]
    assert strip(a) == strip(b)
    rows_a = [strip(r) for r in records.read_metrics(tmp_path / "a" / records.METRICS)]
    rows_b = [strip(r) for r in records.read_metrics(tmp_path / "b" / records.METRICS)]
    assert rows_a == rows_b and len(rows_a) > 4


def test_run_records_hold_what_the_summary_reports(mnist_idx, tmp_path):
    tr = Trainer(quick_config("train.epochs=2", "train.batch_size=64"), small_data(mnist_idx))
    s = tr.fit(3, tmp_path, progress=False)
    cfg = json.loads((tmp_path / records.CONFIG).read_text())
    rows = records.read_metrics(tmp_path / records.METRICS)
    assert cfg["seed"] == 3 and cfg["config"]["name"] == "quick"
    assert cfg["execution"]["steps_per_call"] == 4 and cfg["environment"]["versions"]["jax"]
    assert s["status"] == "completed" and s["steps"] == 32 and s["num_params"] == 824458
    val = [r for r in rows if r["split"] == "val"]
    test = [r for r in rows if r["split"] == "test"]
    assert [r["epoch"] for r in val] == [1, 2]
    best = max(range(2), key=lambda i: (val[i]["accuracy"], -i))
    # The reported test accuracy is the one at the best validation epoch, never max(test).
    assert s["test_accuracy"] == test[best]["accuracy"]
    assert s["selected_epoch"] == best + 1
    assert len(s["per_class_test_accuracy"]) == 10
    assert s["images_per_second"] > 0 and s["train_seconds"] > 0


def test_evaluation_compiles_once_and_counts_it_as_compile_time(mnist_idx, tmp_path):
    tr = Trainer(quick_config("train.epochs=2", "train.batch_size=64"), small_data(mnist_idx))
    jitted, lowered = tr._eval_batch, []

    class SlowLower:  # a compile known to take >= 1 s, to see where its time is counted
        def lower(self, *args):
            lowered.append(args[2].shape)
            time.sleep(1.0)
            return jitted.lower(*args)

    tr._eval_batch = SlowLower()
    s = tr.fit(0, tmp_path, progress=False)
    assert len(lowered) == 1  # 2 epochs x (val, test), 2 batches each: one program
    assert s["compile_seconds"] >= 1.0 and s["eval_seconds"] >= 0


def test_mean_std():
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(np.sqrt(2.0)))
    assert mean_std([5.0]) == (5.0, 0.0)


def test_ema_of_weights_is_kept_and_evaluated(mnist_idx):
    import dataclasses

    import jax

    tr = Trainer(quick_config("train.ema_decay=0.9", "train.batch_size=64"),
                 small_data(mnist_idx))
    keys, state = tr.keys(0), tr.init_state(0)
    tr.compile(state, keys)
    perm = steps.epoch_permutation(keys["data"], 0, tr.data.num_train)
    def leaf(tree):
        return np.asarray(jax.tree.leaves(tree)[0])

    ema0 = leaf(state.ema)  # a host copy: the state's buffers are donated to the next call
    for offset in range(0, 8 * 64, 4 * 64):
        state, _ = tr.run_chunk(state, 4, perm, offset, keys)
    # The average trails the weights: it is neither the initial nor the current weights.
    assert not np.allclose(leaf(state.ema), leaf(state.params))
    assert not np.allclose(leaf(state.ema), ema0)
    no_ema = dataclasses.replace(state, ema={})
    with_params = dataclasses.replace(state, ema=state.params)
    assert tr.evaluate(state, "val") != tr.evaluate(no_ema, "val")
    assert tr.evaluate(with_params, "val") == tr.evaluate(no_ema, "val")


def test_test_time_augmentation_averages_views_deterministically(mnist_idx):
    base = ["train.batch_size=64", "augment.name=translate"]
    data = small_data(mnist_idx)
    plain, tta = (Trainer(quick_config(*base, *extra), data)
                  for extra in ([], ["train.tta_views=4"]))
    state = plain.init_state(0)
    a, b, c = plain.evaluate(state, "val"), tta.evaluate(state, "val"), tta.evaluate(state, "val")
    assert b == c and b["loss"] != a["loss"]
    with pytest.raises(ConfigError, match="needs an augmentation"):
        registry.resolve("quick", ["train.tta_views=2"])


@pytest.mark.parametrize("tta", [0, 2], ids=["plain", "tta"])
def test_evaluation_does_not_depend_on_the_eval_batch_or_its_padding(mnist_idx, tta):
    # 500 images in batches of 250 (no padding), 300 (100 padded rows) and 500 (one call):
    # padded rows never count, and test-time views are drawn per example, not per batch.
    (x, y), (tx, ty) = mnist_idx
    overrides = ["model.name=lenet5", "train.batch_size=64", "augment.name=translate",
                 f"train.tta_views={tta}"]
    results = []
    for b in (250, 300, 500):
        data = data_device.from_arrays((x[:1024], y[:1024]), (x[-500:], y[-500:]),
                                       (tx[:500], ty[:500]), num_classes=10, eval_batch_size=b)
        tr = Trainer(quick_config(*overrides, f"train.eval_batch_size={b}"), data)
        results.append(tr.evaluate(tr.init_state(0), "test"))  # untrained: ~chance, fine
    for r in results[1:]:
        assert r["accuracy"] == results[0]["accuracy"]
        np.testing.assert_allclose(r["loss"], results[0]["loss"], rtol=1e-5)
        np.testing.assert_allclose(r["per_class_accuracy"], results[0]["per_class_accuracy"])
    # Per-class accuracies weighted by the class counts give the accuracy back.
    counts = np.bincount(ty[:500], minlength=10)
    per_class = np.asarray(results[1]["per_class_accuracy"])
    assert np.isclose((per_class * counts).sum() / 500, results[1]["accuracy"])


def test_ema_warmup_and_batch_statistics_average():
    import jax.numpy as jnp

    init, new = {"w": jnp.zeros(3)}, {"w": jnp.ones(3)}
    rest = {"mean": jnp.full(2, 4.0), "count": jnp.array(7, jnp.uint32)}
    ema = steps.init_ema(init, {"mean": jnp.zeros(2), "count": jnp.array(0, jnp.uint32)},
                         0.999, True)
    # Step 0 with warm-up: decay min(0.999, 1/10), so the average is mostly the new weights.
    out = steps.update_ema(ema, new, rest, jnp.array(0), decay=0.999, warmup=True,
                           batch_stats=True)
    np.testing.assert_allclose(out["params"]["w"], 0.9)
    np.testing.assert_allclose(out["rest"]["mean"], 3.6)
    assert int(out["rest"]["count"]) == 7  # non-float state is taken, not averaged
    late = steps.update_ema(ema, new, rest, jnp.array(100_000), decay=0.999, warmup=True,
                            batch_stats=True)
    np.testing.assert_allclose(late["params"]["w"], 0.001, rtol=1e-4)
    plain = steps.update_ema(init, new, rest, jnp.array(0), decay=0.999, warmup=False,
                             batch_stats=False)
    np.testing.assert_allclose(plain["w"], 0.001, rtol=1e-4)


def test_averaged_batch_statistics_are_the_ones_evaluated(mnist_idx):
    import dataclasses

    import jax

    tr = Trainer(quick_config("model.name=bn_cnn_half", "train.ema_decay=0.9",
                              "train.ema_batch_stats=true", "train.batch_size=64"),
                 small_data(mnist_idx))
    keys, state = tr.keys(0), tr.init_state(0)
    tr.compile(state, keys)
    perm = steps.epoch_permutation(keys["data"], 0, tr.data.num_train)
    for offset in range(0, 8 * 64, 4 * 64):
        state, _ = tr.run_chunk(state, 4, perm, offset, keys)
    live, averaged = jax.tree.leaves(state.rest), jax.tree.leaves(state.ema["rest"])
    assert live and not any(np.allclose(a, b) for a, b in zip(live, averaged, strict=True))
    # Evaluation uses the averaged statistics: swapping in the live ones changes the result.
    live_stats = dataclasses.replace(state, ema={**state.ema, "rest": state.rest})
    assert tr.evaluate(state, "val") != tr.evaluate(live_stats, "val")


def test_ema_options_need_an_average_and_leave_older_hashes_alone():
    from digitjax.config import config_hash

    with pytest.raises(ConfigError, match="need a moving average"):
        registry.resolve("quick", ["train.ema_warmup=true"])
    base = registry.resolve("quick", ["train.ema_decay=0.9"])
    warm = registry.resolve("quick", ["train.ema_decay=0.9", "train.ema_warmup=true"])
    assert config_hash(base) != config_hash(warm)


def test_scanned_and_unrolled_chunks_train_the_same(mnist_idx):
    # GPUs and TPUs default to the scanned loop, CPUs to the unrolled one: same steps.
    runs = {}
    for loop in ("unroll", "scan"):
        tr = Trainer(quick_config("train.batch_size=64", f"train.loop={loop}"),
                     small_data(mnist_idx))
        keys, state = tr.keys(0), tr.init_state(0)
        tr.compile(state, keys)
        assert tr.execution.loop == loop
        perm = tr.permutation(keys, 0)
        losses = []
        for offset in range(0, 8 * 64, 4 * 64):
            state, metrics = tr.run_chunk(state, 4, perm, offset, keys)
            losses += np.asarray(metrics["loss"]).tolist()
        runs[loop] = losses, np.asarray(jax.tree.leaves(state.params)[0])
    np.testing.assert_allclose(runs["scan"][0], runs["unroll"][0], rtol=1e-5)
    np.testing.assert_allclose(runs["scan"][1], runs["unroll"][1], rtol=1e-3, atol=1e-5)
    assert len(set(runs["unroll"][0])) == 8  # every step saw its own batch


def test_label_smoothing_is_the_cross_entropy_with_smoothed_targets():
    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(6, 10)).astype(np.float32), rng.integers(0, 10, 6)
    targets = np.full((6, 10), 0.1 / 10)
    targets[np.arange(6), labels] += 0.9
    log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    expected = -(targets * log_p).sum(1)
    np.testing.assert_allclose(steps.cross_entropy(logits, labels, 10, 0.1), expected,
                               rtol=1e-5)
    np.testing.assert_allclose(steps.cross_entropy(logits, labels, 10),
                               -log_p[np.arange(6), labels], rtol=1e-5)


def test_weight_decay_clipping_and_the_cosine_schedule():
    import dataclasses

    import jax.numpy as jnp
    import optax

    from digitjax import optim
    from digitjax.config import OptimizerConfig, ScheduleConfig

    params = {"w": jnp.full((4,), 2.0)}
    zero = {"w": jnp.zeros(4)}

    def update(cfg, grads):
        tx = optim.make_optimizer(cfg, optax.constant_schedule(0.1))
        updates, _ = tx.update(grads, tx.init(params), params)
        return np.asarray(updates["w"])

    plain = OptimizerConfig(name="sgd", learning_rate=0.1, momentum=0.0)
    # Decay alone: sgd and adamw (decoupled) move weights towards 0 by lr * wd * w; adam
    # adds wd * w to the gradient, which then goes through adam's scaling.
    for name in ("sgd", "adamw"):
        cfg = dataclasses.replace(plain, name=name, weight_decay=0.5)
        np.testing.assert_allclose(update(cfg, zero), -0.1 * 0.5 * 2.0, rtol=1e-6)
    adam = optax.adam(0.1)
    as_gradient, _ = adam.update({"w": 0.5 * params["w"]}, adam.init(params), params)
    np.testing.assert_allclose(update(dataclasses.replace(plain, name="adam", weight_decay=0.5),
                                      zero), as_gradient["w"], rtol=1e-6)
    # A gradient of norm 10 is clipped to norm 1 before the step.
    big = {"w": jnp.full((4,), 5.0)}
    clipped = update(dataclasses.replace(plain, grad_clip_norm=1.0), big)
    np.testing.assert_allclose(np.linalg.norm(clipped), 0.1 * 1.0, rtol=1e-5)
    # Cosine: warm-up from 0 to the peak, then down to the final fraction.
    schedule = optim.make_schedule(ScheduleConfig(name="cosine", warmup_epochs=1,
                                                  final_fraction=0.1), 1.0, 100, 10)
    assert float(schedule(0)) == 0.0 and np.isclose(float(schedule(10)), 1.0)
    assert np.isclose(float(schedule(100)), 0.1) and float(schedule(55)) < 1.0


def test_select_final_reports_the_last_epoch(mnist_idx, tmp_path):
    tr = Trainer(quick_config("train.epochs=2", "train.batch_size=64", "train.select=final"),
                 small_data(mnist_idx))
    s = tr.fit(0, tmp_path, progress=False)
    test = [r for r in records.read_metrics(tmp_path / records.METRICS) if r["split"] == "test"]
    assert s["selected_step"] == s["steps"] == 32 and s["selected_epoch"] == 2
    assert s["test_accuracy"] == test[-1]["accuracy"]


@pytest.mark.parametrize("overrides,random", [
    (["augment.name=none"], False),  # flax_cnn has no dropout: nothing random in a step
    (["augment.name=translate"], True),  # a new draw of shifts each step
    (["augment.name=none", "model.name=bn_cnn_half"], True),  # a new dropout mask each step
])
def test_each_step_draws_its_own_augmentation_and_dropout(mnist_idx, overrides, random):
    """The train step's keys are folded with the step: the same batch at another step sees
    other augmentation draws and dropout masks, and at the same step the same ones."""
    import dataclasses

    tr = Trainer(quick_config("train.batch_size=64", *overrides), small_data(mnist_idx))
    keys, state = tr.keys(0), tr.init_state(0)
    perm = tr.permutation(keys, 0)
    step = jax.jit(tr.train_step)

    def loss_at(k):
        at_k = dataclasses.replace(state, step=jnp.asarray(k, state.step.dtype))
        return float(step(at_k, tr.data.train_images, tr.data.train_labels, perm,
                          np.int32(0), keys["augment"], keys["dropout"])[1]["loss"])

    assert loss_at(3) == loss_at(3)
    assert (loss_at(3) != loss_at(4)) == random
