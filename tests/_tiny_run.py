"""One tiny real training run, shared by the predict, Kaggle and plot tests.

The real trainer and loop (records and checkpoints) on real MNIST: the Flax-example CNN,
2 epochs of 150 steps at batch 64 on the first 9,600 training digits (~25 s on 2 CPU
cores, ~96% test accuracy). Trained once per test session, whichever test file asks first.
"""

from pathlib import Path

from digitjax import data_device, registry
from digitjax.train import Trainer

N_TRAIN, N_EVAL = 9600, 500
OVERRIDES = ["train.epochs=2", "train.batch_size=64", "train.steps_per_call=10",
             "train.log_every_steps=30"]
_made: dict[str, Path] = {}


def tiny_run(tmp_path_factory, mnist_idx) -> Path:
    """The run folder (config.json, metrics.jsonl, summary.json, checkpoints/)."""
    if "run" not in _made:
        (x, y), (tx, ty) = mnist_idx
        # Validation and test are slices the tests below never predict on (test[-500:]).
        data = data_device.from_arrays((x[:N_TRAIN], y[:N_TRAIN]),
                                       (x[-N_EVAL:], y[-N_EVAL:]), (tx[-N_EVAL:], ty[-N_EVAL:]),
                                       num_classes=10, eval_batch_size=250)
        run_dir = tmp_path_factory.mktemp("tiny_run") / "quick" / "seed0"
        summary = Trainer(registry.resolve("quick", OVERRIDES), data).fit(0, run_dir,
                                                                          progress=False)
        assert summary["status"] == "completed", summary
        _made["run"] = run_dir
    return _made["run"]
