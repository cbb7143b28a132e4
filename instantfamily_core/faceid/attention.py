"""Decoupled cross-attention of the FaceID family, extended to N people masked to their regions — one op.

For one query position ``i`` (heads split, ``d`` the head width)::

    out_i = softmax(q_i K_textᵀ/√d) V_text + Σ_n r_n(i) · softmax(q_i K_nᵀ/√d) V_n

``K_n``/``V_n`` are person n's tokens through the block's ``to_k_ip``/``to_v_ip``; ``r_n(i) = w_n · m_n(i)`` is
the person's weight times their mask at that position. Each person has their own softmax over their own T
tokens (the reference's separate image softmax; IP-Adapter's ``out_ip · mask`` for masked use), and all N people
are computed together: one ``(B, heads, Nq, N, T)`` logit tensor, a softmax per group of T, one weighted sum.
For N = 1 and ``r ≡ scale`` this is exactly tencent-ailab/IP-Adapter's ``LoRAIPAttnProcessor2_0``.

People may have different token counts (Portrait: 16 per photo): pad to T and pass ``key_valid``.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from ..errors import IdentityCountError, MaskError


def identity_term(q: torch.Tensor, k_ids: torch.Tensor, v_ids: torch.Tensor, heads: int, region: torch.Tensor,
                  key_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``Σ_n r_n · softmax(q K_nᵀ/√d) V_n``.

    ``q``: ``(B, Nq, C)``; ``k_ids``/``v_ids``: ``(B or 1, N, T, C)``; ``region``: ``(B or 1, Nq, N)``;
    ``key_valid``: optional bool ``(N, T)`` (padding tokens False). Returns ``(B, Nq, C)``.
    """
    b, nq, c = q.shape
    if k_ids.ndim != 4 or k_ids.shape != v_ids.shape or k_ids.shape[-1] != c:
        raise IdentityCountError(f"identity keys/values: expected (B, N, T, {c}) each, got {tuple(k_ids.shape)} "
                                 f"and {tuple(v_ids.shape)}")
    n, t = k_ids.shape[1], k_ids.shape[2]
    if region.ndim != 3 or region.shape[-2:] != (nq, n):
        raise MaskError(f"region weights: expected (B, {nq}, {n}), got {tuple(region.shape)}")
    if c % heads:
        raise IdentityCountError(f"heads: {heads} does not divide the width {c}")
    d = c // heads
    qh = q.view(b, nq, heads, d).transpose(1, 2)  # (B, H, Nq, d)
    kh = k_ids.reshape(k_ids.shape[0], n * t, heads, d).permute(0, 2, 1, 3)  # (B', H, N·T, d)
    vh = v_ids.reshape(v_ids.shape[0], n * t, heads, d).permute(0, 2, 1, 3)
    logits = torch.matmul(qh, kh.transpose(-1, -2)).float() * (1.0 / math.sqrt(d))  # (B, H, Nq, N·T)
    logits = logits.view(b, heads, nq, n, t)
    if key_valid is not None:
        logits = logits.masked_fill(~key_valid.to(logits.device).view(1, 1, 1, n, t), float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # one softmax per person
    probs = probs * region.float().view(region.shape[0], 1, nq, n, 1)  # r_n(i), zero outside mask n
    out = torch.matmul(probs.view(b, heads, nq, n * t).to(vh.dtype), vh)  # Σ_n Σ_t → (B, H, Nq, d)
    return out.transpose(1, 2).reshape(b, nq, c).to(q.dtype)


def decoupled_masked_attention(q, k_text, v_text, k_ids, v_ids, heads: int, region: torch.Tensor,
                               key_valid: Optional[torch.Tensor] = None,
                               attention_fn: Optional[Callable] = None) -> torch.Tensor:
    """Text attention (any backend ``attention_fn(q, k, v, heads)``; default SDPA) plus :func:`identity_term`."""
    if attention_fn is None:
        from ..attention import sdpa_attention
        attention_fn = sdpa_attention
    return attention_fn(q, k_text, v_text, heads) + identity_term(q, k_ids, v_ids, heads, region, key_valid)


def pad_people(tokens: list, uncond: list) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Stack per-person ``(T_n, C)`` tokens to ``(N, T, C)`` (zero padded) with ``key_valid`` (None if all equal)."""
    if not tokens:
        raise IdentityCountError("identities: none given")
    t = max(x.shape[0] for x in tokens)
    if all(x.shape[0] == t for x in tokens):
        return torch.stack(tokens), torch.stack(uncond), None
    valid = torch.zeros(len(tokens), t, dtype=torch.bool)
    out, out_u = [], []
    for i, (x, u) in enumerate(zip(tokens, uncond)):
        valid[i, :x.shape[0]] = True
        pad = x.new_zeros(t - x.shape[0], x.shape[1])
        out.append(torch.cat([x, pad]))
        out_u.append(torch.cat([u, pad]))
    return torch.stack(out), torch.stack(out_u), valid
