"""The base config every registered experiment starts from.

Defaults follow the Flax MNIST example's recipe (its CNN, SGD lr 0.1 momentum 0.9,
batch 128) with the last 5,000 training images held out for validation.
"""

from digitjax.config import Config

BASE = Config()
