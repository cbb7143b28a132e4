"""One identity's face features: the global embedding and the local feature map.

This is the value that flows from face analysis (``faces``) to the projector (``projector``), between ComfyUI nodes
(the ``INSTANTFAMILY_IDENTITY`` type) and into the training shards. It validates itself on construction so that a
NaN or all-zero embedding fails where it was made, not ten layers later.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from .errors import EmbeddingError


def _check_finite_nonzero(name: str, what: str, t: torch.Tensor) -> None:
    if not torch.isfinite(t).all():
        raise EmbeddingError(f"{name}: the {what} contains NaN or infinite values; re-encode the reference image(s)")
    if float(t.abs().max()) == 0.0:
        raise EmbeddingError(f"{name}: the {what} is all zeros; expected features of a detected face")


@dataclass(frozen=True)
class IdentityFeatures:
    """Features of one person.

    ``global_embedding``: shape ``(D_g,)``, L2-normalised (512 for insightface ArcFace packs).
    ``local_map``: shape ``(D_l, L, L)``, the recognizer's last spatial feature map (512×7×7 for IResNet packs).
    ``name``: a label used in messages and previews. ``num_images``: how many reference images were averaged.
    """

    global_embedding: torch.Tensor
    local_map: torch.Tensor
    name: str = "identity"
    num_images: int = 1
    face_pack: str = ""
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        g, loc = self.global_embedding, self.local_map
        if not isinstance(g, torch.Tensor) or g.ndim != 1:
            raise EmbeddingError(f"{self.name}: global embedding must be a 1-D tensor, got "
                                 f"{tuple(getattr(g, 'shape', ()))}")
        if not isinstance(loc, torch.Tensor) or loc.ndim != 3 or loc.shape[1] != loc.shape[2]:
            raise EmbeddingError(f"{self.name}: local feature map must be a (C, L, L) tensor, got "
                                 f"{tuple(getattr(loc, 'shape', ()))}")
        _check_finite_nonzero(self.name, "global embedding", g)
        _check_finite_nonzero(self.name, "local feature map", loc)

    @property
    def grid(self) -> int:
        """L, the side of the local feature map."""
        return int(self.local_map.shape[-1])

    @staticmethod
    def average(items: Sequence["IdentityFeatures"], name: str | None = None) -> "IdentityFeatures":
        """Average several encodings of one person: mean of the maps, mean of the globals re-normalised."""
        if not items:
            raise EmbeddingError(f"{name or 'identity'}: no encodings to average; give at least one reference image")
        shapes = {(tuple(i.global_embedding.shape), tuple(i.local_map.shape)) for i in items}
        if len(shapes) != 1:
            raise EmbeddingError(f"{name or items[0].name}: encodings have different shapes {sorted(shapes)}; "
                                 "were they made with different face packs?")
        weights = torch.tensor([float(i.num_images) for i in items])
        w = (weights / weights.sum()).float()
        g = sum(wi * i.global_embedding.float() for wi, i in zip(w, items))
        norm = g.norm()
        if not torch.isfinite(norm) or float(norm) == 0.0:
            raise EmbeddingError(f"{name or items[0].name}: the averaged global embedding is zero "
                                 "(opposite embeddings cancel); check the reference images are the same person")
        loc = sum(wi * i.local_map.float() for wi, i in zip(w, items))
        extra = {k: [x for i in items for x in i.extra[k]] for k in items[0].extra  # per-photo lists concatenate
                 if all(isinstance(i.extra.get(k), list) for i in items)}
        return IdentityFeatures(g / norm, loc, name=name or items[0].name, num_images=int(weights.sum()),
                                face_pack=items[0].face_pack, extra=extra)


@dataclass(frozen=True)
class SkippedIdentity:
    """A person whose reference images held no face (Encode Identity with ``on_no_face = skip``).

    It keeps its place in the identity list, so identity n stays bound to person n: Pose to Masks gives its slot
    no circle and an all-zero mask (its person keeps only the skeleton), and Apply gives it no tokens (weight 0,
    keys excluded). ``reason`` says why, for messages and the preview."""

    name: str = "identity"
    reason: str = "no face found"
    face_pack: str = ""
    num_images: int = 0


def is_skipped(identity) -> bool:
    return isinstance(identity, SkippedIdentity)


def skipped_slots(identities) -> list[int]:
    """Positions of :class:`SkippedIdentity` entries in an identity list."""
    return [n for n, i in enumerate(identities or []) if is_skipped(i)]


IDENTITY_FILE_FORMAT = "instantfamily-identities"


def save_identities(path: str, identities: Sequence[IdentityFeatures | SkippedIdentity]) -> None:
    """Write encoded identities to one ``.safetensors`` file (atomically) so they need not be re-encoded. A
    :class:`SkippedIdentity` is kept as a placeholder (name and reason, no tensors) so slots keep their places."""
    import json

    from .fileio import save_safetensors_atomic
    if not identities:
        raise EmbeddingError("identities: nothing to save; encode at least one identity")
    tensors, info = {}, []
    for i, ident in enumerate(identities):
        if is_skipped(ident):
            info.append({"name": ident.name, "skipped": True, "reason": ident.reason})
            continue
        tensors[f"identity.{i}.global"] = ident.global_embedding.detach().float().contiguous().cpu()
        tensors[f"identity.{i}.local"] = ident.local_map.detach().float().contiguous().cpu()
        info.append({"name": ident.name, "num_images": ident.num_images, "face_pack": ident.face_pack})
    save_safetensors_atomic(tensors, path, {"format": IDENTITY_FILE_FORMAT, "identities": json.dumps(info)})


def load_identities(path: str) -> list[IdentityFeatures | SkippedIdentity]:
    """Read a file written by :func:`save_identities`, validating every identity."""
    import json
    import os

    from safetensors import safe_open
    name = os.path.basename(path)
    try:
        with safe_open(path, framework="pt") as f:
            md = f.metadata() or {}
            if md.get("format") != IDENTITY_FILE_FORMAT:
                raise EmbeddingError(f"{name}: not an InstantFamily identities file (format "
                                     f"{md.get('format')!r})")
            info = json.loads(md["identities"])
            if not isinstance(info, list) or not info or not all(isinstance(d, dict) for d in info):
                raise EmbeddingError(f"{name}: the 'identities' metadata must be a non-empty list of entries "
                                     f"(name, num_images, face_pack), got {str(info)[:80]!r}")
            return [SkippedIdentity(d["name"], d.get("reason", "no face found")) if d.get("skipped") else
                    IdentityFeatures(f.get_tensor(f"identity.{i}.global"), f.get_tensor(f"identity.{i}.local"),
                                     name=d["name"], num_images=int(d["num_images"]), face_pack=d["face_pack"])
                    for i, d in enumerate(info)]
    except EmbeddingError as e:
        if str(e).startswith(name):
            raise
        raise EmbeddingError(f"{name}: {e}") from None
    except Exception as e:  # missing file, corrupt header, missing tensor
        raise EmbeddingError(f"{name}: cannot read identities ({type(e).__name__}: {e})") from None
