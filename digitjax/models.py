"""CNN architectures (Flax NNX), registered by name.

Every model maps uint8-derived float images [B, 28, 28, C] in [0, 1] to logits [B, classes]
and is called as `model(x, train=..., key=...)`: `key` drives dropout when training, so
randomness is explicit and derived from the run's seed. Variants are registered as
partials of one class, never as copies.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.extend.core
import jax.numpy as jnp
from flax import nnx

from .config import ConfigError, closest

MODELS: dict[str, Callable[..., nnx.Module]] = {}
DESCRIPTIONS: dict[str, str] = {}


def register(name: str, description: str, factory: Callable[..., nnx.Module]) -> None:
    if name in MODELS:
        raise ValueError(f"model {name!r} is registered twice")
    MODELS[name] = factory
    DESCRIPTIONS[name] = description


def create(name: str, *, num_classes: int, in_channels: int, rngs: nnx.Rngs) -> nnx.Module:
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}{closest(name, MODELS)}; "
                          f"known: {', '.join(sorted(MODELS))}")
    return MODELS[name](num_classes=num_classes, in_channels=in_channels, rngs=rngs)


def pool(x: jax.Array, size: int, kind: str) -> jax.Array:
    """Non-overlapping pooling as reshape + reduce.

    Measured on XLA:CPU: 1.7x faster than `reduce_window` max-pool, whose backward pass is
    slow. Trailing rows/columns that do not fill a window are dropped, as in VALID pooling.
    """
    b, h, w, c = x.shape
    h2, w2 = h // size, w // size
    x = x[:, : h2 * size, : w2 * size].reshape(b, h2, size, w2, size, c)
    return x.max(axis=(2, 4)) if kind == "max" else x.mean(axis=(2, 4))


def _dropout_keys(key: jax.Array | None, n: int) -> list[jax.Array | None]:
    return list(jax.random.split(key, n)) if key is not None else [None] * n


class FlaxExampleCNN(nnx.Module):
    """The Flax MNIST example's CNN: conv32-avgpool-conv64-avgpool-dense256-dense10."""

    def __init__(self, *, num_classes: int, in_channels: int, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(in_channels, 32, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(32, 64, (3, 3), rngs=rngs)
        self.dense1 = nnx.Linear(7 * 7 * 64, 256, rngs=rngs)
        self.dense2 = nnx.Linear(256, num_classes, rngs=rngs)

    def __call__(self, x, *, train: bool = False, key=None):
        x = pool(nnx.relu(self.conv1(x)), 2, "avg")
        x = pool(nnx.relu(self.conv2(x)), 2, "avg")
        x = x.reshape(x.shape[0], -1)
        return self.dense2(nnx.relu(self.dense1(x)))


class KerasCNN(nnx.Module):
    """The classic Keras MNIST CNN (our seed project's model).

    conv32 3x3 - conv64 3x3 (VALID) - maxpool 2 - dropout - dense128 - dropout - dense10.
    """

    def __init__(self, *, num_classes: int, in_channels: int, rngs: nnx.Rngs,
                 dropout1: float = 0.25, dropout2: float = 0.5):
        self.conv1 = nnx.Conv(in_channels, 32, (3, 3), padding="VALID", rngs=rngs)
        self.conv2 = nnx.Conv(32, 64, (3, 3), padding="VALID", rngs=rngs)
        self.dense1 = nnx.Linear(12 * 12 * 64, 128, rngs=rngs)
        self.dense2 = nnx.Linear(128, num_classes, rngs=rngs)
        self.drop1 = nnx.Dropout(dropout1)
        self.drop2 = nnx.Dropout(dropout2)

    def __call__(self, x, *, train: bool = False, key=None):
        k1, k2 = _dropout_keys(key, 2)
        x = nnx.relu(self.conv1(x))
        x = pool(nnx.relu(self.conv2(x)), 2, "max")
        x = self.drop1(x, deterministic=not train, rngs=k1)
        x = nnx.relu(self.dense1(x.reshape(x.shape[0], -1)))
        x = self.drop2(x, deterministic=not train, rngs=k2)
        return self.dense2(x)


class LeanCNN(nnx.Module):
    """A FLOP-lean 2-conv net for time to accuracy: conv16 5x5, maxpool, conv32 3x3,
    maxpool, dense128, dense10 (2.84 MFLOP forward per image, under a third of flax_cnn's 9.29)."""

    def __init__(self, *, num_classes: int, in_channels: int, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(in_channels, 16, (5, 5), rngs=rngs)
        self.conv2 = nnx.Conv(16, 32, (3, 3), rngs=rngs)
        self.dense1 = nnx.Linear(7 * 7 * 32, 128, rngs=rngs)
        self.dense2 = nnx.Linear(128, num_classes, rngs=rngs)

    def __call__(self, x, *, train: bool = False, key=None):
        x = pool(nnx.relu(self.conv1(x)), 2, "max")
        x = pool(nnx.relu(self.conv2(x)), 2, "max")
        x = nnx.relu(self.dense1(x.reshape(x.shape[0], -1)))
        return self.dense2(x)


class MLP(nnx.Module):
    """A fully connected baseline; `hidden=()` is multinomial logistic regression."""

    def __init__(self, *, num_classes: int, in_channels: int, rngs: nnx.Rngs,
                 hidden: tuple[int, ...] = (256,)):
        sizes = (28 * 28 * in_channels, *hidden)
        pairs = zip(sizes[:-1], sizes[1:], strict=True)
        self.hidden = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in pairs])
        self.out = nnx.Linear(sizes[-1], num_classes, rngs=rngs)

    def __call__(self, x, *, train: bool = False, key=None):
        x = x.reshape(x.shape[0], -1)
        for layer in self.hidden:
            x = nnx.relu(layer(x))
        return self.out(x)


class LeNet5(nnx.Module):
    """LeNet-5 (LeCun et al. 1998) adapted to 28x28 inputs: conv6 5x5 SAME (the paper pads
    to 32x32 instead), maxpool, conv16 5x5 VALID, maxpool, dense 120, 84, 10.

    ReLU and max pooling, the common modern form, rather than the paper's scaled tanh and
    trainable average subsampling (and its RBF output layer).
    """

    def __init__(self, *, num_classes: int, in_channels: int, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(in_channels, 6, (5, 5), rngs=rngs)
        self.conv2 = nnx.Conv(6, 16, (5, 5), padding="VALID", rngs=rngs)
        self.dense1 = nnx.Linear(5 * 5 * 16, 120, rngs=rngs)
        self.dense2 = nnx.Linear(120, 84, rngs=rngs)
        self.dense3 = nnx.Linear(84, num_classes, rngs=rngs)

    def __call__(self, x, *, train: bool = False, key=None):
        x = pool(nnx.relu(self.conv1(x)), 2, "max")  # 14x14x6
        x = pool(nnx.relu(self.conv2(x)), 2, "max")  # 5x5x16
        x = nnx.relu(self.dense1(x.reshape(x.shape[0], -1)))
        return self.dense3(nnx.relu(self.dense2(x)))


# Running statistics average over ~10 batches (PyTorch's default) rather than Keras' ~100:
# our CPU-budget runs are short, and eval uses these statistics.
BN_MOMENTUM = 0.9


class ConvBN(nnx.Module):
    """Conv without bias (the batch norm's shift replaces it) followed by batch norm."""

    def __init__(self, cin: int, cout: int, kernel: int, *, rngs: nnx.Rngs, stride: int = 1,
                 padding="SAME"):
        self.conv = nnx.Conv(cin, cout, (kernel, kernel), strides=stride, padding=padding,
                             use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(cout, momentum=BN_MOMENTUM, rngs=rngs)

    def __call__(self, x, train: bool):
        # Batch statistics (and a running-average update) in training, running averages in eval.
        return self.bn(self.conv(x), use_running_average=not train)


class BNCNN(nnx.Module):
    """Batch-norm + dropout CNN after Chris Deotte's Kaggle MNIST net
    (32C3-32C3-32C5S2-64C3-64C3-64C5S2-128, ~99.6% with augmentation).

    3x3 convs are VALID and 5x5 stride-2 convs SAME, as in the original (28-26-24-12-10-8-4).
    Each layer is conv-BN-ReLU (the original applies ReLU before BN; BN first makes the conv
    bias redundant). `width` scales the conv channels; the 128-unit head is kept at every
    width, as it costs little.
    """

    def __init__(self, *, num_classes: int, in_channels: int, rngs: nnx.Rngs,
                 width: float = 1.0, dropout: float = 0.4):
        c1, c2 = round(32 * width), round(64 * width)
        specs = [(in_channels, c1, 3, 1), (c1, c1, 3, 1), (c1, c1, 5, 2),
                 (c1, c2, 3, 1), (c2, c2, 3, 1), (c2, c2, 5, 2)]
        self.convs = nnx.List([
            ConvBN(cin, cout, k, stride=s, padding="VALID" if s == 1 else "SAME", rngs=rngs)
            for cin, cout, k, s in specs])
        self.dense1 = nnx.Linear(4 * 4 * c2, 128, use_bias=False, rngs=rngs)
        self.bn_dense = nnx.BatchNorm(128, momentum=BN_MOMENTUM, rngs=rngs)
        self.dense2 = nnx.Linear(128, num_classes, rngs=rngs)
        self.drop = nnx.Dropout(dropout)

    def __call__(self, x, *, train: bool = False, key=None):
        keys = _dropout_keys(key, 3)
        for i, conv in enumerate(self.convs):
            x = nnx.relu(conv(x, train))
            if i % 3 == 2:  # after each stride-2 conv: 12x12 and 4x4
                x = self.drop(x, deterministic=not train, rngs=keys[i // 3])
        x = self.bn_dense(self.dense1(x.reshape(x.shape[0], -1)), use_running_average=not train)
        x = self.drop(nnx.relu(x), deterministic=not train, rngs=keys[2])
        return self.dense2(x)


class BasicBlock(nnx.Module):
    """ResNet basic block: conv-BN-ReLU-conv-BN plus the input, or a strided 1x1 conv-BN
    projection of it when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int, *, rngs: nnx.Rngs):
        # Padding 1 rather than SAME: a stride-2 SAME conv on 14x14 pads only the far side,
        # so its outputs would sit one pixel off the pixels the 1x1 projection samples.
        self.conv1 = ConvBN(cin, cout, 3, stride=stride, padding=1, rngs=rngs)
        self.conv2 = ConvBN(cout, cout, 3, padding=1, rngs=rngs)
        self.project = (ConvBN(cin, cout, 1, stride=stride, padding="VALID", rngs=rngs)
                        if stride != 1 or cin != cout else None)

    def __call__(self, x, train: bool):
        y = self.conv2(nnx.relu(self.conv1(x, train)), train)
        return nnx.relu(y + (x if self.project is None else self.project(x, train)))


class SmallResNet(nnx.Module):
    """A small ResNet: stem conv 3x3 + BN + ReLU at 28x28, maxpool to 14x14, then one stage
    per width (stride 2 between stages: 14, 7, 4 pixels), global average pool, dense.

    The pool after the stem keeps the 32-channel stage off the full 28x28 grid, which would
    cost more than the rest of the net together.
    """

    def __init__(self, *, num_classes: int, in_channels: int, rngs: nnx.Rngs,
                 widths: tuple[int, ...] = (32, 64, 128),
                 blocks_per_stage: tuple[int, ...] = (1, 1, 1)):
        self.stem = ConvBN(in_channels, widths[0], 3, rngs=rngs)
        blocks, cin = [], widths[0]
        for stage, (cout, n) in enumerate(zip(widths, blocks_per_stage, strict=True)):
            for b in range(n):
                blocks.append(BasicBlock(cin, cout, 2 if stage > 0 and b == 0 else 1,
                                         rngs=rngs))
                cin = cout
        self.blocks = nnx.List(blocks)
        self.head = nnx.Linear(cin, num_classes, rngs=rngs)

    def __call__(self, x, *, train: bool = False, key=None):
        x = pool(nnx.relu(self.stem(x, train)), 2, "max")
        for block in self.blocks:
            x = block(x, train)
        return self.head(x.mean(axis=(1, 2)))


register("flax_cnn", "Flax MNIST example CNN (conv32, avgpool, conv64, avgpool, 256, 10)",
         FlaxExampleCNN)
register("keras_cnn", "classic Keras MNIST CNN (conv32, conv64, maxpool, dropout, 128, 10)",
         KerasCNN)
register("lean_cnn", "FLOP-lean 2-conv net for time to accuracy (conv16 5x5, conv32, 128, 10)",
         LeanCNN)
register("mlp", "one hidden layer of 256 ReLU units", MLP)
register("linear", "multinomial logistic regression on pixels",
         functools.partial(MLP, hidden=()))
register("lenet5", "LeNet-5 for 28x28 (conv6 5x5, maxpool, conv16 5x5, maxpool, 120, 84, 10; "
         "ReLU)", LeNet5)
register("bn_cnn", "batch-norm + dropout CNN after Deotte's Kaggle net "
         "(32C3-32C3-32C5S2-64C3-64C3-64C5S2-128)", BNCNN)
register("bn_cnn_half", "bn_cnn at half width (16/32 channels, ~1/4 of the FLOPs)",
         functools.partial(BNCNN, width=0.5))
register("resnet_small", "small ResNet (stem 32, maxpool, basic blocks of 32/64/128, global "
         "average pool)", SmallResNet)


def count_params(params) -> int:
    return int(sum(x.size for x in jax.tree.leaves(params)))


def forward_flops(graphdef, params, rest, image_shape) -> int:
    """Forward FLOPs for one image: 2 x multiply-adds of every conv and matmul.

    Counted from the jaxpr, so it is the same on every backend (XLA:CPU's own cost
    analysis counts convolutions differently).
    """
    def fwd(p, r, x):
        return nnx.merge(graphdef, p, r)(x)

    x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    return _count_flops(jax.make_jaxpr(fwd)(params, rest, x).jaxpr)


def _count_flops(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        out = eqn.outvars[0].aval.shape
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * math.prod(out) * math.prod(lhs[d] for d in contract)
        elif eqn.primitive.name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, *spatial)
            per_output = rhs[spec[1]] * math.prod(rhs[d] for d in spec[2:])
            total += 2 * math.prod(out) * per_output
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            total += _count_flops(sub)
    return total
