"""Registered experiments: each is the base config plus a few overrides.

Run one with `digitjax run NAME`; `digitjax show NAME` prints its full config.
"""

from digitjax.registry import experiment

from .base import BASE

DEFAULT = "quick"

FLAX_RECIPE = {"model.name": "flax_cnn", "optimizer.name": "sgd",
               "optimizer.learning_rate": 0.1, "optimizer.momentum": 0.9,
               "train.batch_size": 128}

EXPERIMENTS = [
    experiment("quick", "Flax-example CNN, 1 epoch, 1 seed: the smoke test (~30 s on 2 CPU cores)",
               BASE, {**FLAX_RECIPE, "train.epochs": 1, "seeds": (0,)}),
    experiment("flax_cnn_1ep", "Flax-example CNN and recipe, 1 epoch, 3 seeds",
               BASE, {**FLAX_RECIPE, "train.epochs": 1, "seeds": (0, 1, 2)}),
    experiment("flax_cnn", "Flax-example CNN and recipe (SGD 0.1, momentum 0.9), 10 epochs",
               BASE, {**FLAX_RECIPE, "train.epochs": 10, "seeds": (0, 1, 2)}),
    experiment("keras_cnn", "the seed project's Keras CNN with dropout, Adam 1e-3, 6 epochs",
               BASE, {"model.name": "keras_cnn", "optimizer.name": "adam",
                      "optimizer.learning_rate": 1e-3, "train.batch_size": 128,
                      "train.epochs": 6, "seeds": (0, 1, 2)}),
    experiment("fast", "time to 99%: FLOP-lean CNN, Adam (b1 0.7, b2 0.9), one-cycle peak 0.01, "
               "1 epoch", BASE, {"model.name": "lean_cnn", "optimizer.name": "adam",
                                 "optimizer.learning_rate": 0.01, "optimizer.b1": 0.7,
                                 "optimizer.b2": 0.9, "schedule.name": "onecycle",
                                 "train.batch_size": 128, "train.epochs": 1,
                                 "seeds": (0, 1, 2, 3, 4)}),
    experiment("mlp", "one-hidden-layer MLP baseline, Adam 1e-3, 5 epochs",
               BASE, {"model.name": "mlp", "optimizer.name": "adam",
                      "optimizer.learning_rate": 1e-3, "train.epochs": 5, "seeds": (0, 1, 2)}),
    experiment("fashion_flax_cnn", "Flax-example CNN and recipe on Fashion-MNIST, 10 epochs",
               BASE, {**FLAX_RECIPE, "data.dataset": "fashion_mnist", "train.epochs": 10,
                      "seeds": (0, 1, 2)}),
]
