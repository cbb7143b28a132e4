"""Identity tokens of the IP-Adapter-FaceID family, computed as the reference computes them.

Math from tencent-ailab/IP-Adapter (Apache-2.0: ``ip_adapter_faceid.py`` MLPProjModel / ProjPlusModel,
``resampler.py`` FacePerceiverResampler), written anew here:

* FaceID / Portrait: ``LN(W2·GELU(W0·e + b0) + b2)`` reshaped to (tokens, d) (d = 768 SD1.5, 2048 SDXL); Portrait
  has 16 tokens per
  reference photo and the photos' tokens are concatenated (at most 5 photos);
* Plus: ``x`` = the FaceID tokens (4), then a perceiver resampler reads ``x`` as latents over the CLIP ViT-H
  penultimate hidden states (257×1280) of the aligned 224-px face crop; Plus v2 returns ``x + s·perceiver``
  (``shortcut``), Plus v1 ``perceiver`` alone;
* unconditional tokens: the same projection of a zero face embedding (Plus: and of CLIP's hidden states for an
  all-zero *normalised* pixel tensor — computed by the caller, who owns the CLIP model).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import EmbeddingError
from .files import CLIP_DIM, CLIP_TOKENS, ID_DIM, MAX_PORTRAIT_IMAGES, PERCEIVER_DEPTH, FaceIDWeights


class _PerceiverAttention(nn.Module):
    def __init__(self, dim: int, dim_head: int = 64, heads: int = 12):
        super().__init__()
        self.dim_head, self.heads = dim_head, heads
        inner = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, -1).transpose(1, 2)

    def forward(self, features: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        features, latents = self.norm1(features), self.norm2(latents)
        q = self._heads(self.to_q(latents))
        k, v = (self._heads(t) for t in self.to_kv(torch.cat([features, latents], dim=1)).chunk(2, dim=-1))
        s = 1.0 / math.sqrt(math.sqrt(self.dim_head))  # (q·d^-¼)(k·d^-¼)ᵀ, softmax in fp32
        w = torch.softmax(((q * s) @ (k * s).transpose(-1, -2)).float(), dim=-1).to(q.dtype)
        out = (w @ v).transpose(1, 2).reshape(latents.shape[0], latents.shape[1], -1)
        return self.to_out(out)


class _FeedForward(nn.Sequential):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(),
                         nn.Linear(dim * mult, dim, bias=False))


class PerceiverResampler(nn.Module):
    """``FacePerceiverResampler``: dim d (768 SD1.5 / 2048 SDXL), depth 4, d/64 heads of 64, reads 1280-d CLIP
    ViT-H features."""

    def __init__(self, dim: int, depth: int = PERCEIVER_DEPTH, embedding_dim: int = CLIP_DIM):
        super().__init__()
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, dim)
        self.norm_out = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(nn.ModuleList([_PerceiverAttention(dim, 64, dim // 64), _FeedForward(dim)])
                                    for _ in range(depth))

    def forward(self, latents: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        features = self.proj_in(features)
        for attn, ff in self.layers:
            latents = attn(features, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


class FaceIDProjection(nn.Module):
    """The projection model of one FaceID file (``image_proj`` loaded strictly)."""

    def __init__(self, tokens: int, plus: bool = False, shortcut: bool = False, dim: int = 768):
        super().__init__()
        d = self.dim = int(dim)
        self.tokens, self.plus, self.shortcut = int(tokens), bool(plus), bool(shortcut)
        self.proj = nn.Sequential(nn.Linear(ID_DIM, 2 * ID_DIM), nn.GELU(), nn.Linear(2 * ID_DIM, d * self.tokens))
        self.norm = nn.LayerNorm(d)
        if plus:
            self.perceiver_resampler = PerceiverResampler(d)

    @classmethod
    def from_weights(cls, weights: FaceIDWeights) -> "FaceIDProjection":
        model = cls(weights.tokens_per_image, weights.is_plus, weights.shortcut, weights.context_dim)
        model.load_state_dict({k: v.float() for k, v in weights.image_proj.items()}, strict=True)
        return model.eval().requires_grad_(False)

    def id_tokens(self, embeds: torch.Tensor) -> torch.Tensor:
        """``(B, 512)`` → ``(B, tokens, d)``: ``LN(MLP(e))``."""
        x = self.proj(embeds).reshape(embeds.shape[0], self.tokens, self.dim)
        return self.norm(x)

    def forward(self, embeds: torch.Tensor, clip_hidden: torch.Tensor | None = None,
                s_scale: float = 1.0) -> torch.Tensor:
        x = self.id_tokens(embeds)
        if not self.plus:
            return x
        if clip_hidden is None:
            raise EmbeddingError("FaceID Plus needs CLIP ViT-H hidden states of the aligned face crop; connect a "
                                 "CLIP_VISION model (ViT-H) to the apply node")
        if clip_hidden.ndim != 3 or clip_hidden.shape[-1] != CLIP_DIM or clip_hidden.shape[0] != embeds.shape[0]:
            raise EmbeddingError(f"CLIP hidden states: expected ({embeds.shape[0]}, {CLIP_TOKENS}, {CLIP_DIM}) "
                                 f"(ViT-H penultimate layer), got {tuple(clip_hidden.shape)}; use the ViT-H "
                                 "CLIP vision model (CLIP-ViT-H-14-laion2B-s32B-b79K)")
        out = self.perceiver_resampler(x, clip_hidden)
        return x + s_scale * out if self.shortcut else out


def _check_embeddings(name: str, e: torch.Tensor) -> torch.Tensor:
    e = torch.as_tensor(e).float()
    if e.ndim == 1:
        e = e.unsqueeze(0)
    if e.ndim != 2 or e.shape[-1] != ID_DIM:
        raise EmbeddingError(f"{name}: FaceID needs 512-d insightface embeddings, got shape {tuple(e.shape)}")
    if not torch.isfinite(e).all():
        raise EmbeddingError(f"{name}: the face embedding contains NaN or infinite values")
    return e


def person_tokens(model: FaceIDProjection, variant: str, name: str, embeddings: torch.Tensor,
                  clip_hidden: torch.Tensor | None = None, s_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens, uncond_tokens)`` of one person, each ``(T, d)``.

    ``embeddings``: ``(512,)`` (FaceID, Plus: one normed embedding) or ``(k, 512)`` (Portrait: one per photo,
    ``k ≤ 5``; FaceID/Plus average them). ``clip_hidden``: ``(257, 1280)`` of the face crop and ``(257, 1280)``
    of the zero pixel tensor, stacked as ``(2, 257, 1280)`` (Plus only).
    """
    e = _check_embeddings(name, embeddings)
    with torch.no_grad():
        if variant == "portrait":
            if e.shape[0] > MAX_PORTRAIT_IMAGES:
                raise EmbeddingError(f"{name}: {e.shape[0]} reference photos, but FaceID-Portrait takes at most "
                                     f"{MAX_PORTRAIT_IMAGES}; give fewer photos")
            cond = model(e).reshape(-1, model.dim)
            uncond = model(torch.zeros_like(e)).reshape(-1, model.dim)
            return cond, uncond
        if e.shape[0] > 1:
            e = e.mean(0, keepdim=True)
            e = e / e.norm().clamp_min(1e-12)
        if variant in ("plus", "plusv2"):
            if clip_hidden is None or clip_hidden.shape[0] != 2:
                raise EmbeddingError(f"{name}: FaceID Plus needs CLIP hidden states of the face crop and of the "
                                     "zero image; connect a CLIP_VISION model")
            both = model(torch.cat([e, torch.zeros_like(e)]), clip_hidden.float(), s_scale)
            return both[0], both[1]
        both = model(torch.cat([e, torch.zeros_like(e)]))
        return both[0], both[1]
