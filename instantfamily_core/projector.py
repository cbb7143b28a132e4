"""Identity projector: one identity's (global, local) face features → ``L² + 1`` tokens of the text width.

The paper leaves the projection open ("each projection process"). Ours:

* **global token** — the L2-normalised global embedding ``(D_g,)`` → ``Linear(D_g, H) → GELU → Linear(H, D)``.
* **local tokens** — the ``(D_l, L, L)`` map read as ``L²`` row-major vectors → ``LayerNorm(D_l) → Linear(D_l, H)
  → GELU → Linear(H, D)`` plus a learned position embedding ``(L², D)``.
* the ``1 + L²`` tokens (global first) go through a shared ``LayerNorm(D)`` so their scale matches CLIP text tokens.
* **null identity** — a learned ``(1 + L², D)`` parameter, used for the unconditional (CFG) branch and for
  identity dropout in training.

Defaults: D_g = D_l = 512, L = 7 (insightface IResNet packs), D = 768 (SD1.5), H = 1024 → 50 tokens per identity.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from torch import nn

from .errors import EmbeddingError
from .identity import IdentityFeatures


@dataclass(frozen=True)
class ProjectorConfig:
    global_dim: int = 512
    local_dim: int = 512
    grid: int = 7
    token_dim: int = 768
    hidden_dim: int = 1024

    @property
    def tokens_per_identity(self) -> int:
        return self.grid * self.grid + 1

    def to_dict(self) -> dict:
        return asdict(self)


def _mlp(i: int, h: int, o: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(i, h), nn.GELU(), nn.Linear(h, o))


class IdentityProjector(nn.Module):
    def __init__(self, config: ProjectorConfig = ProjectorConfig()):
        super().__init__()
        self.config = config
        c = config
        self.global_proj = _mlp(c.global_dim, c.hidden_dim, c.token_dim)
        self.local_norm = nn.LayerNorm(c.local_dim)
        self.local_proj = _mlp(c.local_dim, c.hidden_dim, c.token_dim)
        self.local_pos = nn.Parameter(torch.randn(c.grid * c.grid, c.token_dim) * 0.02)
        self.out_norm = nn.LayerNorm(c.token_dim)
        self.null_tokens = nn.Parameter(torch.zeros(c.tokens_per_identity, c.token_dim))

    @property
    def tokens_per_identity(self) -> int:
        return self.config.tokens_per_identity

    def forward(self, global_embedding: torch.Tensor, local_map: torch.Tensor) -> torch.Tensor:
        """``(B, D_g)``, ``(B, D_l, L, L)`` → ``(B, 1 + L², D)``."""
        c = self.config
        if global_embedding.ndim != 2 or global_embedding.shape[1] != c.global_dim:
            raise EmbeddingError(f"global embedding: expected (batch, {c.global_dim}), got "
                                 f"{tuple(global_embedding.shape)}")
        if local_map.shape[1:] != (c.local_dim, c.grid, c.grid):
            raise EmbeddingError(f"local feature map: expected (batch, {c.local_dim}, {c.grid}, {c.grid}), got "
                                 f"{tuple(local_map.shape)}; was it made with a different face pack?")
        g = self.global_proj(global_embedding).unsqueeze(1)
        local = local_map.flatten(2).transpose(1, 2)
        local = self.local_proj(self.local_norm(local)) + self.local_pos
        return self.out_norm(torch.cat([g, local], dim=1))

    def null(self, count: int = 1) -> torch.Tensor:
        """``(count, 1 + L², D)`` null-identity tokens."""
        return self.null_tokens.unsqueeze(0).expand(count, -1, -1)

    def project(self, identities: Sequence[IdentityFeatures]) -> torch.Tensor:
        """Tokens of each identity in order: ``(N, 1 + L², D)`` on the projector's device and dtype."""
        p = next(self.parameters())
        if not identities:
            return p.new_zeros((0, self.tokens_per_identity, self.config.token_dim))
        c = self.config
        for i in identities:
            if tuple(i.global_embedding.shape) != (c.global_dim,) or tuple(i.local_map.shape) != (
                    c.local_dim, c.grid, c.grid):
                raise EmbeddingError(f"{i.name}: features {tuple(i.global_embedding.shape)} + "
                                     f"{tuple(i.local_map.shape)} do not fit this checkpoint's projector (expects "
                                     f"({c.global_dim},) + ({c.local_dim}, {c.grid}, {c.grid})); encode the identity "
                                     "with the face pack the checkpoint was trained with")
        g = torch.stack([i.global_embedding for i in identities]).to(p.device, p.dtype)
        loc = torch.stack([i.local_map for i in identities]).to(p.device, p.dtype)
        return self.forward(g, loc)
