"""diffusers attention processors that route every cross-attention (attn2) through the core's one implementation.

The per-step state — the :class:`~instantfamily_core.attention.MaskedCrossAttention` of this batch and the latent
size — travels in ``cross_attention_kwargs={"instantfamily": MaskContext(...)}``, which both
``UNet2DConditionModel`` and ``ControlNetModel`` hand to every attention processor (also through gradient
checkpointing). No global state: two models with different masks can run side by side.

* :class:`MaskedCrossAttnProcessor` (attn2): ``to_q/to_k/to_v`` → ``MaskedCrossAttention(q, k, v, heads,
  feature_size_for(Nq, latent_hw), attention_fn=sdpa_attention)`` → ``to_out`` — the same split as ComfyUI's
  attn2 replace patch (projections outside, attention inside).
* :class:`PlainSelfAttnProcessor` (attn1): diffusers' own SDPA processor, unchanged maths; it only accepts and
  ignores the ``instantfamily`` keyword so diffusers does not warn about it on every call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from instantfamily_core.attention import MaskedCrossAttention, sdpa_attention
from instantfamily_core.errors import MaskError
from instantfamily_core.masks import feature_size_for

KWARG = "instantfamily"


@dataclass
class MaskContext:
    """What one forward pass needs: the masked attention (None = plain attention) and the latent ``(h, w)``."""

    attention: Optional[MaskedCrossAttention]
    latent_hw: tuple[int, int]

    def as_kwargs(self) -> dict:
        return {KWARG: self}


class MaskedCrossAttnProcessor:
    """attn2 processor: projections, then the core masked attention, then the output projection."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, temb: Optional[torch.Tensor] = None,
                 instantfamily: Optional[MaskContext] = None, **kwargs) -> torch.Tensor:
        if attention_mask is not None:
            raise MaskError("attention_mask: InstantFamily cross-attention takes its masks from the "
                            "'instantfamily' cross_attention_kwargs entry, not from attention_mask")
        residual, hidden_states, context, shape = attention_prelude(attn, hidden_states, encoder_hidden_states, temb)
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        if instantfamily is None or instantfamily.attention is None:
            out = sdpa_attention(q, k, v, attn.heads)
        else:
            hw = feature_size_for(q.shape[1], instantfamily.latent_hw)
            out = instantfamily.attention(q, k, v, attn.heads, hw, attention_fn=sdpa_attention)
        return attention_finish(attn, out.to(q.dtype), residual, shape)


def attention_prelude(attn, hidden_states, encoder_hidden_states, temb):
    """What diffusers' ``AttnProcessor2_0`` does before the projections: ``(residual, hidden_states (B, L, C),
    context, shape)``, ``shape`` the 4-d input shape or None."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    shape = None
    if hidden_states.ndim == 4:
        shape = hidden_states.shape
        b, c, h, w = shape
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    if encoder_hidden_states is not None and attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    return residual, hidden_states, context, shape


def attention_finish(attn, out, residual, shape):
    """What ``AttnProcessor2_0`` does after the attention: ``to_out``, back to 4-d, residual, rescale."""
    out = attn.to_out[1](attn.to_out[0](out))
    if shape is not None:
        out = out.transpose(-1, -2).reshape(shape)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


class PlainSelfAttnProcessor:
    """attn1 processor: diffusers' ``AttnProcessor2_0`` as is (the ``instantfamily`` keyword is ignored)."""

    def __init__(self):
        from diffusers.models.attention_processor import AttnProcessor2_0
        self._inner = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 instantfamily: Optional[MaskContext] = None, **kwargs):
        return self._inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def install_processors(model) -> int:
    """Give every attn2 of ``model`` (a UNet or ControlNet) the masked processor and every attn1 the plain one.

    Returns the number of cross-attention layers patched (16 for SD1.5's UNet, 7 for its ControlNet)."""
    masked, plain = MaskedCrossAttnProcessor(), PlainSelfAttnProcessor()
    processors, count = {}, 0
    for name in model.attn_processors:
        if name.endswith("attn2.processor"):
            processors[name] = masked
            count += 1
        else:
            processors[name] = plain
    model.set_attn_processor(processors)
    return count
