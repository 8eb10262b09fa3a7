"""A photo or scan of one handwritten digit -> a 28x28 uint8 image made the way MNIST was.

MNIST's digits are light ink on black, scaled (antialiased, aspect ratio kept) to fit a
20x20 box and placed in 28x28 with their centre of mass at the centre. `to_mnist` does the
same to any greyscale image: it finds the background from the border, inverts dark-on-light
input, removes the paper's grey level and noise, crops to the ink and rescales. A model
trained on MNIST is only as good on a photo as this step makes the photo look like MNIST.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .idx import DataError

SIZE = 28  # output side, pixels
BOX = 20  # the ink's bounding box is scaled to fit BOX x BOX, as in MNIST
# Where MNIST puts the centre of mass (row, column): measured 13.99, 14.01 (std 0.29) over
# the first 5,000 test digits, so index 14, not the geometric 13.5.
CENTRE = 14.0
MIN_CONTRAST = 0.1  # ink must differ from the background by 10% of the range
SOLID = 0.9  # opaque pixels filling this share of their bounding box: a card, not strokes


def read_grey(path: str | os.PathLike) -> np.ndarray:
    """A PNG/JPEG/... file as float greyscale [H, W] in [0, 1] (DataError if unreadable).

    Transparent pixels are composited over the opaque pixels' median when those form a
    solid block (a scan or photo with a transparent margin: the margin becomes paper), else
    over the colour that contrasts with them (strokes on a transparent canvas, dark or
    light, whatever their edges' antialiasing, stay visible).
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: a folder; give image files (e.g. {path}/*.png)")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        with Image.open(path) as img:
            img.load()  # decodes now, so a truncated file fails here, not later
            img = ImageOps.exif_transpose(img)  # phone photos store their rotation in EXIF
    except (UnidentifiedImageError, Image.DecompressionBombError):
        raise DataError(f"{path}: not an image (expected PNG, JPEG, BMP, GIF or TIFF)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: unreadable image ({e})") from None
    if img.mode in ("I", "I;16", "I;16B", "F"):  # 16-bit or float greyscale
        grey = np.asarray(img, np.float64)
        span = grey.max() - grey.min()
        return (grey - grey.min()) / span if span > 0 else np.zeros_like(grey)
    rgba = np.asarray(img.convert("RGBA"), np.float64) / 255.0
    # ITU-R 601 luma, the weights PIL's own "L" conversion uses.
    luma = rgba[..., :3] @ np.array([0.299, 0.587, 0.114])
    alpha = rgba[..., 3]
    if alpha.min() >= 1.0:
        return luma
    mask = alpha > 0.5
    opaque = luma[mask]
    if opaque.size and mask.sum() > SOLID * np.prod([np.ptp(np.flatnonzero(mask.any(axis)))
                                                     + 1 for axis in (1, 0)]):
        backdrop = float(np.median(opaque))
    else:
        backdrop = 1.0 if not opaque.size or opaque.mean() < 0.5 else 0.0
    return luma * alpha + backdrop * (1.0 - alpha)


def _border(a: np.ndarray) -> np.ndarray:
    """The outer ring of pixels, ~3% of the short side thick (at least 1 pixel)."""
    w = max(1, round(0.03 * min(a.shape)))
    return np.concatenate([a[:w].ravel(), a[-w:].ravel(), a[:, :w].ravel(),
                           a[:, -w:].ravel()])


def ink_map(grey: np.ndarray, name: str = "image") -> np.ndarray:
    """Ink intensity in [0, 1] (0 = background) of a greyscale image in [0, 1].

    The border is taken as background, and the ink is whichever extreme lies farther from
    it: darker (inverted) or lighter. That holds for dim photos of paper and for grey boards,
    where the background's level alone would guess wrong. Levels up to the border's 98th
    percentile count as paper (texture, shadows, JPEG noise).
    """
    border = _border(grey)
    level = np.median(border)
    if level - grey.min() > grey.max() - level:  # dark ink
        grey, border = 1.0 - grey, 1.0 - border
    background = np.median(border)
    contrast = grey.max() - background
    if contrast < MIN_CONTRAST:
        raise DataError(f"{name}: no ink found (a blank image, or the digit is as light as "
                        "its background)")
    ink = np.clip((grey - background) / contrast, 0.0, 1.0)
    floor = min(0.5, float(np.percentile(np.clip((border - background) / contrast, 0, 1), 98)))
    return np.clip((ink - floor) / (1.0 - floor), 0.0, 1.0)


def centre_of_mass(a: np.ndarray) -> tuple[float, float]:
    """(row, column) of the intensity-weighted centre, in pixel-centre coordinates."""
    total = a.sum()
    rows, cols = np.indices(a.shape)
    return float((rows * a).sum() / total), float((cols * a).sum() / total)


def _resize(ink: np.ndarray, height: int, width: int) -> np.ndarray:
    # PIL resamples float ("F") images; LANCZOS widens its kernel when shrinking, so
    # downscaling is antialiased (area-weighted), as MNIST's normalisation was.
    img = Image.fromarray(ink.astype(np.float32))
    return np.clip(np.asarray(img.resize((width, height), Image.Resampling.LANCZOS)), 0, 1)


def _bounds(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return rows[0], rows[-1] + 1, cols[0], cols[-1] + 1


def ink_box(ink: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the digit, bottom/right exclusive.

    The box of the strong ink (>= half the peak, like NIST's binary scans), grown to take
    in the faint antialiased rim within one output pixel of it, but no further: paper noise
    that survives `ink_map` elsewhere must not stretch the box.
    """
    top, bottom, left, right = _bounds(ink >= 0.5)
    margin = max(1, round(max(bottom - top, right - left) / BOX))  # one output pixel
    t, lft = max(0, top - margin), max(0, left - margin)
    window = ink[t:bottom + margin, lft:right + margin]
    wt, wb, wl, wr = _bounds(window > 0)
    return t + wt, t + wb, lft + wl, lft + wr


def to_mnist(grey: np.ndarray, name: str = "image") -> np.ndarray:
    """Float greyscale [H, W] in [0, 1], any polarity -> MNIST-style uint8 [28, 28]."""
    ink = ink_map(np.asarray(grey, np.float64), name)
    top, bottom, left, right = ink_box(ink)
    ink = ink[top:bottom, left:right]
    h, w = ink.shape
    scale = BOX / max(h, w)
    digit = _resize(ink, max(1, round(h * scale)), max(1, round(w * scale)))
    if digit.max() <= 0:
        raise DataError(f"{name}: no ink left after scaling to {BOX}x{BOX} (a speck?)")
    digit = digit / digit.max()  # the strongest stroke is full white, as in MNIST
    h, w = digit.shape
    cy, cx = centre_of_mass(digit)
    # Integer shift (no resampling blur); kept inside the frame for lopsided digits. A
    # symmetric digit's centre sits exactly on a half pixel: the 1e-6 breaks that tie the
    # same way whatever the rounding noise, so polarity or file format never move it.
    top = int(np.clip(np.floor(CENTRE - cy + 0.5 + 1e-6), 0, SIZE - h))
    left = int(np.clip(np.floor(CENTRE - cx + 0.5 + 1e-6), 0, SIZE - w))
    out = np.zeros((SIZE, SIZE))
    out[top:top + h, left:left + w] = digit
    return np.round(out * 255).astype(np.uint8)


def load_digit(path: str | os.PathLike) -> np.ndarray:
    """An image file -> MNIST-style uint8 [28, 28, 1], ready for a model."""
    return to_mnist(read_grey(path), name=str(path))[..., None]


def load_digits(paths, *, progress: bool = False) -> np.ndarray:
    """Several image files -> uint8 [N, 28, 28, 1]; the first bad file is a DataError."""
    from tqdm.auto import tqdm

    paths = list(paths)
    bar = tqdm(paths, disable=not progress, unit="image", leave=False, desc="preprocessing")
    return np.stack([load_digit(p) for p in bar])


def save_digit(image_u8: np.ndarray, path: str | os.PathLike) -> Path:
    """Write a preprocessed [28, 28(, 1)] image as a PNG (to see what the model sees)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(image_u8, np.uint8).reshape(SIZE, SIZE)).save(path)
    return path
