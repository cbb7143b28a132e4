"""Public-weights mode: the published SD1.5 and SDXL IP-Adapter-FaceID files for N masked people in one pass.

Loader (``models/ipadapter``, merged with extra_model_paths) → Apply (identities from Encode Identity, masks from
Pose to Masks) → a patched MODEL; the pose goes to the stock ``ControlNetLoader`` + ``ControlNetApplyAdvanced``
with a public OpenPose ControlNet (SD1.5: ``control_v11p_sd15_openpose``; SDXL: thibaud ``OpenPoseXL2`` or xinsir
``controlnet-openpose-sdxl-1.0``). The FaceID LoRA is applied to the UNet only, never to a ControlNet. The file's
base (SD1.5/SDXL) must be the model's: the model's cross-attention topology is read from its live modules and
compared with the file's.
"""

from __future__ import annotations

import logging
import os

import folder_paths
import torch
from comfy.model_management import throw_exception_if_processing_interrupted
from comfy.utils import ProgressBar

from instantfamily_core.errors import EmbeddingError, ModelFileError
from instantfamily_core.faceid import (PLUS_VERSIONS, FaceIDProjection, FaceIDWeights, load_faceid, pad_people,
                                       person_tokens)
from instantfamily_core.faceid.files import EXTENSIONS, FaceIDFileError
from instantfamily_core.identity import is_skipped, skipped_slots

from . import paths
from .face_nodes import CATEGORY, IDENTITIES
from .faceid_patch import FaceIDRule, check_topology, install_faceid
from .file_cache import FileCache
from .model_nodes import check_apply_inputs, check_base

logger = logging.getLogger("InstantFamily")

IPADAPTER = "ipadapter"
FACEID = "INSTANTFAMILY_FACEID"
EMBEDDED_LORA = "embedded (from the adapter file)"
NO_LORA = "none"
RECOMMENDED_PACK = "buffalo_l"
LICENCE = ("Licence: the IP-Adapter-FaceID weights are for research only, not for commercial use (h94/"
           "IP-Adapter-FaceID), and so are insightface's face-model packs (buffalo_l, antelopev2).")

paths._register(IPADAPTER, os.path.join(folder_paths.models_dir, "ipadapter"), set(EXTENSIONS))


class FaceIDModel:
    """A loaded FaceID file: validated weights, the projection model, and the LoRA to apply (or none)."""

    def __init__(self, weights: FaceIDWeights, lora: dict, lora_name: str):
        self.weights = weights
        self.projection = FaceIDProjection.from_weights(weights)
        self.lora = lora
        self.lora_name = lora_name

    @property
    def name(self) -> str:
        return self.weights.name


_LOADED = FileCache(2)


def _lora_files() -> list[str]:
    try:
        return folder_paths.get_filename_list("loras")
    except Exception:  # a host without a loras folder
        return []


def load_faceid_model(path: str, plus_version: str, lora_choice: str, lora_path: str | None = None) -> FaceIDModel:
    """Load a FaceID file and its LoRA, cached (see :class:`.file_cache.FileCache`)."""
    def load():
        weights = load_faceid(path, plus_version)
        if lora_choice == EMBEDDED_LORA:
            lora = weights.lora_state_dict()
            if not lora and weights.variant != "portrait":
                raise FaceIDFileError(f"{weights.name}: has no embedded LoRA; choose its companion "
                                      f"{os.path.splitext(weights.name)[0]}_lora.safetensors as 'lora'")
        elif lora_choice == NO_LORA:
            lora = {}
        else:
            import comfy.utils
            if not lora_path or not os.path.isfile(lora_path):
                raise ModelFileError(f"lora: {lora_choice!r} not found in models/loras")
            lora = comfy.utils.load_torch_file(lora_path, safe_load=True)
        if weights.variant == "portrait" and lora:
            logger.warning("%s: FaceID-Portrait was trained without a LoRA; the LoRA %s is applied anyway",
                           weights.name, lora_choice)
        if not lora and weights.variant != "portrait":
            logger.warning("%s: FaceID/Plus were trained with their LoRA at strength 1.0; running without it",
                           weights.name)
        return FaceIDModel(weights, lora, "" if not lora else lora_choice)
    return _LOADED.get(path, (plus_version, lora_choice), load)


class FaceIDLoader:
    DESCRIPTION = ("Loads a published IP-Adapter-FaceID file (SD1.5 or SDXL) from models/ipadapter: "
                   "ip-adapter-faceid_sd15.bin / _sdxl.bin (FaceID), ip-adapter-faceid-plusv2_sd15.bin / "
                   "_sdxl.bin / -plus_sd15.bin (Plus v2 / v1, need a CLIP ViT-H vision model), "
                   "ip-adapter-faceid-portrait(-v11)_sd15.bin / -portrait_sdxl.bin (Portrait: 16 tokens per "
                   "reference photo, up to 5). .bin files are read tensors-only; flat .safetensors with image_proj./"
                   "ip_adapter. keys work too. Non-FaceID IP-Adapters are refused. " + LICENCE)
    CATEGORY = CATEGORY
    RETURN_TYPES = (FACEID,)
    RETURN_NAMES = ("faceid",)
    OUTPUT_TOOLTIPS = ("the FaceID projection, attention weights and LoRA; connect to Apply InstantFamily FaceID",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "ipadapter_file": (folder_paths.get_filename_list(IPADAPTER),
                               {"tooltip": "an IP-Adapter-FaceID file (SD1.5 or SDXL) in models/ipadapter"}),
            "plus_version": (list(PLUS_VERSIONS), {"default": PLUS_VERSIONS[0], "tooltip": (
                "FaceID Plus v1 and v2 files have identical keys; v2 adds the ID tokens back "
                "(x + s_scale·perceiver). auto: v2 when the file name contains 'plusv2'")}),
            "lora": ([EMBEDDED_LORA, NO_LORA] + _lora_files(), {"default": EMBEDDED_LORA, "tooltip": (
                "the FaceID LoRA (rank 128, every attention of the UNet): the one inside the .bin, none, or "
                "the companion *_lora.safetensors from models/loras")}),
        }}

    def load(self, ipadapter_file, plus_version, lora):
        path = folder_paths.get_full_path_or_raise(IPADAPTER, ipadapter_file)
        lora_path = None
        if lora not in (EMBEDDED_LORA, NO_LORA):
            lora_path = folder_paths.get_full_path("loras", lora)
        return (load_faceid_model(path, plus_version, lora, lora_path),)


def apply_lora(model, lora: dict, strength: float, name: str):
    """A clone of ``model`` with ``lora`` on its UNet through ComfyUI's own key map and loader (as its LoRA loaders
    do; never on a ControlNet). Every LoRA module of the file must land on a UNet weight: a key ComfyUI cannot map
    is an error, not a silently weaker identity."""
    import comfy.lora
    import comfy.lora_convert
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    lora = comfy.lora_convert.convert_lora(lora)
    loaded = comfy.lora.load_lora(lora, key_map, log_missing=False)
    modules = [k for k in lora if k.endswith("down.weight")]
    if len(loaded) < len(modules):
        mapped = {k for k in key_map}
        lost = [k for k in modules if not any(k.startswith(m + ".") for m in mapped)]
        raise ModelFileError(f"lora: {name}: ComfyUI maps {len(loaded)} of its {len(modules)} LoRA modules onto "
                             f"this model (not e.g. {lost[:2]}); it is not a LoRA for this model's UNet")
    patched = model.clone()
    patched.add_patches(loaded, strength)
    return patched


def _clip_hidden(clip_vision, crops: list) -> torch.Tensor:
    """CLIP ViT-H penultimate hidden states ``(k, 257, 1280)`` of RGB 224 crops (ComfyUI's clip_preprocess = the
    reference CLIPImageProcessor on a 224 image: rescale, normalise)."""
    images = torch.stack([torch.from_numpy(c.copy()).float() / 255.0 for c in crops])
    return clip_vision.encode_image(images).penultimate_hidden_states.float().cpu()


def _clip_zero(clip_vision) -> torch.Tensor:
    """Hidden states of an all-zero *normalised* pixel tensor (the reference's uncond input, not a black image)."""
    import comfy.model_management as mm
    mm.load_model_gpu(clip_vision.patcher)
    size = int(getattr(clip_vision, "image_size", 224))
    pixels = torch.zeros(1, 3, size, size, device=clip_vision.load_device)
    out = clip_vision.model(pixel_values=pixels, intermediate_output=-2)
    return out[1].float().cpu()


class ApplyFaceID:
    DESCRIPTION = ("Public-weights mode: N identities in one SD1.5 or SDXL generation with an IP-Adapter-FaceID "
                   "file of the model's base. In every cross-attention of the UNet (SD1.5: 16, SDXL: 70, middle "
                   "block included) each person's FaceID tokens act "
                   "only inside their face mask: out = text attention + Σ_n w_n·m_n·softmax(Q·K_nᵀ/√d)·V_n. The "
                   "FaceID LoRA is applied to the UNet through ComfyUI's LoRA loader (it stacks with other "
                   "LoRAs). Pose: use the stock ControlNetApplyAdvanced with an OpenPose ControlNet (SD1.5: "
                   "control_v11p_sd15_openpose; SDXL: OpenPoseXL2 or xinsir openpose) and the skeleton-only pose "
                   "image. " + LICENCE + " Identities should be encoded with the buffalo_l "
                   "pack (the one FaceID was trained with).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("a patched copy of the model (FaceID LoRA + masked FaceID attention); connect to the "
                       "KSampler",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "an SD1.5 or SDXL model (the FaceID file's base)"}),
            "faceid": (FACEID, {"tooltip": "from InstantFamily FaceID Loader"}),
            "identities": (IDENTITIES, {"tooltip": "from Encode Identity (buffalo_l pack); list order = slot order"}),
            "masks": ("MASK", {"tooltip": "one face mask per identity, from Pose to Masks"}),
            "weight": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 5.0, "step": 0.05,
                                 "tooltip": "identity scale (the reference's set_scale; 1.0 = as trained)"}),
            "identity_weights": ("STRING", {"default": "", "tooltip": "per identity, e.g. '1.0, 0.8'; empty = 1"}),
            "lora_strength": ("FLOAT", {"default": 1.0, "min": -2.0, "max": 2.0, "step": 0.05, "tooltip": (
                "strength of the FaceID LoRA on the UNet (trained at 1.0); never applied to ControlNets")}),
            "start_at": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": (
                "fraction of the sampling at which the identities start acting (0 = first step)")}),
            "end_at": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": (
                "fraction of the sampling at which they stop acting (1 = last step)")}),
            "s_scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 5.0, "step": 0.05, "tooltip": (
                "Plus v2 only: weight of the CLIP (perceiver) part, x + s_scale·perceiver")}),
        }, "optional": {
            "clip_vision": ("CLIP_VISION", {"tooltip": "CLIP ViT-H-14 (laion2B) vision model; needed by Plus"}),
        }}

    def apply(self, model, faceid, identities, masks, weight, identity_weights, lora_strength, start_at, end_at,
              s_scale, clip_vision=None):
        check_base(model, ("SD15", "SDXL"), "InstantFamily FaceID")
        topology = check_topology(model, faceid.weights)
        n, masks, weights = check_apply_inputs(identities, masks, weight, identity_weights, start_at, end_at)
        variant = faceid.weights.variant
        # a skipped identity (on_no_face = skip) keeps its slot but acts nowhere: empty mask, weight 0
        skipped = skipped_slots(identities)
        if skipped:
            masks = masks.clone()
            masks[skipped] = 0.0
            for s in skipped:
                weights[s] = 0.0
            logger.warning("InstantFamily FaceID: identities %s were skipped (no face); their slots get no identity",
                           [f"{s + 1} ({identities[s].name})" for s in skipped])
        packs = {i.face_pack for i in identities if not is_skipped(i)} - {""}
        if packs - {RECOMMENDED_PACK}:
            logger.warning("InstantFamily FaceID: identities were encoded with %s; the FaceID weights were trained "
                           "on %s embeddings, so identity fidelity may suffer", sorted(packs), RECOMMENDED_PACK)
        if faceid.weights.is_plus and clip_vision is None:
            raise EmbeddingError(f"clip_vision: {faceid.name} is FaceID Plus ({variant}); connect a CLIP Vision "
                                 "loader with the ViT-H model (CLIP-ViT-H-14-laion2B-s32B-b79K)")
        bar = ProgressBar(n)
        zero = _clip_zero(clip_vision) if faceid.weights.is_plus else None
        tokens, uncond = [], []
        for ident in identities:
            throw_exception_if_processing_interrupted()
            if is_skipped(ident):
                tokens.append(None)
                uncond.append(None)
                bar.update(1)
                continue
            embeds = torch.stack([torch.as_tensor(e).float() for e in ident.extra.get("faceid_embeddings", [])]) \
                if ident.extra.get("faceid_embeddings") else ident.global_embedding[None].float()
            clip = None
            if faceid.weights.is_plus:
                crops = ident.extra.get("faceid_crops")
                if not crops:
                    raise EmbeddingError(f"{ident.name}: FaceID Plus needs the aligned face crop, which saved "
                                         "identities do not keep; encode this person with Encode Identity")
                clip = torch.cat([_clip_hidden(clip_vision, crops).mean(0, keepdim=True), zero])
            t, u = person_tokens(faceid.projection, variant, ident.name, embeds, clip, s_scale)
            tokens.append(t)
            uncond.append(u)
            bar.update(1)
        real = [t for t in tokens if t is not None]
        if real:  # skipped slots: zero tokens, never seen (weight 0, empty mask)
            tokens = [t if t is not None else torch.zeros_like(real[0]) for t in tokens]
            uncond = [u if u is not None else torch.zeros_like(real[0]) for u in uncond]
            tokens, uncond, valid = pad_people(tokens, uncond)
        sampling = model.get_model_object("model_sampling")
        sigma_range = (float(sampling.percent_to_sigma(start_at)), float(sampling.percent_to_sigma(end_at)))
        if faceid.lora and lora_strength != 0:
            patched = apply_lora(model, faceid.lora, lora_strength, faceid.lora_name)
        else:
            patched = model.clone()
        if not real:
            logger.warning("InstantFamily FaceID: every identity was skipped; only the LoRA is applied")
            return (patched,)
        rule = FaceIDRule(faceid.weights, tokens, uncond, masks, weights, valid, sigma_range, topology)
        return (install_faceid(patched, rule, sigma_range),)
