"""InstantFamily checkpoint loader and the apply node."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import folder_paths
import torch

from instantfamily_core.attention import MODES, MaskedCrossAttention
from instantfamily_core.checkpoint import CheckpointMeta, load_checkpoint
from instantfamily_core.errors import BaseModelError, IdentityCountError, OptionError
from instantfamily_core.identity import is_skipped, skipped_slots
from instantfamily_core.projector import IdentityProjector

from . import paths
from .controlnet import InstantFamilyControlNet, build_controlnet
from .convert import parse_weights
from .face_nodes import CATEGORY, IDENTITIES
from .file_cache import FileCache
from .patch import BASES, InstantFamilyAttention, patch_model
from .pose_nodes import check_masks

logger = logging.getLogger(__name__)
INSTANTFAMILY = "INSTANTFAMILY"


@dataclass
class InstantFamilyModel:
    projector: IdentityProjector
    controlnet: InstantFamilyControlNet
    meta: CheckpointMeta
    name: str = ""


LOADED_CACHE_SIZE = 2
"""How many InstantFamily checkpoints stay loaded here (least recently used first out)."""

_LOADED = FileCache(LOADED_CACHE_SIZE)


def load_instantfamily(path: str) -> InstantFamilyModel:
    """Load an InstantFamily checkpoint for ComfyUI, cached (see :class:`.file_cache.FileCache`)."""
    def load():
        ck = load_checkpoint(path)
        name = os.path.basename(path)
        cn = build_controlnet(ck.controlnet, ck.meta.controlnet_layout, ck.meta.controlnet_config, name)
        return InstantFamilyModel(ck.projector, cn, ck.meta, name)
    return _LOADED.get(path, (), load)


def loaded_cache_info() -> list[str]:
    """Paths of the checkpoints held by the loader cache, least recently used first (for tests and debugging)."""
    return _LOADED.paths()


def check_apply_inputs(identities, masks, weight: float, identity_weights: str, start_at: float, end_at: float):
    """What both apply nodes check first: at least one identity, start before end, one mask per identity, the
    weights. Returns ``(n, masks, weights)`` with each identity's weight times the global one."""
    n = len(identities or [])
    if n == 0:
        raise IdentityCountError("identities: the list is empty; encode at least one identity")
    if start_at > end_at:
        raise OptionError(f"start_at ({start_at}) must not be after end_at ({end_at})")
    return n, check_masks(masks, n), [weight * w for w in parse_weights(identity_weights, n)]


class InstantFamilyLoader:
    DESCRIPTION = "Loads an InstantFamily checkpoint (projector + pose ControlNet) from models/instantfamily/."
    CATEGORY = CATEGORY
    RETURN_TYPES = (INSTANTFAMILY,)
    OUTPUT_TOOLTIPS = ("the identity projector and the pose ControlNet; connect to Apply InstantFamily",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"checkpoint": (folder_paths.get_filename_list(paths.CHECKPOINTS_FOLDER), {
            "tooltip": "an InstantFamily checkpoint in models/instantfamily/"})}}

    def load(self, checkpoint):
        return (load_instantfamily(folder_paths.get_full_path_or_raise(paths.CHECKPOINTS_FOLDER, checkpoint)),)


def check_base(model, bases=("SD15",), who: str = "InstantFamily") -> str:
    """The base of ``model`` among ``bases`` (a config class or a subclass of it), else a BaseModelError that
    names what was given and what is needed."""
    import comfy.supported_models
    config = getattr(getattr(model, "model", None), "model_config", None)
    for base in bases:
        if config is not None and isinstance(config, getattr(comfy.supported_models, base)):
            return base
    got = type(config).__name__ if config is not None else type(model).__name__
    raise BaseModelError(f"model: {who} needs a {' or '.join(BASES[b][0] for b in bases)} model, got {got}; load "
                         f"{'an' if bases[0] == 'SD15' else 'a'} {' or '.join(BASES[b][1] for b in bases)} checkpoint")


def check_sd15(model) -> None:
    check_base(model, ("SD15",))


def attach_controlnet(conditioning, controlnet: InstantFamilyControlNet, hint, strength, percent_range, cache):
    """``conditioning`` with the InstantFamily ControlNet chained after any ControlNet it already had."""
    out = []
    for tokens, options in conditioning:
        d = options.copy()
        prev = d.get("control", None)
        if prev not in cache:
            c = controlnet.copy().set_cond_hint(hint, strength, percent_range)
            c.set_previous_controlnet(prev)
            cache[prev] = c
        d["control"] = cache[prev]
        d["control_apply_to_uncond"] = False
        out.append([tokens, d])
    return out


class ApplyInstantFamily:
    DESCRIPTION = ("Puts N identities into one SD1.5 generation: identity tokens are stacked after the text in "
                   "every cross-attention of the UNet and of the InstantFamily ControlNet, each identity masked to "
                   "its face region. Returns a patched copy of the model and the conditionings with the ControlNet.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("model", "positive", "negative")
    OUTPUT_TOOLTIPS = ("a patched copy of the model (masked identity attention); connect to the KSampler",
                       "the positive conditioning with the InstantFamily ControlNet attached",
                       "the negative conditioning with the InstantFamily ControlNet attached")
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "an SD1.5 model"}),
            "instantfamily": (INSTANTFAMILY, {"tooltip": "from InstantFamily Loader"}),
            "identities": (IDENTITIES, {"tooltip": "from Encode/Combine Identities; list order = slot order"}),
            "pose_image": ("IMAGE", {"tooltip": "the pose_image output of Pose to Masks (slot circles style)"}),
            "masks": ("MASK", {"tooltip": "the masks output of Pose to Masks: one face mask per identity"}),
            "positive": ("CONDITIONING", {"tooltip": "the positive prompt"}),
            "negative": ("CONDITIONING", {"tooltip": "the negative prompt"}),
            "weight": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 5.0, "step": 0.05, "tooltip": (
                "strength of every identity (multiplies identity_weights); 1.0 = as trained")}),
            "identity_weights": ("STRING", {"default": "", "tooltip": "per identity, e.g. '1.0, 0.8'; empty = 1"}),
            "controlnet_strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 2.0, "step": 0.05, "tooltip": (
                "strength of the pose ControlNet; 0 = no ControlNet (identity attention only)")}),
            "start_at": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": (
                "fraction of the sampling at which identities and ControlNet start acting (0 = first step)")}),
            "end_at": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": (
                "fraction of the sampling at which they stop acting (1 = last step)")}),
            "mask_mode": (["checkpoint"] + list(MODES), {"default": "checkpoint",
                                                         "tooltip": "checkpoint = the mode it was trained with"}),
        }}

    def apply(self, model, instantfamily, identities, pose_image, masks, positive, negative, weight,
              identity_weights, controlnet_strength, start_at, end_at, mask_mode):
        check_sd15(model)
        n, masks, weights = check_apply_inputs(identities, masks, weight, identity_weights, start_at, end_at)
        # A skipped identity (on_no_face = skip) keeps its slot but acts nowhere: weight 0 and an empty mask
        # exclude its keys in either mask mode; its tokens are the null tokens, never attended.
        skipped = skipped_slots(identities)
        if skipped:
            masks = masks.clone()
            masks[..., skipped, :, :] = 0.0
            for s in skipped:
                weights[s] = 0.0
            logger.warning("InstantFamily: identities %s were skipped (no face); their slots get no identity",
                           [f"{s + 1} ({identities[s].name})" for s in skipped])
        real = [i for i in identities if not is_skipped(i)]
        packs = {i.face_pack for i in real} - {""}
        if packs and instantfamily.meta.face_pack and packs != {instantfamily.meta.face_pack}:
            logger.warning("identities were encoded with %s but %s was trained with %s", sorted(packs),
                           instantfamily.name, instantfamily.meta.face_pack)
        with torch.no_grad():
            null = instantfamily.projector.null_tokens.detach().float().cpu()
            tokens = null.unsqueeze(0).repeat(n, 1, 1)
            if real:
                tokens[[s for s in range(n) if s not in skipped]] = \
                    instantfamily.projector.project(real).float().cpu()
        mode = instantfamily.meta.mask_mode if mask_mode == "checkpoint" else mask_mode
        attention = MaskedCrossAttention(masks, tokens.shape[1], weights, mode)
        sampling = model.get_model_object("model_sampling")
        sigma_range = (float(sampling.percent_to_sigma(start_at)), float(sampling.percent_to_sigma(end_at)))
        state = InstantFamilyAttention(tokens, null, attention, sigma_range)
        patched = patch_model(model, state)
        if controlnet_strength == 0:
            return (patched, positive, negative)
        cn = instantfamily.controlnet.copy()
        cn.instantfamily = state
        hint = pose_image[..., :3].movedim(-1, 1)
        cache = {}
        return (patched,
                attach_controlnet(positive, cn, hint, controlnet_strength, (start_at, end_at), cache),
                attach_controlnet(negative, cn, hint, controlnet_strength, (start_at, end_at), cache))
