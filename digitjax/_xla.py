"""XLA flags that make these small convnets fast, set before jax is imported.

Measured on a 2-core AMD EPYC (jax 0.10.2): XLA:CPU's YNNPACK convolution fusions are the
slow path for these nets; excluding individual convolutions from them made a train step
1.6-2x faster. The flag only affects the CPU backend. A flag the user set is never changed,
and DIGITJAX_XLA_DEFAULTS=0 turns ours off. benchmarks/ re-measures it on the pinned jax.
"""

import os
import sys
import warnings

CPU_FLAGS = {"--xla_cpu_experimental_ynn_fusion_type": "-individual_convolution"}
# GPU: no nondeterministic kernels (atomics, autotuned algorithms that are), so a seed
# gives the same numbers on every run, as on CPU. Each flag only affects its own backend.
GPU_FLAGS = {"--xla_gpu_deterministic_ops": "true"}


def configure_xla_flags() -> None:
    if os.environ.get("DIGITJAX_XLA_DEFAULTS", "1") == "0":
        return
    flags = os.environ.get("XLA_FLAGS", "")
    extra = [f"{k}={v}" for k, v in {**CPU_FLAGS, **GPU_FLAGS}.items() if k not in flags]
    if "jax" in sys.modules:  # too late to change XLA's flags in this process
        if extra:
            warnings.warn("jax was imported before digitjax, so digitjax's XLA:CPU flags are "
                          "not set: training is slower and its numbers differ slightly from "
                          "`digitjax run`'s (import digitjax first)", stacklevel=3)
        return
    if extra:
        os.environ["XLA_FLAGS"] = " ".join([flags, *extra]).strip()
