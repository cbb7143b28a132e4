"""Validate the images handed to face analysis: numpy ``H×W×3`` uint8 RGB only.

ComfyUI's ``IMAGE`` tensors (float ``[0, 1]``, ``B×H×W×3``) are converted by the node adapters, not here. Wrong
inputs raise :class:`ImageInputError` naming the input, never an ``IndexError`` deep inside OpenCV.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import InstantFamilyError

MIN_SIDE = 16


class ImageInputError(InstantFamilyError):
    """An image given to face analysis has the wrong type, dtype or shape."""


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
