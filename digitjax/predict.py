"""Classify images with a trained run: `Predictor.from_run(run_dir).predict(images_u8)`.

The predictor holds one jitted forward pass; inputs are padded to a few fixed batch
sizes so a call with 3 images and one with 28,000 compile at most a handful of programs.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from . import steps

MAX_BATCH = 1000  # images per compiled call: big enough to amortise the call overhead


@dataclasses.dataclass(frozen=True)
class Prediction:
    label: int  # class index
    name: str  # the class name ("7" for MNIST)
    probability: float
    top: list[tuple[int, str, float]]  # (label, name, probability), most probable first

    def to_json(self) -> dict:
        return {"label": self.label, "name": self.name, "probability": self.probability,
                "top": [{"label": i, "name": n, "probability": p} for i, n, p in self.top]}


class Predictor:
    """A model and its run's config record (config.json), ready for inference."""

    def __init__(self, model: nnx.Module, config_record: dict):
        from .data import DATASETS

        self.config_record = config_record
        dataset = config_record["config"]["data"]["dataset"]
        self.dataset = dataset
        self.class_names = DATASETS[dataset].class_names
        graphdef, params, rest = steps.split_model(model)
        self._params, self._rest = params, rest

        def probabilities(params, rest, images_u8):
            logits = nnx.merge(graphdef, params, rest)(steps.to_float(images_u8), train=False)
            return jax.nn.softmax(logits, axis=-1)

        # The numerics the run was evaluated with (its recorded matmul precision).
        self._probabilities = jax.jit(steps.with_matmul_precision(
            probabilities, steps.recorded_precision(config_record)))

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, which: str | int = "best") -> Predictor:
        """The run's checkpoint `which` ("best", "latest" or a step number)."""
        from .checkpoint import load_model

        model, record = load_model(Path(run_dir), which)
        return cls(model, record)

    @property
    def checkpoint_step(self) -> int | None:
        return self.config_record.get("checkpoint_step")

    def probabilities(self, images_u8: np.ndarray, *, progress: bool = False) -> np.ndarray:
        """Class probabilities [N, classes] (float32) of uint8 images [N, 28, 28, C]."""
        images_u8 = np.asarray(images_u8)
        if images_u8.dtype != np.uint8 or images_u8.ndim != 4:
            raise ValueError(f"expected uint8 images [N, H, W, C], got {images_u8.dtype} "
                             f"{images_u8.shape}")
        n = len(images_u8)
        batch = min(MAX_BATCH, _bucket(n))
        out = []
        with tqdm(total=n, disable=not progress, unit="image", leave=False,
                  desc="predicting") as bar:
            for start in range(0, n, batch):
                chunk = images_u8[start:start + batch]
                pad = batch - len(chunk)
                if pad:
                    chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), np.uint8)])
                probs = self._probabilities(self._params, self._rest, jnp.asarray(chunk))
                out.append(np.asarray(probs)[:batch - pad])
                bar.update(batch - pad)
        if not out:
            return np.zeros((0, len(self.class_names)), np.float32)
        return np.concatenate(out)

    def predict(self, images_u8: np.ndarray, *, top: int = 3) -> list[Prediction]:
        """The most probable class of each image, with the `top` most probable."""
        result = []
        for p in self.probabilities(images_u8):
            order = np.argsort(-p, kind="stable")[:top]
            ranked = [(int(i), self.class_names[i], float(p[i])) for i in order]
            result.append(Prediction(*ranked[0], top=ranked))
        return result


def _bucket(n: int) -> int:
    """The next power of two >= n (at least 8): few distinct shapes, little padding."""
    return max(8, 1 << max(0, n - 1).bit_length())


def format_prediction(name: str, p: Prediction) -> str:
    top = ", ".join(f"{n} {100 * q:.1f}%" for _, n, q in p.top)
    return f"{name}: {p.name} ({100 * p.probability:.1f}%)   top {len(p.top)}: {top}"
