"""Identity masks: validation, boxes → masks, and resizing to any feature-map size."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from .errors import MaskError


def validate_masks(masks, expected_count: int | None = None, name: str = "masks") -> torch.Tensor:
    """Return ``masks`` as float32 ``(N, H, W)`` (or per-sample ``(B, N, H, W)``) in [0, 1], else raise
    :class:`MaskError`."""
    if not isinstance(masks, torch.Tensor):
        raise MaskError(f"{name}: expected a (N, H, W) tensor, got {type(masks).__name__}")
    if masks.ndim == 2:
        masks = masks.unsqueeze(0)
    if masks.ndim not in (3, 4) or masks.shape[-2] < 1 or masks.shape[-1] < 1:
        raise MaskError(f"{name}: expected shape (N, H, W) or (batch, N, H, W), got {tuple(masks.shape)}")
    if masks.ndim == 4 and masks.shape[0] == 0:
        raise MaskError(f"{name}: the batch holds no masks (shape {tuple(masks.shape)})")
    if expected_count is not None and masks.shape[-3] != expected_count:
        raise MaskError(f"{name}: got {masks.shape[-3]} masks but there are {expected_count} identities; "
                        "give exactly one mask per identity, in slot order")
    masks = masks.detach().float().cpu()
    if masks.numel() and (not torch.isfinite(masks).all() or masks.min() < 0 or masks.max() > 1):
        raise MaskError(f"{name}: values must be finite and within [0, 1]")
    return masks


def boxes_to_masks(boxes: Sequence[Sequence[float]], height: int, width: int) -> torch.Tensor:
    """Filled rectangles ``(x1, y1, x2, y2)`` in pixels → ``(N, height, width)`` float masks.

    A pixel belongs to a box when its centre lies inside; a box thinner than a pixel still covers the pixel
    holding its centre, so a face that is on the canvas never gets an empty mask.
    """
    masks = torch.zeros(len(boxes), height, width)
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        c0, c1 = _pixel_span(x1, x2, width)
        r0, r1 = _pixel_span(y1, y2, height)
        if c1 > c0 and r1 > r0:
            masks[i, r0:r1, c0:c1] = 1.0
    return masks


def _pixel_span(a: float, b: float, size: int) -> tuple[int, int]:
    lo, hi = max(0.0, a), min(float(size), b)
    if hi <= lo:
        return 0, 0
    start, stop = math.ceil(lo - 0.5), math.ceil(hi - 0.5)
    if stop <= start:  # thinner than a pixel: take the pixel holding the centre
        start = min(size - 1, int((lo + hi) / 2))
        stop = start + 1
    return start, stop


def resize_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize ``(…, H, W)`` masks to ``size = (h, w)``, the *actual* feature-map size.

    Each output cell takes the maximum over the image pixels it covers (adaptive max pooling), so a face never
    vanishes at coarse resolutions and the result does not depend on how strided convolutions rounded the size.
    """
    h, w = int(size[0]), int(size[1])
    if h < 1 or w < 1:
        raise MaskError(f"feature size: expected positive (h, w), got {size}")
    if masks.shape[-2:] == (h, w):
        return masks
    lead = masks.shape[:-2]
    if masks.numel() == 0:
        return masks.new_zeros((*lead, h, w))
    flat = masks.reshape(-1, 1, *masks.shape[-2:])
    return F.adaptive_max_pool2d(flat, (h, w)).reshape(*lead, h, w)


def feature_size_for(num_queries: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) of a UNet feature map with ``num_queries`` positions for a latent of ``latent_hw``.

    UNet downsampling halves the size rounding up (3×2 → 2×1); walk the levels until the count matches.
    """
    h, w = int(latent_hw[0]), int(latent_hw[1])
    while True:
        if h * w == num_queries:
            return h, w
        if h == 1 and w == 1 or h * w < num_queries:
            raise MaskError(f"feature size: no downsampling level of a {latent_hw[0]}×{latent_hw[1]} latent has "
                            f"{num_queries} positions")
        h, w = (h + 1) // 2, (w + 1) // 2
