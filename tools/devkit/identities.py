"""Random but valid identities (512-d unit global embedding, 512×7×7 local map) for tests and benchmarks."""

from __future__ import annotations

import torch

from instantfamily_core.identity import IdentityFeatures


def random_identities(n: int, seed: int = 0, face_pack: str = "") -> list[IdentityFeatures]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        e = torch.randn(512, generator=g)
        out.append(IdentityFeatures(e / e.norm(), torch.randn(512, 7, 7, generator=g), name=f"p{i}",
                                    face_pack=face_pack))
    return out
