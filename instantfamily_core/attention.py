"""Masked cross-attention: the one implementation used by the ComfyUI patch and by the training processors.

Queries are the flattened ``h×w`` positions of a feature map (row-major, as both ComfyUI and diffusers flatten
them); keys are the stacked context ``[text; identity 1; …; identity N]`` described by a :class:`SlotLayout`.
Text keys are visible from every query. Identity n's keys are visible only from queries inside mask n.

Two modes:

``additive`` (default)
    A float bias is added to the logits: ``0`` for text, ``log(w_n · m_n)`` inside mask n and a large negative
    number outside (``w_n`` the identity's weight, ``m_n ∈ [0, 1]`` the mask at that position). Leak-free: an
    identity contributes exactly nothing outside its mask. The bias is a float tensor (ComfyUI's CPU backend adds
    the mask and breaks on bool masks) handed to whatever attention kernel the caller uses.
``paper``
    The paper's literal Eq. 6: ``softmax((M ⊙ QKᵀ) / √d) V`` with ``M`` = 1 on text keys and ``m_n`` on identity
    n's keys. Masked logits become 0, not −∞, so identities still get weight ``exp(0)`` outside their masks — as
    printed. Computed here with explicit math (no fused kernel can express it). Two things the equation leaves
    open are fixed so that training and inference agree:

    * **Empty slots are invisible.** A slot whose mask is all zero (a padding slot of a training row with fewer
      faces than slots, or an identity skipped at inference) has its keys excluded (−∞), exactly as in
      ``additive`` mode — otherwise its T null keys at logit 0 would take attention in training that nothing
      takes at inference.
    * **Weights multiply the identity's attention mass.** ``log w_n`` is added to identity n's logits after the
      mask (``(m_n · q·k) / √d + log w_n``), i.e. its unnormalised softmax weights are multiplied by ``w_n`` —
      the same meaning a weight has in ``additive`` mode. ``w_n = 1`` is exactly Eq. 6; ``w_n = 0`` excludes its
      keys (the identity is removed everywhere). Multiplying ``M`` by ``w_n`` instead would only change the
      softmax temperature, and ``w_n = 0`` would set the logits to 0 and spread the identity over the image.

A bias is built once per (feature size, key length, dtype, device) and cached on the object.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from .errors import MaskError, OptionError
from .masks import resize_masks, validate_masks
from .stack import SlotLayout

MODES = ("additive", "paper")

AttentionFn = Callable[..., torch.Tensor]
"""``fn(q, k, v, heads, mask=None) -> out``; q ``(B, Nq, heads·d)``, k/v ``(B, Nk, heads·d)``, mask additive
float broadcastable to ``(B, heads, Nq, Nk)``; returns ``(B, Nq, heads·d)``."""


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def sdpa_attention(q, k, v, heads: int, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Plain multi-head attention through ``torch.nn.functional.scaled_dot_product_attention``."""
    if mask is not None:
        mask = mask.to(q.dtype)
        if mask.ndim == 2:
            mask = mask.unsqueeze(0)
        if mask.ndim == 3:  # (B, Nq, Nk) → one mask per row, shared by the heads
            mask = mask.unsqueeze(1)
    out = F.scaled_dot_product_attention(_split_heads(q, heads), _split_heads(k, heads), _split_heads(v, heads),
                                         attn_mask=mask)
    return _merge_heads(out)


def paper_attention(q, k, v, heads: int, multiplier: torch.Tensor,
                    bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``softmax((M ⊙ QKᵀ) / √d + B) V``; ``M`` and the optional additive ``B`` (float, may hold −∞ for excluded
    keys; computed in float32) are ``(Nq, Nk)`` or ``(B, Nq, Nk)``, broadcast over heads."""
    qh, kh, vh = (_split_heads(t, heads) for t in (q, k, v))
    if multiplier.ndim == 3:
        multiplier = multiplier.unsqueeze(1)
    logits = (torch.matmul(qh, kh.transpose(-1, -2)) * multiplier.to(q.dtype) / math.sqrt(qh.shape[-1])).float()
    if bias is not None:
        logits = logits + (bias.unsqueeze(1) if bias.ndim == 3 else bias).float()
    weights = torch.softmax(logits, dim=-1).to(q.dtype)
    return _merge_heads(torch.matmul(weights, vh))


class MaskedCrossAttention:
    """Masked cross-attention over ``[text; identities]`` for one set of masks and weights.

    ``masks``: ``(N, H, W)`` float in [0, 1] at image (or any) resolution, one per identity, in slot order,
    shared by every batch row; or ``(B, N, H, W)`` for one set per row (training batches; an all-zero mask makes
    a padding slot that no query sees).
    ``weights``: N per-identity weights ≥ 0 (global weight already multiplied in), default all 1.
    ``tokens_per_identity``: T, the number of tokens each identity contributes (L² + 1).
    """

    def __init__(self, masks: torch.Tensor, tokens_per_identity: int, weights: Optional[Sequence[float]] = None,
                 mode: str = "additive"):
        if mode not in MODES:
            raise MaskError(f"mask mode: expected one of {MODES}, got {mode!r}")
        self.masks = validate_masks(masks)
        n = self.masks.shape[-3]
        w = torch.ones(n) if weights is None else torch.as_tensor(list(weights), dtype=torch.float32)
        if w.shape != (n,):
            raise OptionError(f"identity weights: expected {n} weights (one per identity), got {tuple(w.shape)}")
        if not torch.isfinite(w).all() or (w < 0).any():
            raise OptionError(f"identity weights: expected finite values ≥ 0, got {w.tolist()}")
        self.weights = w
        self.tokens_per_identity = int(tokens_per_identity)
        self.mode = mode
        self._cache: dict = {}

    @property
    def num_identities(self) -> int:
        return int(self.masks.shape[-3])

    def layout(self, key_length: int) -> SlotLayout:
        return SlotLayout.for_key_length(key_length, self.tokens_per_identity, self.num_identities)

    def _region_values(self, feature_hw: tuple[int, int]) -> torch.Tensor:
        """``(Nq, N)`` (or ``(B, Nq, N)``): w_n · m_n at each query position."""
        small = resize_masks(self.masks, feature_hw)
        return small.flatten(-2).transpose(-1, -2) * self.weights

    def bias(self, feature_hw: tuple[int, int], key_length: int, dtype: torch.dtype,
             device: torch.device) -> Optional[torch.Tensor]:
        """Additive bias ``(Nq, Nk)`` (``(B, Nq, Nk)`` for per-row masks), or ``None`` when it would be all zeros (no identities, or full masks at
        weight 1) so the caller runs the unmasked kernel."""
        key = ("additive", tuple(feature_hw), key_length, dtype, torch.device(device))
        if key not in self._cache:
            layout = self.layout(key_length)
            values = self._region_values(feature_hw)
            if layout.num_identities == 0 or bool((values == 1).all()):
                self._cache[key] = None
            else:
                floor = torch.finfo(dtype).min / 2
                per_identity = torch.where(values > 0, values.clamp_min(1e-30).log(), torch.full_like(values, floor))
                per_identity = per_identity.clamp_min(floor)
                bias = torch.zeros(*values.shape[:-1], key_length)
                owner = layout.key_owner()
                ids = owner >= 0
                bias[..., ids] = per_identity[..., owner[ids]]
                self._cache[key] = bias.to(device=device, dtype=dtype)
        return self._cache[key]

    def active(self) -> torch.Tensor:
        """``(N,)`` (or ``(B, N)`` for per-row masks) bool: the slot has a non-empty mask and a weight > 0.
        Inactive slots (padding, skipped identities, weight 0) contribute nothing in either mode."""
        return (self.masks.flatten(-2).amax(-1) > 0) & (self.weights > 0)

    def multiplier(self, feature_hw: tuple[int, int], key_length: int, dtype: torch.dtype,
                   device: torch.device) -> torch.Tensor:
        """The paper's ``M`` ``(Nq, Nk)`` (``(B, Nq, Nk)`` for per-row masks): 1 on text keys, m_n on identity n's
        keys."""
        return self.paper_terms(feature_hw, key_length, dtype, device)[0]

    def paper_terms(self, feature_hw: tuple[int, int], key_length: int, dtype: torch.dtype,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(M, B)`` of paper mode: ``M`` as :meth:`multiplier`; ``B`` float32, 0 on text keys, ``log w_n`` on the
        keys of an active identity n and −∞ on the keys of an inactive one (see the module docstring)."""
        key = ("paper", tuple(feature_hw), key_length, dtype, torch.device(device))
        if key not in self._cache:
            layout = self.layout(key_length)
            small = resize_masks(self.masks, feature_hw).flatten(-2).transpose(-1, -2)  # (…, Nq, N)
            owner = layout.key_owner()
            ids = owner >= 0
            m = torch.ones(*small.shape[:-1], key_length)
            m[..., ids] = small[..., owner[ids]]
            active = self.active()
            per_identity = torch.where(active, self.weights.clamp_min(1e-30).log(),
                                       torch.full_like(self.weights, -math.inf))  # (N,) or (B, N)
            bias = torch.zeros(*small.shape[:-2], 1, key_length)
            bias[..., ids] = per_identity.unsqueeze(-2)[..., owner[ids]]
            self._cache[key] = (m.to(device=device, dtype=dtype), bias.to(device=device))
        return self._cache[key]

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                 feature_hw: tuple[int, int], attention_fn: AttentionFn = sdpa_attention) -> torch.Tensor:
        """Attention of ``q`` over the stacked ``k``/``v``; ``feature_hw`` is the query feature map's (h, w)."""
        h, w = int(feature_hw[0]), int(feature_hw[1])
        if h * w != q.shape[1]:
            raise MaskError(f"feature size: {h}×{w} = {h * w} positions but the queries have {q.shape[1]}")
        prepared = self.prepare((h, w), k.shape[1], q.dtype, q.device)
        if self.mode == "paper" and self.num_identities:
            return paper_attention(q, k, v, heads, *prepared)
        return attention_fn(q, k, v, heads, mask=prepared)

    def prepare(self, feature_hw: tuple[int, int], key_length: int, dtype: torch.dtype, device: torch.device):
        """What a call at this feature size and key length needs, built once and cached: the additive bias
        (``None`` = unmasked), or paper mode's ``(M, B)``. Callers that compile the model call it ahead of the
        traced region, so tracing never has to build or cache anything."""
        if self.mode == "paper" and self.num_identities:
            return self.paper_terms(feature_hw, key_length, dtype, device)
        return self.bias(feature_hw, key_length, dtype, device)
