"""The Flax MNIST example's training loop, as a reference for speed and accuracy.

Written in the form of the official example (flax examples/mnist, NNX): its CNN (avg-pool
through `nnx.avg_pool`, i.e. reduce_window), `nnx.Optimizer(model, optax.sgd(lr, momentum),
wrt=nnx.Param)`, an `nnx.jit` train step and a Python loop over numpy batches of 128 drawn
from a numpy permutation. Evaluation is excluded from the timing, and the step keeps no
metrics (the example updates an nnx.MultiMetric in it: a little more work). `--model
digitjax` trains digitjax's FlaxExampleCNN instead (the same net, pooling as reshape +
mean), which separates the loop's speed from the model code's.

    python benchmarks/reference_loop.py --seeds 0-2 --epochs 1 [--train-split train[:55000]]
"""

# digitjax before jax: it sets the XLA flag of digitjax runs (DIGITJAX_XLA_DEFAULTS=0: not).
import digitjax  # noqa: F401, I001

import argparse
import functools
import itertools
import json
import time

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from digitjax import data
from digitjax.config import parse_seeds
from digitjax.models import FlaxExampleCNN


class ExampleCNN(nnx.Module):
    """The official example's CNN: conv32, avg-pool, conv64, avg-pool, dense256, dense10."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 32, kernel_size=(3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(32, 64, kernel_size=(3, 3), rngs=rngs)
        self.avg_pool = functools.partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))
        self.linear1 = nnx.Linear(7 * 7 * 64, 256, rngs=rngs)
        self.linear2 = nnx.Linear(256, 10, rngs=rngs)

    def __call__(self, x):
        x = self.avg_pool(nnx.relu(self.conv1(x)))
        x = self.avg_pool(nnx.relu(self.conv2(x)))
        x = x.reshape(x.shape[0], -1)
        return self.linear2(nnx.relu(self.linear1(x)))


MODELS = {
    "example": lambda seed: ExampleCNN(rngs=nnx.Rngs(seed)),
    "digitjax": lambda seed: FlaxExampleCNN(num_classes=10, in_channels=1, rngs=nnx.Rngs(seed)),
}


def loss_fn(model, images, labels):
    logits = model(images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits


@nnx.jit
def train_step(model, optimizer, images, labels):
    (loss, _), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, images, labels)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def eval_step(model, images, labels):
    return jnp.sum(jnp.argmax(model(images), -1) == labels)


def index_batches(rng: np.random.RandomState, n: int, batch: int):
    """Endless batches of indices: a fresh permutation per epoch, the remainder dropped."""
    steps = n // batch
    while True:
        yield from rng.permutation(n)[: steps * batch].reshape(steps, batch)


def train_steps(model, optimizer, images_u8, labels, batches):
    """One `train_step` per numpy batch, as the example's loop; returns the last loss.

    Nothing waits for the device here: call `.block_until_ready()` on the result to time.
    """
    loss = None
    for idx in batches:
        loss = train_step(model, optimizer, images_u8[idx].astype(np.float32) / 255.0,
                          labels[idx])
    return loss


def run(seed, train, test, epochs, batch, lr, momentum, model_name="example"):
    model = MODELS[model_name](seed)
    optimizer = nnx.Optimizer(model, optax.sgd(lr, momentum), wrt=nnx.Param)
    x, y = train
    order = index_batches(np.random.RandomState(seed), len(x), batch)
    # The first step compiles: run it before the clock starts.
    train_steps(model, optimizer, x, y, itertools.islice(order, 1)).block_until_ready()
    num_steps = epochs * (len(x) // batch) - 1
    t0 = time.perf_counter()
    train_steps(model, optimizer, x, y, itertools.islice(order, num_steps)).block_until_ready()
    train_seconds = time.perf_counter() - t0
    tx, ty = test
    correct = sum(int(eval_step(model, tx[i:i + 1000].astype(np.float32) / 255.0, ty[i:i + 1000]))
                  for i in range(0, len(tx), 1000))
    return {"seed": seed, "test_accuracy": correct / len(tx),
            "images_per_second": num_steps * batch / train_seconds, "epochs": epochs,
            "model": model_name}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", default="0")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--train-split", default="train[:55000]")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--model", choices=sorted(MODELS), default="example",
                   help="example: the official CNN code; digitjax: digitjax's FlaxExampleCNN")
    args = p.parse_args()
    train = data.load_split("mnist", args.train_split)
    test = data.load_split("mnist", "test")
    for seed in parse_seeds(args.seeds):
        print(json.dumps(run(seed, train, test, args.epochs, args.batch, 0.1, 0.9, args.model)),
              flush=True)


if __name__ == "__main__":
    main()
