"""The Flax MNIST example's training loop, as a reference for speed and accuracy.

Written in the form of the official example (flax examples/mnist, NNX): the same CNN,
`nnx.Optimizer(model, optax.sgd(lr, momentum), wrt=nnx.Param)`, an `nnx.jit` train step
and a Python loop over numpy batches of 128 drawn from a numpy permutation. Evaluation
is excluded from the timing.

    python benchmarks/reference_loop.py --seeds 0-2 --epochs 1 [--train-split train[:55000]]
"""

from __future__ import annotations

import argparse
import json
import time

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import digitjax  # noqa: F401  (sets the same XLA flags as digitjax runs; DIGITJAX_XLA_DEFAULTS=0 to compare)
from digitjax import data
from digitjax.config import parse_seeds
from digitjax.models import FlaxExampleCNN


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


def run(seed, train, test, epochs, batch, lr, momentum):
    model = FlaxExampleCNN(num_classes=10, in_channels=1, rngs=nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, optax.sgd(lr, momentum), wrt=nnx.Param)
    rng = np.random.RandomState(seed)
    x, y = train
    steps = len(x) // batch
    train_seconds, images = 0.0, 0
    for _ in range(epochs):
        perm = rng.permutation(len(x))[: steps * batch].reshape(steps, batch)
        t0 = time.perf_counter()
        for i, idx in enumerate(perm):
            loss = train_step(model, optimizer, x[idx].astype(np.float32) / 255.0, y[idx])
            if i == 0 and images == 0:  # exclude the first call's compilation
                loss.block_until_ready()
                t0 = time.perf_counter()
            else:
                images += batch
        loss.block_until_ready()
        train_seconds += time.perf_counter() - t0
    tx, ty = test
    correct = sum(int(eval_step(model, tx[i:i + 1000].astype(np.float32) / 255.0, ty[i:i + 1000]))
                  for i in range(0, len(tx), 1000))
    return {"seed": seed, "test_accuracy": correct / len(tx),
            "images_per_second": images / train_seconds, "epochs": epochs}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", default="0")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--train-split", default="train[:55000]")
    p.add_argument("--batch", type=int, default=128)
    args = p.parse_args()
    train = data.load_split("mnist", args.train_split)
    test = data.load_split("mnist", "test")
    for seed in parse_seeds(args.seeds):
        print(json.dumps(run(seed, train, test, args.epochs, args.batch, 0.1, 0.9)), flush=True)


if __name__ == "__main__":
    main()
