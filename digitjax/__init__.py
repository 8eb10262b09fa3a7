"""digitjax: a JAX/Flax experiment suite for handwritten-digit recognition."""

from ._xla import configure_xla_flags

configure_xla_flags()

__version__ = "0.1.0"
