"""The InstantFamily checkpoint: one ``.safetensors`` file with the projector and the ControlNet.

Schema version 1
----------------
Tensors
    ``projector.<name>`` — :class:`IdentityProjector` state dict.
    ``controlnet.<name>`` — the pose ControlNet, in the layout named by ``controlnet_layout``: ``diffusers``
    (``ControlNetModel`` keys, what the training CLI writes) or ``ldm`` (``input_blocks.*``, ``zero_convs.*``,
    ``input_hint_block.*``, ``middle_block_out.*``). ComfyUI's ControlNet loader reads both.
Metadata (all strings)
    ``format`` = ``instantfamily``; ``schema_version`` = ``1``; ``base_model`` = ``sd15``; ``face_pack`` (e.g.
    ``antelopev2``); ``projector_config`` (JSON of :class:`ProjectorConfig`: global_dim, local_dim, grid,
    token_dim, hidden_dim); ``mask_mode`` (``additive`` | ``paper``, what it was trained with);
    ``controlnet_layout``; ``controlnet_config`` (JSON, optional: the diffusers ControlNet config);
    ``max_identities`` (slots used in training); ``slot_palette`` (``v1`` = :mod:`render` palette).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from .attention import MODES
from .errors import CheckpointError
from .fileio import save_safetensors_atomic
from .projector import IdentityProjector, ProjectorConfig

FORMAT = "instantfamily"
SCHEMA_VERSION = 1
BASE_MODEL = "sd15"
CONTROLNET_LAYOUTS = ("diffusers", "ldm")
CONTROLNET_HINT_CHANNELS = (16, 32, 96, 256)
"""Channels of the ControlNet hint encoder (cldm's ``input_hint_block``, diffusers' ``conditioning_embedding_out_channels``):
the only ones ComfyUI's ControlNet builds, so the only ones a checkpoint may carry."""
SLOT_PALETTE_VERSION = "v1"
PROJECTOR_LIMITS = {"global_dim": 8192, "local_dim": 8192, "grid": 64, "token_dim": 8192, "hidden_dim": 16384}
"""Upper bounds of the projector sizes a checkpoint may declare (a bad header never allocates gigabytes)."""


@dataclass(frozen=True)
class CheckpointMeta:
    face_pack: str
    projector: ProjectorConfig
    mask_mode: str = "additive"
    controlnet_layout: str = "diffusers"
    controlnet_config: Optional[dict] = None
    max_identities: int = 4
    base_model: str = BASE_MODEL
    extra: dict = field(default_factory=dict)

    def to_strings(self) -> dict[str, str]:
        out = {k: str(v) for k, v in self.extra.items()}
        out.update({
            "format": FORMAT, "schema_version": str(SCHEMA_VERSION), "base_model": self.base_model,
            "face_pack": self.face_pack, "projector_config": json.dumps(self.projector.to_dict(), sort_keys=True),
            "mask_mode": self.mask_mode, "controlnet_layout": self.controlnet_layout,
            "max_identities": str(self.max_identities), "slot_palette": SLOT_PALETTE_VERSION,
        })
        if self.controlnet_config is not None:
            out["controlnet_config"] = json.dumps(self.controlnet_config, sort_keys=True)
        return out


@dataclass
class InstantFamilyCheckpoint:
    meta: CheckpointMeta
    projector: IdentityProjector
    controlnet: dict[str, torch.Tensor]


def save_checkpoint(path: str, projector: IdentityProjector, controlnet: dict[str, torch.Tensor],
                    meta: CheckpointMeta) -> None:
    """Write the checkpoint atomically (a temp file in the same folder, then ``os.replace``)."""
    if meta.projector != projector.config:
        raise CheckpointError(f"checkpoint: metadata projector config {meta.projector} does not match the "
                              f"projector's {projector.config}")
    if not controlnet:
        raise CheckpointError("checkpoint: the ControlNet state dict is empty")
    tensors = {f"projector.{k}": v.detach().contiguous().cpu() for k, v in projector.state_dict().items()}
    tensors.update({f"controlnet.{k}": v.detach().contiguous().cpu() for k, v in controlnet.items()})
    save_safetensors_atomic(tensors, path, meta.to_strings())


def _parse_meta(md: dict, name: str) -> CheckpointMeta:
    if md.get("format") != FORMAT:
        raise CheckpointError(f"{name}: not an InstantFamily checkpoint (metadata 'format' is "
                              f"{md.get('format')!r}, expected {FORMAT!r})")
    if md.get("schema_version") != str(SCHEMA_VERSION):
        raise CheckpointError(f"{name}: schema version {md.get('schema_version')!r} is not supported; this "
                              f"version of the pack reads schema {SCHEMA_VERSION}")
    if md.get("base_model") != BASE_MODEL:
        raise CheckpointError(f"{name}: made for base model {md.get('base_model')!r}; InstantFamily here "
                              f"supports {BASE_MODEL!r} (Stable Diffusion 1.5)")
    try:
        pc = ProjectorConfig(**json.loads(md["projector_config"]))
        cn_cfg = json.loads(md["controlnet_config"]) if "controlnet_config" in md else None
        max_ids = int(md.get("max_identities", "4"))
    except (KeyError, TypeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{name}: malformed metadata ({type(e).__name__}: {e})") from None
    for fld, top in PROJECTOR_LIMITS.items():
        v = getattr(pc, fld)
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= top:
            raise CheckpointError(f"{name}: projector_config.{fld} must be an integer in 1…{top}, got {v!r}")
    if cn_cfg is not None and not isinstance(cn_cfg, dict):
        raise CheckpointError(f"{name}: controlnet_config must be a JSON object, got {type(cn_cfg).__name__}")
    if not 1 <= max_ids <= 64:
        raise CheckpointError(f"{name}: max_identities must be between 1 and 64, got {max_ids}")
    mode, layout = md.get("mask_mode", "additive"), md.get("controlnet_layout")
    if mode not in MODES:
        raise CheckpointError(f"{name}: mask_mode {mode!r} unknown; expected one of {MODES}")
    if layout not in CONTROLNET_LAYOUTS:
        raise CheckpointError(f"{name}: controlnet_layout {layout!r} unknown; expected one of {CONTROLNET_LAYOUTS}")
    known = {"format", "schema_version", "base_model", "face_pack", "projector_config", "mask_mode",
             "controlnet_layout", "controlnet_config", "max_identities", "slot_palette"}
    return CheckpointMeta(face_pack=md.get("face_pack", ""), projector=pc, mask_mode=mode,
                          controlnet_layout=layout, controlnet_config=cn_cfg, max_identities=max_ids,
                          extra={k: v for k, v in md.items() if k not in known})


def read_metadata(path: str) -> CheckpointMeta:
    """Validate and return a checkpoint's metadata without loading its tensors."""
    from safetensors import safe_open
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{name}: file not found at {path}")
    try:
        with safe_open(path, framework="pt") as f:
            md = f.metadata() or {}
    except Exception as e:  # safetensors raises several types for corrupt files
        raise CheckpointError(f"{name}: not a readable .safetensors file ({e})") from None
    return _parse_meta(md, name)


def load_checkpoint(path: str, device: str | torch.device = "cpu") -> InstantFamilyCheckpoint:
    """Load and validate a checkpoint: metadata, projector keys and shapes, a non-empty ControlNet."""
    from safetensors.torch import load_file
    name = os.path.basename(path)
    meta = read_metadata(path)
    try:
        tensors = load_file(path, device=str(device))
    except Exception as e:
        raise CheckpointError(f"{name}: cannot read tensors ({e})") from None
    proj_sd = {k[len("projector."):]: v for k, v in tensors.items() if k.startswith("projector.")}
    cn_sd = {k[len("controlnet."):]: v for k, v in tensors.items() if k.startswith("controlnet.")}
    other = sorted(k for k in tensors if not k.startswith(("projector.", "controlnet.")))
    if other:
        raise CheckpointError(f"{name}: unexpected tensors outside 'projector.' and 'controlnet.': {other[:5]}")
    if not cn_sd:
        raise CheckpointError(f"{name}: no ControlNet weights ('controlnet.*' tensors) in the file")
    projector = IdentityProjector(meta.projector)
    expected = projector.state_dict()
    missing = sorted(set(expected) - set(proj_sd))
    unexpected = sorted(set(proj_sd) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{name}: projector keys do not match the schema (missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]})")
    bad = [f"{k}: {tuple(proj_sd[k].shape)} ≠ {tuple(v.shape)}" for k, v in expected.items()
           if proj_sd[k].shape != v.shape]
    if bad:
        raise CheckpointError(f"{name}: projector tensor shapes do not match its config: {bad[:3]}")
    projector.load_state_dict(proj_sd)
    return InstantFamilyCheckpoint(meta, projector.to(device).eval(), cn_sd)
