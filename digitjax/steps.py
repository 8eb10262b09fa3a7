"""The pure, jitted pieces of training: state, train chunk, evaluation.

Everything here is a function of its arguments: the train set lives on the device as
uint8, each step gathers its batch through the epoch's permutation, augments it and
draws dropout from keys folded with the global step. A compiled call runs several steps
so the host is off the hot path.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any  # nnx.State of nnx.Param
    rest: Any  # other model state (batch-norm statistics), possibly empty
    opt_state: Any
    # Exponential moving average of the parameters (evaluated instead of them when on);
    # an empty dict when train.ema_decay is 0. Not optax.ema, which averages updates.
    # With train.ema_batch_stats, {"params": ..., "rest": ...}: batch-norm statistics
    # averaged too, so the averaged weights are evaluated with statistics that match them.
    ema: Any


def eval_variables(state: TrainState, ema_batch_stats: bool = False):
    """(params, rest) that evaluation uses: the moving averages when they are kept."""
    if not state.ema:
        return state.params, state.rest
    if ema_batch_stats:
        return state.ema["params"], state.ema["rest"]
    return state.ema, state.rest


def init_ema(params, rest, ema_decay: float, ema_batch_stats: bool):
    if not ema_decay:
        return {}
    copy = functools.partial(jax.tree.map, jnp.copy)
    return {"params": copy(params), "rest": copy(rest)} if ema_batch_stats else copy(params)


def update_ema(ema, params, rest, step, *, decay: float, warmup: bool, batch_stats: bool):
    """One EMA step after optimizer step `step` (0-based). With warm-up the decay is
    min(decay, (1 + t) / (10 + t)), so early averages are not dominated by the initial
    weights (as in TF's ExponentialMovingAverage with num_updates)."""
    if warmup:
        t = step.astype(jnp.float32)
        decay = jnp.minimum(decay, (1.0 + t) / (10.0 + t))

    def mix(e, p):  # non-float state (counters, keys) is taken as it is
        return decay * e + (1.0 - decay) * p if jnp.issubdtype(e.dtype, jnp.floating) else p

    if batch_stats:
        return {"params": jax.tree.map(mix, ema["params"], params),
                "rest": jax.tree.map(mix, ema["rest"], rest)}
    return jax.tree.map(mix, ema, params)


def split_model(model: nnx.Module):
    """graphdef, params, rest (non-parameter state)."""
    return nnx.split(model, nnx.Param, ...)


def to_float(images_u8: jax.Array) -> jax.Array:
    return images_u8.astype(jnp.float32) * (1.0 / 255.0)


def cross_entropy(logits: jax.Array, labels: jax.Array, num_classes: int,
                  label_smoothing: float = 0.0) -> jax.Array:
    """Per-example cross-entropy with optional label smoothing."""
    if label_smoothing == 0.0:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def recorded_precision(config_record: dict) -> str | None:
    """The matmul precision a run trained and evaluated with (config.json), if recorded."""
    return (config_record.get("execution") or {}).get("matmul_precision")


def with_matmul_precision(fn, precision: str | None):
    """`fn` traced under `jax.default_matmul_precision(precision)` (None: jax's default).

    Dots and convolutions resolve their precision when traced, so the policy travels with
    the step itself, whatever jit or vmap wraps it later.
    """
    if precision is None:
        return fn

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.default_matmul_precision(precision):
            return fn(*args, **kwargs)

    return wrapped


def make_train_step(graphdef, tx: optax.GradientTransformation, augment, *, batch_size: int,
                    num_classes: int, label_smoothing: float, ema_decay: float = 0.0,
                    ema_warmup: bool = False, ema_batch_stats: bool = False,
                    matmul_precision: str | None = None, batch_sharding=None,
                    state_sharding=None):
    """One optimizer step on the batch at `offset` of the epoch permutation.

    Data parallel: with `batch_sharding` (the batch axis split over a mesh) each device
    gathers its share of the batch from its replica of the train set; `state_sharding`
    (replicated) keeps every device's copy of the new state whole, so XLA all-reduces the
    gradients. Without them the program is exactly the single-device one.
    """

    def train_step(state: TrainState, images_u8, labels, perm, offset, aug_key, dropout_key):
        idx = jax.lax.dynamic_slice_in_dim(perm, offset, batch_size)
        if batch_sharding is not None:
            idx = jax.lax.with_sharding_constraint(idx, batch_sharding)
        x = augment(to_float(images_u8[idx]), jax.random.fold_in(aug_key, state.step))
        y = labels[idx]
        dkey = jax.random.fold_in(dropout_key, state.step)

        def loss_fn(params):
            model = nnx.merge(graphdef, params, state.rest, copy=True)
            logits = model(x, train=True, key=dkey)
            _, _, rest = split_model(model)
            loss = cross_entropy(logits, y, num_classes, label_smoothing).mean()
            return loss, (logits, rest)

        (loss, (logits, rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        accuracy = jnp.mean(jnp.argmax(logits, -1) == y)
        ema = state.ema
        if ema_decay:
            ema = update_ema(ema, params, rest, state.step, decay=ema_decay, warmup=ema_warmup,
                             batch_stats=ema_batch_stats)
        new_state = TrainState(state.step + 1, params, rest, opt_state, ema)
        if state_sharding is not None:
            new_state = jax.lax.with_sharding_constraint(new_state, state_sharding)
        return new_state, {"loss": loss, "accuracy": accuracy}

    return with_matmul_precision(train_step, matmul_precision)


def make_train_chunk(train_step, *, num_steps: int, batch_size: int, loop: str):
    """`num_steps` consecutive steps in one compiled call; metrics stacked per step.

    `loop="unroll"` traces the steps one after another (fast on XLA:CPU, whose backward
    convolutions inside a while body miss the fast path, jax-ml/jax#12868); `"scan"` keeps
    the program small and is the fast form on GPU/TPU.
    """

    def chunk(state, images_u8, labels, perm, offset, aug_key, dropout_key):
        def body(state, i):
            return train_step(state, images_u8, labels, perm, offset + i * batch_size,
                              aug_key, dropout_key)

        if loop == "scan":
            return jax.lax.scan(body, state, jnp.arange(num_steps))
        rows = []
        for i in range(num_steps):
            state, m = body(state, i)
            rows.append(m)
        return state, jax.tree.map(lambda *xs: jnp.stack(xs), *rows)

    return jax.jit(chunk, donate_argnums=(0,))


TTA_SEED = 20260101  # test-time views are the same for every run and evaluation


def make_eval_batch(graphdef, *, num_classes: int, augment=None, tta_views: int = 0,
                    matmul_precision: str | None = None, batch_sharding=None):
    """Sums over one padded batch: loss, correct, count, per-class correct and count.

    With `tta_views` > 0, logits are averaged over the image and that many augmented views
    (test-time augmentation). View v of the split's example k is drawn from a key made of
    (v, k) alone (`start` is the batch's offset in the split), so evaluation is
    deterministic and the same whatever the eval batch size or padding.
    `batch_sharding` splits the batch over a mesh's devices (data parallel).
    """

    def one_view(image, key):
        return augment(image[None], key)[0]

    def eval_batch(params, rest, images_u8, labels, mask, start=0):
        if batch_sharding is not None:
            images_u8, labels, mask = jax.lax.with_sharding_constraint(
                (images_u8, labels, mask), batch_sharding)
        model = nnx.merge(graphdef, params, rest)
        x = to_float(images_u8)
        logits = model(x, train=False)
        index = start + jnp.arange(x.shape[0])
        for v in range(tta_views):
            view_key = jax.random.fold_in(jax.random.key(TTA_SEED), v)
            keys = jax.vmap(jax.random.fold_in, (None, 0))(view_key, index)
            logits = logits + model(jax.vmap(one_view)(x, keys), train=False)
        logits = logits / (1 + tta_views)
        loss = cross_entropy(logits, labels, num_classes)
        correct = (jnp.argmax(logits, -1) == labels) & mask
        onehot = jax.nn.one_hot(labels, num_classes) * mask[:, None]
        return {
            "loss_sum": jnp.sum(loss * mask),
            "correct": jnp.sum(correct),
            "count": jnp.sum(mask),
            "class_correct": jnp.sum(onehot * correct[:, None], axis=0),
            "class_count": jnp.sum(onehot, axis=0),
        }

    return jax.jit(with_matmul_precision(eval_batch, matmul_precision))


def epoch_permutation(data_key: jax.Array, epoch: int, n: int) -> jax.Array:
    """The data order of `epoch`: a function of the seed and the epoch only (resume-safe)."""
    return _permutation(jax.random.fold_in(data_key, epoch), n)


@functools.partial(jax.jit, static_argnums=1)
def _permutation(key, n):
    return jax.random.permutation(key, n).astype(jnp.int32)
