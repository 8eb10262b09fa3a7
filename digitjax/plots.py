"""PNG plots of runs and studies, drawn from the run records (matplotlib, no display).

A run's plots go to `<run_dir>/plots/`: learning curves (metrics.jsonl), the confusion
matrix and the most confident mistakes on the test split (the reported checkpoint), and a
grid of augmented samples when the run augments. Figures are built with
`matplotlib.figure.Figure`, never pyplot, so no GUI backend or global figure state is
involved and every PNG has a fixed pixel size (inches x DPI).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from . import records
from .config import ConfigError

PLOTS_DIR = "plots"
DPI = 100
# Figure sizes in inches; a PNG is (width * DPI) x (height * DPI) pixels.
FIGSIZE = {
    "learning_curves": (10.0, 4.0),
    "confusion_matrix": (6.5, 5.5),
    "mistakes": (10.0, 5.6),
    "augment": (8.0, 5.6),
    "study": (8.0, 4.5),
    "runs": (10.0, 4.0),
}
MISTAKES_GRID = (4, 8)  # rows, columns
AUGMENT_IMAGES, AUGMENT_DRAWS = 8, 4  # columns; rows of augmented draws under the originals
SPLIT_STYLE = {"train": dict(color="tab:blue", lw=1.2),
               "val": dict(color="tab:orange", marker="o", ms=4),
               "test": dict(color="tab:green", marker="s", ms=4)}


def pixel_size(kind: str) -> tuple[int, int]:
    """(width, height) in pixels of a PNG of `kind` (a FIGSIZE key)."""
    w, h = FIGSIZE[kind]
    return round(w * DPI), round(h * DPI)


def _save(fig: Figure, out_png: str | os.PathLike) -> Path:
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI, format="png")
    return out


def _image_grid(fig: Figure, rows: int, cols: int):
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_axis_off()
    return axes


def _show_digit(ax, image) -> None:
    """One image [H, W, 1], uint8 or float in [0, 1], as the model sees it (light ink)."""
    image = np.asarray(image)
    scale = 255.0 if image.dtype == np.uint8 else 1.0
    ax.set_axis_on()
    ax.imshow(image[..., 0] / scale, cmap="gray", vmin=0, vmax=1, interpolation="nearest")


# --- the plots ---------------------------------------------------------------------------


def plot_learning_curves(rows: list[dict], out_png, *, title: str = "",
                         selected_epoch: float | None = None) -> Path:
    """Loss and accuracy per epoch of the train, val and test rows of metrics.jsonl."""
    fig = Figure(figsize=FIGSIZE["learning_curves"], layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
    for split, style in SPLIT_STYLE.items():
        split_rows = [r for r in rows if r["split"] == split]
        if not split_rows:
            continue
        epochs = [r["epoch"] for r in split_rows]
        ax_loss.plot(epochs, [r["loss"] for r in split_rows], label=split, **style)
        ax_acc.plot(epochs, [100 * r["accuracy"] for r in split_rows], label=split, **style)
    for ax, name in ((ax_loss, "loss (cross-entropy)"), (ax_acc, "accuracy (%)")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        if selected_epoch is not None:
            ax.axvline(selected_epoch, color="grey", ls="--", lw=1, label="reported")
    ax_loss.set_yscale("log")
    ax_acc.legend(loc="lower right")
    fig.suptitle(title or "learning curves")
    return _save(fig, out_png)


def plot_runs(rows_by_run: dict[str, list[dict]], out_png, *, split: str = "val",
              title: str = "") -> Path:
    """Loss and error rate per epoch on `split` of several runs, one line each (by label).

    Both on log scales: runs worth comparing differ at 0.3% vs 0.4% error, which an
    accuracy axis from chance to 100% flattens.
    """
    fig = Figure(figsize=FIGSIZE["runs"], layout="constrained")
    ax_loss, ax_err = fig.subplots(1, 2)
    for label, rows in rows_by_run.items():
        split_rows = [r for r in rows if r["split"] == split]
        epochs = [r["epoch"] for r in split_rows]
        ax_loss.plot(epochs, [r["loss"] for r in split_rows], marker="o", ms=3, label=label)
        # An error of 0 (small splits) is drawn at 0.01% so the log axis can show it.
        ax_err.plot(epochs, [max(100 * (1 - r["accuracy"]), 0.01) for r in split_rows],
                    marker="o", ms=3, label=label)
    for ax, name in ((ax_loss, f"{split} loss"), (ax_err, f"{split} error (%, log)")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    ax_err.legend(loc="upper right", fontsize=8)
    fig.suptitle(title or f"{split} curves of {len(rows_by_run)} runs")
    return _save(fig, out_png)


def read_runs(run_dirs: list[str | os.PathLike]) -> dict[str, list[dict]]:
    """metrics.jsonl of each run, labelled `<experiment> seed<k>` (the folder if ambiguous)."""
    found: dict[str, list[dict]] = {}
    for d in map(Path, run_dirs):
        if not (d / records.METRICS).exists():
            raise ConfigError(f"{d}: not a run folder (no {records.METRICS})")
        record = records.read_json(d / records.CONFIG)
        label = f"{record['config']['name']} seed{record['seed']}"
        found[str(d) if label in found else label] = records.read_metrics(d / records.METRICS)
    return found


def confusion_counts(labels, predicted, num_classes: int) -> np.ndarray:
    """[true, predicted] counts."""
    counts = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(counts, (np.asarray(labels), np.asarray(predicted)), 1)
    return counts


def plot_confusion_matrix(labels, predicted, class_names, out_png, *, title: str = "") -> Path:
    """Counts of (true, predicted) pairs; colour is the share of the true class."""
    n = len(class_names)
    counts = confusion_counts(labels, predicted, n)
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig = Figure(figsize=FIGSIZE["confusion_matrix"], layout="constrained")
    ax = fig.subplots()
    # Colour off-diagonal shares on their own scale: the diagonal would wash them out.
    off = np.where(np.eye(n, dtype=bool), np.nan, share)
    vmax = max(np.nanmax(off) if n > 1 else 0.0, 1e-3)
    im = ax.imshow(off, cmap="Reds", vmin=0, vmax=vmax)
    for i in range(n):
        for j in range(n):
            if counts[i, j]:
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7,
                        color="black", weight="bold" if i == j else "normal")
    short = [c if len(c) <= 8 else c[:7] + "." for c in class_names]
    ax.set_xticks(range(n), short, rotation=45 if max(map(len, short)) > 2 else 0)
    ax.set_yticks(range(n), short)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(im, ax=ax, label="share of the true class (off-diagonal)")
    accuracy = np.trace(counts) / max(counts.sum(), 1)
    ax.set_title(f"{title + ': ' if title else ''}{100 * accuracy:.2f}% of "
                 f"{counts.sum():,} correct", fontsize=10)
    return _save(fig, out_png)


def confident_mistakes(labels, probs, count: int) -> np.ndarray:
    """Indices of the `count` wrong predictions made with the highest probability."""
    predicted = probs.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    confidence = probs[wrong, predicted[wrong]]
    return wrong[np.argsort(-confidence, kind="stable")[:count]]


def plot_mistakes(images_u8, labels, probs, class_names, out_png, *, title: str = "") -> Path:
    """The most confident mistakes, each titled `true -> predicted (probability)`."""
    rows, cols = MISTAKES_GRID
    chosen = confident_mistakes(np.asarray(labels), np.asarray(probs), rows * cols)
    fig = Figure(figsize=FIGSIZE["mistakes"], layout="constrained")
    axes = _image_grid(fig, rows, cols)
    for ax, i in zip(axes.ravel(), chosen, strict=False):
        p = int(probs[i].argmax())
        _show_digit(ax, images_u8[i])
        ax.set_title(f"{class_names[labels[i]]}\u2192{class_names[p]} "
                     f"({100 * probs[i, p]:.0f}%)", fontsize=8, color="darkred")
    wrong = int((np.asarray(probs).argmax(1) != np.asarray(labels)).sum())
    fig.suptitle(f"{title + ': ' if title else ''}the {len(chosen)} most confident of "
                 f"{wrong} mistakes (true\u2192predicted)", fontsize=10)
    return _save(fig, out_png)


def plot_augmentations(images_u8, name: str, out_png, *, seed: int = 0) -> Path:
    """The first images (top row) and AUGMENT_DRAWS draws of augmentation `name` below."""
    import jax
    import jax.numpy as jnp

    from . import augment, steps

    fn = jax.jit(augment.get(name))
    originals = np.asarray(images_u8[:AUGMENT_IMAGES])
    x = steps.to_float(jnp.asarray(originals))
    key = jax.random.key(seed)  # fixed: the same grid every time
    draws = [np.asarray(fn(x, jax.random.fold_in(key, d))) for d in range(AUGMENT_DRAWS)]
    fig = Figure(figsize=FIGSIZE["augment"], layout="constrained")
    axes = _image_grid(fig, 1 + AUGMENT_DRAWS, len(originals))
    for j, image in enumerate(originals):
        _show_digit(axes[0, j], image)
        for d, batch in enumerate(draws):
            _show_digit(axes[d + 1, j], np.clip(batch[j], 0, 1))
    axes[0, 0].set_title("original", fontsize=8, loc="left")
    axes[1, 0].set_title(f"{AUGMENT_DRAWS} draws", fontsize=8, loc="left")
    fig.suptitle(f"augmentation {name!r}", fontsize=10)
    return _save(fig, out_png)


def plot_study(summaries_by_experiment: dict[str, list[dict]], out_png, *,
               metric: str = "test_accuracy", title: str = "") -> Path:
    """Each experiment's `metric` per seed (dots) with mean and sample std (bar)."""
    from .loop import mean_std

    fig = Figure(figsize=FIGSIZE["study"], layout="constrained")
    ax = fig.subplots()
    names = list(summaries_by_experiment)
    rng = np.random.default_rng(0)  # horizontal jitter only, so dots do not overlap
    for i, name in enumerate(names):
        values = [100 * s[metric] for s in summaries_by_experiment[name]]
        mean, std = mean_std(values)
        ax.errorbar(i, mean, yerr=std, fmt="_", ms=18, capsize=6, color="black", zorder=3)
        ax.scatter(i + rng.uniform(-0.12, 0.12, len(values)), values, s=18, alpha=0.7,
                   zorder=2)
        ax.annotate(f"{mean:.2f}\u00b1{std:.2f}\n(n={len(values)})", (i, mean),
                    xytext=(14, 0), textcoords="offset points", va="center", fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=20 if len(names) > 3 else 0)
    ax.set_xlim(-0.5, len(names) - 0.3)
    ax.set_ylabel(f"{metric.replace('_', ' ')} (%)")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title or f"{metric.replace('_', ' ')}: seeds (dots), mean \u00b1 std",
                 fontsize=10)
    return _save(fig, out_png)


# --- from files ----------------------------------------------------------------------------


def sample_images(count: int = AUGMENT_IMAGES) -> np.ndarray:
    """The first `count` MNIST test digits from the embedded IDX file (no data set needed)."""
    from .idx import read_idx

    path = Path(__file__).resolve().parent / "mnist_data" / "t10k-images-idx3-ubyte.gz"
    return np.asarray(read_idx(path)[:count])[..., None]


def read_study(workdir: str | os.PathLike, experiments: list[str]) -> dict[str, list[dict]]:
    """The completed summaries under `<workdir>/<experiment>/seed*/summary.json`."""
    found = {}
    for name in experiments:
        paths = sorted(Path(workdir).glob(f"{name}/seed*/{records.SUMMARY}"))
        done = [s for s in map(records.read_json, paths) if s.get("status") == "completed"]
        if not done:
            raise ConfigError(f"no finished runs in {Path(workdir) / name}/seed*/")
        found[name] = done
    return found


def _test_split(record: dict, data_dir, idx_dir, download):
    from . import data

    d = record["config"]["data"]
    return data.load_split(d["dataset"], d["test_split"], data_dir=data_dir, idx_dir=idx_dir,
                           download=download, progress=False)


def make_run_plots(run_dir: str | os.PathLike, model=None, *, test_data=None,
                   which: str | int | None = None, data_dir=None, idx_dir=None,
                   download: bool = False, echo=None) -> dict[str, Path]:
    """Write the run's plots into `<run_dir>/plots/`; returns {plot name: path}.

    `model`: the reported model (an nnx.Module); None loads the checkpoint `which` (default:
    "best" when the run selects by validation, else "latest"). `test_data`: (images uint8
    [N, 28, 28, 1], labels) of the run's test split; None reads it with data.load_split.
    Without a checkpoint only the learning curves are drawn (`echo` says so).
    """
    from .predict import Predictor

    run_dir = Path(run_dir)
    if not (run_dir / records.CONFIG).exists():
        raise ConfigError(f"{run_dir} is not a run folder (no {records.CONFIG})")
    record = records.read_json(run_dir / records.CONFIG)
    summary_path = run_dir / records.SUMMARY
    summary = records.read_json(summary_path) if summary_path.exists() else {}
    config = record["config"]
    title = f"{run_dir.parent.name} {run_dir.name}"  # names overrides too (quick+<hash>)
    out_dir = run_dir / PLOTS_DIR
    written = {"learning_curves": plot_learning_curves(
        records.read_metrics(run_dir / records.METRICS), out_dir / "learning_curves.png",
        title=title, selected_epoch=summary.get("selected_epoch"))}
    if model is None:
        if which is None:
            which = "latest" if summary.get("selected_by") == "final" else "best"
        try:
            predictor = Predictor.from_run(run_dir, which)
        except (ConfigError, FileNotFoundError) as e:
            if echo:
                echo(f"{run_dir}: no confusion matrix or mistakes ({e})")
            predictor = None
    else:
        predictor = Predictor(model, record)
    if predictor is not None:
        if test_data is None:
            test_data = _test_split(record, data_dir, idx_dir, download)
        images, labels = test_data
        images, labels = np.asarray(images), np.asarray(labels)
        probs = predictor.probabilities(images)
        names = predictor.class_names
        split = f"{title}, {config['data']['test_split']}"
        written["confusion_matrix"] = plot_confusion_matrix(
            labels, probs.argmax(1), names, out_dir / "confusion_matrix.png", title=split)
        written["mistakes"] = plot_mistakes(images, labels, probs, names,
                                            out_dir / "mistakes.png", title=split)
    aug = config["augment"]["name"]
    if aug != "none":
        if test_data is None:
            test_data = _test_split(record, data_dir, idx_dir, download)
        written["augment"] = plot_augmentations(np.asarray(test_data[0]), aug,
                                                out_dir / f"augment_{aug}.png")
    return written
