"""Plots: each file is a PNG of the expected pixel size, from real run records."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
from _cli import run_cli
from PIL import Image

from digitjax import augment, plots


def assert_png(path, kind):
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size == plots.pixel_size(kind), (path, img.size)
        img.load()


def test_run_plots_from_the_run_folder_and_its_checkpoint(run_dir, mnist_idx):
    _, (tx, ty) = mnist_idx
    written = plots.make_run_plots(run_dir, test_data=(tx[:2000], ty[:2000]))
    assert set(written) == {"learning_curves", "confusion_matrix", "mistakes"}
    for kind, path in written.items():
        assert path.parent == run_dir / "plots"
        assert_png(path, kind)


def test_plot_command_without_a_checkpoint_draws_the_learning_curves(run_dir, tmp_path,
                                                                     capsys):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("checkpoints", "plots"))
    code, out, err = run_cli(capsys, "plot", copy)
    assert code == 0, err
    assert out.strip() == f"wrote {copy / 'plots' / 'learning_curves.png'}"
    assert "no confusion matrix or mistakes" in err
    assert_png(copy / "plots" / "learning_curves.png", "learning_curves")


def shift_right(images, key):
    del key
    return jnp.roll(images, 3, axis=2)


def test_augmentation_grid_of_a_run_and_of_a_name(run_dir, mnist_idx, tmp_path, capsys,
                                                  monkeypatch):
    monkeypatch.setitem(augment.AUGMENTATIONS, "test_shift", shift_right)
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("plots"))
    record = json.loads((copy / "config.json").read_text())
    record["config"]["augment"]["name"] = "test_shift"
    (copy / "config.json").write_text(json.dumps(record))
    _, (tx, ty) = mnist_idx
    written = plots.make_run_plots(copy, test_data=(tx[:500], ty[:500]))
    assert_png(written["augment"], "augment")
    assert written["augment"].name == "augment_test_shift.png"

    out = tmp_path / "grid.png"
    code, stdout, err = run_cli(capsys, "plot", "--augment", "none", "-o", out)
    assert code == 0, err
    assert_png(out, "augment")
    code, _, err = run_cli(capsys, "plot", "--augment", "nope", "-o", out)
    assert code == 2 and "unknown augmentation 'nope'" in err


def summary(seed, accuracy):
    return {"status": "completed", "seed": seed, "test_accuracy": accuracy}


def test_study_plot_of_experiments_with_their_seed_spread(tmp_path, capsys):
    out = plots.plot_study({"a": [summary(0, 0.97), summary(1, 0.975)],
                            "b": [summary(0, 0.99)]}, tmp_path / "study.png")
    assert_png(out, "study")
    workdir = tmp_path / "runs"
    for name, accs in {"flax_cnn": [0.99, 0.991, 0.989], "mlp": [0.97, 0.972]}.items():
        for seed, acc in enumerate(accs):
            (workdir / name / f"seed{seed}").mkdir(parents=True)
            (workdir / name / f"seed{seed}" / "summary.json").write_text(
                json.dumps(summary(seed, acc)))
    study = plots.read_study(workdir, ["flax_cnn", "mlp"])
    assert [len(v) for v in study.values()] == [3, 2]
    png = tmp_path / "results" / "x.png"
    code, _, err = run_cli(capsys, "plot", "--experiments", "flax_cnn", "mlp", "--workdir",
                           workdir, "-o", png)
    assert code == 0, err
    assert_png(png, "study")
    code, _, err = run_cli(capsys, "plot", "--experiments", "keras_cnn", "--workdir", workdir)
    assert code == 2 and "no finished runs" in err


def test_plot_needs_exactly_one_thing_to_plot(capsys, tmp_path):
    for argv in (["plot"], ["plot", tmp_path, "--augment", "none"]):
        code, _, err = run_cli(capsys, *argv)
        assert code == 2 and "exactly one of" in err
    code, _, err = run_cli(capsys, "plot", tmp_path)
    assert code == 2 and "not a run folder" in err


def test_confident_mistakes_are_the_wrong_answers_given_with_most_probability():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.05, 0.95]])
    labels = np.array([1, 1, 0, 0])
    assert plots.confident_mistakes(labels, probs, 5).tolist() == [3, 0, 2]
    assert plots.confusion_counts(labels, probs.argmax(1), 2).tolist() == [[0, 2], [1, 1]]


def test_curves_of_several_runs_on_one_plot(run_dir, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(run_dir, other, ignore=shutil.ignore_patterns("checkpoints", "plots"))
    runs = plots.read_runs([run_dir, other])
    assert len(runs) == 2 and str(other) in runs  # the same experiment and seed: by folder
    assert all(any(r["split"] == "val" for r in rows) for rows in runs.values())
    png = tmp_path / "curves.png"
    code, out, err = run_cli(capsys, "plot", "--curves", run_dir, other, "-o", png)
    assert code == 0 and out.strip() == f"wrote {png}", err
    assert_png(png, "runs")
    code, _, err = run_cli(capsys, "plot", "--curves", run_dir, tmp_path)
    assert code == 2 and "not a run folder" in err
