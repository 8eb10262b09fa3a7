"""`digitjax predict`: real MNIST digits saved as photo-like files are classified by a run."""

import json

import numpy as np
import pytest
from _cli import run_cli
from PIL import Image

from digitjax import preprocess
from digitjax.predict import Predictor


@pytest.fixture(scope="module")
def predictor(run_dir):
    return Predictor.from_run(run_dir)


def as_photo(digit_u8: np.ndarray, path, offset=(30, 50)) -> None:
    """An MNIST digit as a user's file: 4x larger, dark ink on white, off-centre, RGB."""
    big = Image.fromarray(255 - digit_u8[..., 0]).resize((112, 112), Image.Resampling.BICUBIC)
    canvas = Image.new("L", (220, 180), 255)
    canvas.paste(big, offset)
    canvas.convert("RGB").save(path)



def test_predict_reads_real_digits_from_png_files(run_dir, mnist_idx, tmp_path, capsys):
    _, (images, labels) = mnist_idx
    paths = []
    for i in range(10):  # the first ten test digits, whatever the model makes of them
        paths.append(tmp_path / f"digit{i}.png")
        as_photo(images[i], paths[-1], offset=(10 + 9 * i, 60 - 5 * i))
    code, out, err = run_cli(capsys, "predict", run_dir, *paths, "--json")
    assert code == 0, err
    report = json.loads(out)
    got = [p["label"] for p in report["predictions"]]
    assert sum(g == int(y) for g, y in zip(got, labels[:10], strict=True)) >= 9, got
    first = report["predictions"][0]
    assert first["file"] == str(paths[0]) and first["name"] == str(first["label"])
    assert [t["label"] for t in first["top"]][0] == first["label"] and len(first["top"]) == 3
    probs = [t["probability"] for t in first["top"]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0 + 1e-6
    assert report["checkpoint_step"] == 300


def test_plain_output_is_one_line_per_image(run_dir, mnist_idx, tmp_path, capsys):
    _, (images, labels) = mnist_idx
    path = tmp_path / "seven.png"
    as_photo(images[0], path)  # test digit 0 is a 7
    code, out, _ = run_cli(capsys, "predict", run_dir, path, "--save-input", tmp_path / "seen")
    assert code == 0
    assert out.startswith(f"{path}: {labels[0]} (") and "top 3:" in out
    assert len(out.strip().splitlines()) == 1
    seen = Image.open(tmp_path / "seen" / "seven_28x28.png")
    assert seen.size == (28, 28)


def test_save_input_never_overwrites(run_dir, mnist_idx, tmp_path, capsys):
    _, (images, labels) = mnist_idx
    for sub, i in (("a", 0), ("b", 1)):  # two inputs named x: two files, one per input
        (tmp_path / sub).mkdir()
        as_photo(images[i], tmp_path / sub / "x.png")
    seen = tmp_path / "seen"
    code, _, err = run_cli(capsys, "predict", run_dir, tmp_path / "a" / "x.png",
                           tmp_path / "b" / "x.png", "--save-input", seen)
    assert code == 0, err
    for k, i in ((1, 0), (2, 1)):
        saved = np.asarray(Image.open(seen / f"x-{k}_28x28.png"))
        expected = preprocess.load_digit(tmp_path / ("a", "b")[i] / "x.png")[..., 0]
        np.testing.assert_array_equal(saved, expected)
    # An input named like an output in the same folder is refused, before anything is written.
    as_photo(images[2], tmp_path / "y.png")
    as_photo(images[3], tmp_path / "y_28x28.png")
    before = (tmp_path / "y_28x28.png").read_bytes()
    code, _, err = run_cli(capsys, "predict", run_dir, tmp_path / "y.png",
                           tmp_path / "y_28x28.png", "--save-input", tmp_path)
    assert code == 2 and "would overwrite the input" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "y_28x28.png").read_bytes() == before


def test_predictor_top_classes_agree_with_its_probabilities(predictor, mnist_idx):
    _, (images, labels) = mnist_idx
    probs = predictor.probabilities(images[:50])
    assert probs.shape == (50, 10) and np.allclose(probs.sum(1), 1, atol=1e-5)
    preds = predictor.predict(images[:50], top=3)
    assert [p.label for p in preds] == probs.argmax(1).tolist()
    assert np.mean(probs.argmax(1) == labels[:50]) >= 0.9
    # Padding to fixed batch sizes never changes an image's result.
    np.testing.assert_allclose(predictor.probabilities(images[3:4]), probs[3:4], atol=1e-6)


@pytest.mark.parametrize("content,message", [
    (b"hello, I am text\n", "not an image"),
    (b"", "not an image"),
])
def test_a_file_that_is_not_an_image_is_one_line_and_exit_2(tmp_path, capsys, mnist_idx,
                                                               content, message):
    good = preprocess.save_digit(mnist_idx[1][0][0], tmp_path / "good.png")
    bad = tmp_path / "digit.png"
    bad.write_bytes(content)
    # Images are read before the run: no run folder is needed to reject them.
    code, out, err = run_cli(capsys, "predict", tmp_path / "no_run", good, bad)
    assert code == 2 and out == ""
    assert err.startswith("digitjax: error: ") and message in err
    assert len(err.strip().splitlines()) == 1


def test_a_folder_that_is_not_a_run_is_one_line_and_exit_2(tmp_path, mnist_idx, capsys):
    _, (images, _) = mnist_idx
    path = tmp_path / "d.png"
    as_photo(images[1], path)
    code, _, err = run_cli(capsys, "predict", tmp_path, path)
    assert code == 2 and "not a run folder" in err and len(err.strip().splitlines()) == 1


def test_predictions_use_the_runs_recorded_matmul_precision(predictor, mnist_idx):
    # Inference must do the arithmetic the run was evaluated with (on GPUs jax's default
    # would use TF32/bf16 passes and could disagree with summary.json).
    import jax

    assert predictor.config_record["execution"]["matmul_precision"] == "highest"
    _, (images, _) = mnist_idx
    text = str(jax.make_jaxpr(predictor._probabilities)(
        predictor._params, predictor._rest, images[:2]))
    assert "conv_general_dilated" in text or "dot_general" in text
    assert "HIGHEST" in text and "DEFAULT" not in text
