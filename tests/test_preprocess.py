"""Image files -> MNIST-style 28x28: polarity, position, aspect ratio, colour, alpha, errors."""

import numpy as np
import pytest
from PIL import Image

from digitjax import preprocess
from digitjax.idx import DataError


def ring(height=120, width=120, box=(30, 30, 70, 50), thickness=8) -> np.ndarray:
    """A light elliptical ring (a '0') on black: float [H, W] in [0, 1], antialiased."""
    top, left, h, w = box
    rows, cols = np.mgrid[0:height, 0:width] + 0.5
    cy, cx, ry, rx = top + h / 2, left + w / 2, h / 2, w / 2
    r = np.sqrt(((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2)
    # Distance from the ellipse in pixels (approximately), then a 1-pixel soft edge.
    dist = np.abs(r - 1 + thickness / (2 * min(ry, rx))) * min(ry, rx)
    return np.clip(thickness / 2 - dist + 0.5, 0, 1)


def bar(height=200, width=150, box=(20, 40, 150, 20)) -> np.ndarray:
    """A light filled rectangle (a '1') on black."""
    top, left, h, w = box
    a = np.zeros((height, width))
    a[top:top + h, left:left + w] = 1.0
    return a


def check_mnist_like(out: np.ndarray) -> None:
    assert out.shape == (28, 28) and out.dtype == np.uint8
    cy, cx = preprocess.centre_of_mass(out.astype(float))
    assert abs(cy - preprocess.CENTRE) <= 0.5 and abs(cx - preprocess.CENTRE) <= 0.5
    rows, cols = np.flatnonzero(out.any(1)), np.flatnonzero(out.any(0))
    h, w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    assert max(h, w) in (20, 21) and h <= 21 and w <= 21  # 20 plus at most a resampling rim
    assert out.max() == 255


def save(array01: np.ndarray, path, mode="L"):
    img = Image.fromarray(np.round(array01 * 255).astype(np.uint8))
    img.convert(mode).save(path)
    return path


def test_a_light_on_dark_ring_is_scaled_into_20x20_and_centred_by_mass():
    check_mnist_like(preprocess.to_mnist(ring()))


def test_dark_on_light_is_inverted_to_the_same_image():
    light = preprocess.to_mnist(ring())
    dark = preprocess.to_mnist(1.0 - ring())
    np.testing.assert_array_equal(dark, light)


def test_position_in_the_frame_does_not_matter():
    centred = preprocess.to_mnist(ring(120, 120, (30, 30, 70, 50)))
    corner = preprocess.to_mnist(ring(300, 400, (220, 5, 70, 50)))
    np.testing.assert_array_equal(corner, centred)
    check_mnist_like(corner)


def test_a_tall_rectangle_keeps_its_aspect_ratio():
    out = preprocess.to_mnist(bar(box=(20, 40, 150, 20)))  # 150 x 20 pixels
    rows, cols = np.flatnonzero(out.any(1)), np.flatnonzero(out.any(0))
    assert rows[-1] - rows[0] + 1 in (20, 21)
    assert cols[-1] - cols[0] + 1 in (3, 4, 5)  # 20 * 20 / 150 = 2.7 plus the rim
    check_mnist_like(out)


def test_a_wide_shape_fills_the_width():
    out = preprocess.to_mnist(ring(100, 300, (40, 20, 30, 240)))
    rows, cols = np.flatnonzero(out.any(1)), np.flatnonzero(out.any(0))
    assert cols[-1] - cols[0] + 1 in (20, 21) and rows[-1] - rows[0] + 1 <= 5
    check_mnist_like(out)


def test_mnist_digits_come_back_almost_unchanged(mnist_idx):
    """MNIST was made this way, so its own digits are (nearly) a fixed point."""
    _, (images, _) = mnist_idx
    diffs = [np.abs(preprocess.to_mnist(x[..., 0] / 255.0).astype(int) - x[..., 0]).mean()
             for x in images[:100]]
    assert np.mean(diffs) < 1.0  # grey levels of 255, averaged over pixels and digits


def test_rgb_file_blue_ink_on_yellow_paper(tmp_path):
    ink = ring()
    paper, pen = np.array([250, 230, 120]), np.array([20, 30, 140])
    rgb = paper * (1 - ink[..., None]) + pen * ink[..., None]
    path = tmp_path / "blue.png"
    Image.fromarray(rgb.round().astype(np.uint8), "RGB").save(path)
    out = preprocess.load_digit(path)
    assert out.shape == (28, 28, 1)
    reference = preprocess.to_mnist(ring())
    assert np.abs(out[..., 0].astype(int) - reference).max() <= 8
    check_mnist_like(out[..., 0])


def test_black_strokes_on_a_transparent_canvas(tmp_path):
    """A drawing app's export: RGB all black, the strokes only in the alpha channel."""
    rgba = np.zeros((*ring().shape, 4), np.uint8)
    rgba[..., 3] = np.round(ring() * 255)
    path = tmp_path / "canvas.png"
    Image.fromarray(rgba, "RGBA").save(path)
    out = preprocess.load_digit(path)[..., 0]
    assert np.abs(out.astype(int) - preprocess.to_mnist(ring())).max() <= 2
    check_mnist_like(out)


def test_noisy_grey_paper_photo_as_jpeg(tmp_path):
    rng = np.random.default_rng(0)
    photo = 0.8 - 0.6 * ring(240, 240, (60, 60, 140, 100), 16)  # grey paper, dark ink
    photo = np.clip(photo + rng.normal(0, 0.03, photo.shape), 0, 1)
    path = save(photo, tmp_path / "photo.jpg", "RGB")
    out = preprocess.load_digit(path)[..., 0]
    check_mnist_like(out)
    # The paper is black and the ring's hole stays empty (no noise blown up to ink).
    assert (out[:3] == 0).all() and (out[-3:] == 0).all()
    assert out[12:16, 12:16].max() < 40


@pytest.mark.parametrize("paper,ink", [
    (0.45, 0.1),  # a dim photo of paper: dark ink on a background darker than mid-grey
    (0.35, 0.05),
    (0.55, 0.95),  # chalk on a grey board: light ink on a background lighter than mid-grey
    (0.6, 1.0),
])
def test_polarity_follows_the_ink_not_the_background_level(tmp_path, paper, ink):
    rng = np.random.default_rng(1)
    shape = ring(240, 240, (60, 60, 140, 100), 16)
    photo = np.clip(paper + (ink - paper) * shape + rng.normal(0, 0.03, shape.shape), 0, 1)
    out = preprocess.load_digit(save(photo, tmp_path / "photo.jpg", "RGB"))[..., 0]
    # The ring of a clean light-on-dark image, as closely as the 0.8-paper photo above
    # gets to it (correlation 0.75); the wrong polarity gives scattered noise (0.25-0.30).
    reference = preprocess.to_mnist(ring(240, 240, (60, 60, 140, 100), 16))
    assert np.corrcoef(out.ravel(), reference.ravel())[0, 1] > 0.7
    assert out.max() == 255 and out[12:16, 12:16].max() < 40  # the hole stays empty


@pytest.mark.parametrize("edge", ["grey", "two colours"])
def test_strokes_with_shaded_edges_on_a_transparent_canvas(tmp_path, edge):
    """Opaque strokes whose own pixels vary (antialiased grey edges, two pen colours) are
    still strokes on a canvas, not a card with its own paper."""
    shape = ring()
    rgba = np.zeros((*shape.shape, 4), np.uint8)
    rgba[..., 3] = np.where(shape > 0.2, 255, 0)
    if edge == "grey":
        rgba[..., :3] = np.where(shape > 0.6, 0, 128)[..., None]
    else:
        rgba[..., :3] = np.where(np.arange(shape.shape[1]) < 60, 0, 90)[None, :, None]
    path = tmp_path / "strokes.png"
    Image.fromarray(rgba, "RGBA").save(path)
    out = preprocess.load_digit(path)[..., 0]
    assert np.corrcoef(out.ravel(), preprocess.to_mnist(shape).ravel())[0, 1] > 0.8


def test_an_opaque_scan_with_a_transparent_margin_keeps_its_paper(tmp_path):
    """Dark ink on white paper, padded with a transparent margin: the margin is paper, not
    ink (it must not turn the whole card into one white block)."""
    card = 1.0 - ring()
    rgba = np.zeros((200, 200, 4), np.uint8)
    rgba[40:160, 40:160, :3] = np.round(card * 255)[..., None]
    rgba[40:160, 40:160, 3] = 255
    path = tmp_path / "card.png"
    Image.fromarray(rgba, "RGBA").save(path)
    out = preprocess.load_digit(path)[..., 0]
    assert np.abs(out.astype(int) - preprocess.to_mnist(ring())).max() <= 2
    check_mnist_like(out)


def test_a_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="a folder; give image files"):
        preprocess.load_digit(tmp_path)


def test_a_blank_image_is_a_clear_error(tmp_path):
    path = save(np.full((50, 50), 0.9), tmp_path / "blank.png")
    with pytest.raises(DataError, match="no ink found"):
        preprocess.load_digit(path)


@pytest.mark.parametrize("content,message", [
    (b"this is not a picture\n", "not an image"),
    (b"", "not an image"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "unreadable image"),  # truncated PNG
])
def test_files_that_are_not_images_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "digit.png"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as e:
        preprocess.load_digit(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_a_missing_file_says_so(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        preprocess.load_digit(tmp_path / "nope.png")
