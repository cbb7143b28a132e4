"""The attn2 patch that puts InstantFamily into ComfyUI's cross-attention — UNet and ControlNet alike.

Two hooks of ``BasicTransformerBlock`` work together (comfy/ldm/modules/attention.py):

1. ``attn2_patch`` (before the k/v projections) appends the identity tokens to each row's context: real tokens on
   cond rows, null tokens on uncond rows (``cond_or_uncond``). Identities never travel inside CONDITIONING, so
   ComfyUI's batching of conditionings of different lengths (LCM repetition) cannot misplace them, and positive
   and negative always get the same layout.
2. the ``attn2`` replace patch receives the projected q, k, v — its last ``N·T`` keys are the identities by
   construction — and runs the core :class:`MaskedCrossAttention` through ComfyUI's active attention backend,
   with the masks resized to the block's actual ``activations_shape``.

Outside the start/end range both hooks step aside: plain text attention, exactly as without the patch.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from instantfamily_core.attention import MaskedCrossAttention


def comfy_attention(extra_options: dict) -> Callable:
    """The core's ``attention_fn`` contract on top of ComfyUI's selected backend (read at call time)."""
    import comfy.ldm.modules.attention as attention

    def fn(q, k, v, heads, mask=None):
        return attention.optimized_attention(q, k, v, heads, mask=mask, attn_precision=extra_options.get(
            "attn_precision"), transformer_options=extra_options)
    return fn


class InstantFamilyAttention:
    """Per-apply state shared by the UNet and ControlNet hooks.

    ``tokens``: ``(N, T, D)`` identity tokens; ``null_tokens``: ``(T, D)``; ``attention``: the masked attention
    for these identities' masks and weights; ``sigma_range``: (sigma_start, sigma_end) — active while
    ``sigma_end <= sigma <= sigma_start``.
    """

    def __init__(self, tokens: torch.Tensor, null_tokens: torch.Tensor, attention: MaskedCrossAttention,
                 sigma_range: Optional[tuple[float, float]] = None, attention_fn: Optional[Callable] = None):
        self.tokens = tokens.detach()
        self.null_tokens = null_tokens.detach()
        self.attention = attention
        self.sigma_range = sigma_range
        self.attention_fn = attention_fn
        self._device_cache: dict = {}

    # ModelPatcher.clone() deep-copies model_options; the patch is shared, not copied (it is read-only).
    def __deepcopy__(self, memo):
        return self

    @property
    def num_identities(self) -> int:
        return int(self.tokens.shape[0])

    def active(self, extra_options: dict) -> bool:
        if self.num_identities == 0:
            return False
        if self.sigma_range is None or "sigmas" not in extra_options:
            return True
        sigma = float(extra_options["sigmas"].detach().flatten()[0])
        start, end = self.sigma_range
        return end <= sigma <= start

    def _tokens_for(self, cond_or_uncond, rows: int, like: torch.Tensor) -> torch.Tensor:
        """``(rows, N·T, D)``: identity tokens on cond rows, null tokens on uncond rows (built once per layout)."""
        chunks = tuple(cond_or_uncond) if cond_or_uncond else (0,)
        key = (chunks, rows, like.device, like.dtype)
        if key not in self._device_cache:
            real = self.tokens.to(like.device, like.dtype).flatten(0, 1)
            null = self.null_tokens.to(like.device, like.dtype).repeat(self.num_identities, 1)
            per = max(1, rows // len(chunks))
            self._device_cache[key] = torch.stack(
                [null if chunks[min(i // per, len(chunks) - 1)] == 1 else real for i in range(rows)])
        return self._device_cache[key]

    def extend_context(self, n, context, value, extra_options):
        """``attn2_patch``: ``(n, context, value) → (n, context + identities, value + identities)``."""
        if not self.active(extra_options) or context is None:
            return n, context, value
        ids = self._tokens_for(extra_options.get("cond_or_uncond"), context.shape[0], context)
        context = torch.cat([context, ids], dim=1)
        if value is not None:
            value = torch.cat([value, ids.to(value.dtype)], dim=1)
        return n, context, value

    def __call__(self, q, k, v, extra_options):
        """``attn2`` replace patch: masked attention over ``[text; identities]``."""
        fn = self.attention_fn or comfy_attention(extra_options)
        heads = extra_options["n_heads"]
        if not self.active(extra_options):
            return fn(q, k, v, heads)
        feature_hw = tuple(extra_options["activations_shape"][-2:])
        return self.attention(q, k, v, heads, feature_hw, attention_fn=fn)


def cross_attention_blocks(diffusion_model) -> list[tuple]:
    """Keys ``(block_name, number, transformer_index)`` of every cross-attention in a UNet-shaped model
    (``input_blocks``, ``middle_block``, ``output_blocks``), found from the live module tree."""
    from comfy.ldm.modules.attention import SpatialTransformer
    keys = []
    groups = [("input", getattr(diffusion_model, "input_blocks", []))]
    if getattr(diffusion_model, "middle_block", None) is not None:
        groups.append(("middle", [diffusion_model.middle_block]))
    groups.append(("output", getattr(diffusion_model, "output_blocks", [])))
    for name, blocks in groups:
        for number, block in enumerate(blocks):
            for layer in block:
                if isinstance(layer, SpatialTransformer):
                    for idx, tb in enumerate(layer.transformer_blocks):
                        if getattr(tb, "attn2", None) is not None:
                            keys.append((name, number, idx))
    return keys


def patch_model(model, state: InstantFamilyAttention):
    """A clone of ``model`` (ModelPatcher) with the InstantFamily hooks on every cross-attention block."""
    m = model.clone()
    m.set_model_attn2_patch(state.extend_context)
    for name, number, idx in cross_attention_blocks(m.model.diffusion_model):
        m.set_model_attn2_replace(state, name, number, idx)
    return m
