"""Conversions between ComfyUI's IMAGE/MASK tensors and the core's numpy/torch inputs."""

from __future__ import annotations

import math

import numpy as np
import torch

from instantfamily_core.errors import ImageInputError, OptionError


def images_to_uint8(image: torch.Tensor, name: str) -> list[np.ndarray]:
    """IMAGE ``(B, H, W, C)`` float in [0, 1] → list of ``H×W×3`` uint8 RGB arrays."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] not in (1, 3, 4):
        raise ImageInputError(f"{name}: expected an IMAGE batch (B, H, W, 3), got "
                              f"{tuple(getattr(image, 'shape', ()))}")
    arr = (image[..., :3].expand(*image.shape[:3], 3).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return [np.ascontiguousarray(a) for a in arr]


def uint8_to_image(arrays) -> torch.Tensor:
    """``H×W×3`` uint8 array(s) → IMAGE ``(B, H, W, 3)`` float."""
    if isinstance(arrays, np.ndarray) and arrays.ndim == 3:
        arrays = [arrays]
    return torch.from_numpy(np.stack(arrays).astype(np.float32) / 255.0)


def parse_weights(text: str, count: int, name: str = "identity_weights") -> list[float]:
    """``"1, 0.8"`` → per-identity weights; empty → all 1."""
    text = (text or "").strip()
    if not text:
        return [1.0] * count
    try:
        values = [float(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise OptionError(f"{name}: expected comma-separated numbers like '1.0, 0.8', got {text!r}") from None
    bad = [v for v in values if not math.isfinite(v) or v < 0]
    if bad:
        raise OptionError(f"{name}: weights must be finite numbers ≥ 0 (0 turns an identity off), got "
                          f"{bad[0]!r} in {text!r}")
    if len(values) != count:
        raise OptionError(f"{name}: {len(values)} weights for {count} identities; give one per identity "
                          "or leave empty for all 1.0")
    return values
