"""InstantID's face tokens: the ``image_proj`` Resampler of ``ip-adapter.bin``, computed as the reference does.

Math from instantX-research/InstantID (Apache-2.0; ``ip_adapter/resampler.py``, the pipeline's
``_encode_prompt_image_emb``), written anew here; the attention and feed-forward blocks are the ones FaceID Plus
uses (:mod:`..faceid.projection`), with InstantID's sizes:

* ``x = proj_in(e)`` for the raw (not L2-normalised) 512-d antelopev2 embedding ``e`` as one input token;
  ``latents`` = the learned (16, 1280) queries; 4 times ``latents = attn(x, latents) + latents;
  latents = ff(latents) + latents``, where attn is a PerceiverAttention (20 heads of 64; q from
  ``norm2(latents)``, k/v from ``cat(norm1(x), norm2(latents))``, q and k each scaled by 64^-¼, softmax in fp32)
  and ff = LayerNorm → Linear ×4 → GELU → Linear; tokens = ``norm_out(proj_out(latents))``: 16 × 2048.
* Several reference photos: the raw embeddings are averaged first (the popular ComfyUI pack's default
  ``combine_embeds="average"``; no re-normalisation — the reference takes one photo).
* Unconditional tokens: the reference runs the Resampler on a zero embedding (``Resampler(0)``, a constant — not
  zero tokens). ``noise > 0`` gives the popular pack's alternative negative ``noise · U[0, 1)^512`` instead of
  zeros (it uses 0.35 in its simple node against "burnt" images); here the uniform noise comes from
  ``torch.Generator().manual_seed(seed)`` on the CPU, so it is the same on every device and run (that pack seeds
  from the embedding's sum; pass a per-person seed to get different noise per person).
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from ..errors import EmbeddingError, OptionError
from ..faceid.projection import _FeedForward, _PerceiverAttention
from .files import DEPTH, DIM, DIM_HEAD, FF_MULT, HEADS, ID_DIM, NUM_TOKENS, InstantIDWeights

logger = logging.getLogger(__name__)


class InstantIDResampler(nn.Module):
    """InstantID's ``Resampler(dim=1280, depth=4, dim_head=64, heads=20, num_queries=16, embedding_dim=512,
    output_dim, ff_mult=4)``; its state dict is the file's ``image_proj`` (51 keys, loaded strictly)."""

    def __init__(self, output_dim: int = 2048):
        super().__init__()
        self.output_dim = int(output_dim)
        self.latents = nn.Parameter(torch.randn(1, NUM_TOKENS, DIM) / DIM ** 0.5)
        self.proj_in = nn.Linear(ID_DIM, DIM)
        self.proj_out = nn.Linear(DIM, self.output_dim)
        self.norm_out = nn.LayerNorm(self.output_dim)
        self.layers = nn.ModuleList(nn.ModuleList([_PerceiverAttention(DIM, DIM_HEAD, HEADS),
                                                   _FeedForward(DIM, FF_MULT)]) for _ in range(DEPTH))

    @classmethod
    def from_weights(cls, weights: InstantIDWeights) -> "InstantIDResampler":
        """The Resampler of a validated file: built without initialising (meta), then ``load_state_dict(strict=True)``
        of ``image_proj`` in fp32 (the file's own tensors when they already are fp32; never written to)."""
        with torch.device("meta"):
            model = cls(weights.context_dim)
        model.load_state_dict({k: v.float() for k, v in weights.image_proj.items()}, strict=True, assign=True)
        return model.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, n, 512)`` embedding tokens → ``(B, 16, output_dim)``."""
        latents = self.latents.repeat(x.shape[0], 1, 1)
        x = self.proj_in(x)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))

    def _run(self, e: torch.Tensor) -> torch.Tensor:
        p = self.proj_in.weight
        with torch.no_grad():
            return self(e.reshape(1, 1, ID_DIM).to(p.device, p.dtype))[0]

    def tokens(self, embeddings, name: str = "identity") -> torch.Tensor:
        """Raw 512-d antelopev2 embedding(s) of one person — ``(512,)``, ``(k, 512)`` or a list of them, one per
        photo — → ``(16, output_dim)``; several photos are averaged first."""
        e = raw_embeddings(embeddings, name)
        return self._run(e.mean(0))

    def uncond_tokens(self, noise: float = 0.0, seed: int = 0) -> torch.Tensor:
        """``(16, output_dim)`` negative tokens: ``Resampler(0)`` as the reference (``noise == 0``), else
        ``Resampler(noise · U[0,1)^512)`` with the uniform noise drawn from ``torch.Generator().manual_seed(seed)``
        on the CPU (module docstring)."""
        noise = float(noise)
        if not math.isfinite(noise) or noise < 0:
            raise OptionError(f"noise: expected a number ≥ 0 (0 = the reference's zero embedding, the popular pack "
                              f"uses 0.35), got {noise!r}")
        if noise == 0:
            return self._run(torch.zeros(ID_DIM))
        g = torch.Generator().manual_seed(int(seed))
        return self._run(noise * torch.rand(ID_DIM, generator=g))


def raw_embeddings(embeddings, name: str = "identity") -> torch.Tensor:
    """``(k, 512)`` float32 from ``(512,)``, ``(k, 512)`` or a list of per-photo embeddings (tensors or arrays);
    refuses other shapes, NaN/inf and zero vectors, and warns when they look L2-normalised (InstantID was trained on
    insightface's raw ``embedding``, norm ≈ 20-30 for antelopev2, not ``normed_embedding``)."""
    if isinstance(embeddings, (list, tuple)):
        if not embeddings:
            raise EmbeddingError(f"{name}: no face embeddings; encode at least one reference photo")
        e = torch.stack([torch.as_tensor(x).float().reshape(-1) for x in embeddings])
    else:
        e = torch.as_tensor(embeddings).float()
        e = e.unsqueeze(0) if e.ndim == 1 else e
    if e.ndim != 2 or e.shape[-1] != ID_DIM or e.shape[0] == 0:
        raise EmbeddingError(f"{name}: InstantID needs 512-d antelopev2 face embeddings, got shape "
                             f"{tuple(e.shape)}")
    if not torch.isfinite(e).all():
        raise EmbeddingError(f"{name}: the face embedding contains NaN or infinite values")
    norms = e.norm(dim=-1)
    if (norms == 0).any():
        raise EmbeddingError(f"{name}: a face embedding is all zeros; encode the reference photo again")
    if torch.allclose(norms, torch.ones_like(norms), atol=1e-3):
        logger.warning("%s: the face embeddings are L2-normalised; InstantID expects insightface's raw embedding "
                       "(Encode Identity keeps it as extra['raw_embeddings'])", name)
    return e


__all__ = ["InstantIDResampler", "raw_embeddings"]
