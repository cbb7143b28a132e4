"""Images for face analysis: validate numpy ``H×W×3`` uint8 RGB inputs, and load image files the one way.

ComfyUI's ``IMAGE`` tensors (float ``[0, 1]``, ``B×H×W×3``) are converted by the node adapters, not here. Wrong
inputs raise :class:`ImageInputError` naming the input, never an ``IndexError`` deep inside OpenCV.

:func:`load_rgb` is the one image loader of the training, evaluation and benchmark tools: EXIF orientation applied
(a phone photo stored sideways comes out upright, as every viewer shows it), then RGB. Pillow is imported when it is
called, so importing this module needs only numpy.
"""

from __future__ import annotations

import os
from typing import Sequence, Union

import numpy as np

from ..errors import ImageFileError, ImageInputError

MIN_SIDE = 16

ImageSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, np.ndarray]


def load_rgb(source: ImageSource, name: str | None = None) -> np.ndarray:
    """An image file (a path) or encoded image bytes (``bytes`` or a uint8 array) as an ``H×W×3`` uint8 RGB array,
    EXIF orientation applied. Raises :class:`~instantfamily_core.errors.ImageFileError` naming the file (or
    ``name``) when it is missing or cannot be decoded."""
    import io

    from PIL import Image, ImageOps
    if isinstance(source, (bytes, bytearray, memoryview, np.ndarray)):
        label = name or "image bytes"
        opener = io.BytesIO(bytes(source))
    else:
        path = os.fspath(source)
        label = name or path
        if not os.path.isfile(path):
            raise ImageFileError(f"image file not found: {label}")
        opener = path
    try:
        with Image.open(opener) as im:
            return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    except Exception as e:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise ImageFileError(f"cannot decode image {label}: {type(e).__name__}: {e}") from None


def check_image(image, name: str) -> np.ndarray:
    """``image`` if it is an ``H×W×3`` uint8 array with sides ≥ 16 px; else :class:`ImageInputError`."""
    if not isinstance(image, np.ndarray):
        raise ImageInputError(f"{name}: expected a numpy uint8 RGB image of shape (H, W, 3), got "
                              f"{type(image).__name__}")
    if image.dtype != np.uint8:
        raise ImageInputError(f"{name}: expected dtype uint8 (0-255 RGB), got {image.dtype}; convert a float image "
                              "in [0, 1] with (img * 255).round().clip(0, 255).astype(np.uint8)")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ImageInputError(f"{name}: expected shape (H, W, 3) RGB, got {tuple(image.shape)}")
    if image.shape[0] < MIN_SIDE or image.shape[1] < MIN_SIDE:
        raise ImageInputError(f"{name}: image {image.shape[1]}×{image.shape[0]} is too small to contain a face")
    return image


def as_image_list(images, name: str) -> list[np.ndarray]:
    """One image, a ``B×H×W×3`` batch or a sequence of images → validated list (labels ``name image k``)."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
        items: Sequence = list(images)
    elif isinstance(images, np.ndarray):
        items = [images]
    elif isinstance(images, (list, tuple)):
        items = list(images)
    else:
        raise ImageInputError(f"{name}: expected a numpy image or a list of images, got {type(images).__name__}")
    if not items:
        raise ImageInputError(f"{name}: no reference images given")
    return [check_image(img, f"{name} image {k}") for k, img in enumerate(items)]
