"""InstantID for N people in one pass (SDXL): the published ``ip-adapter.bin`` and IdentityNet, each person's
identity acting only inside their own region — in the UNet **and** in the IdentityNet.

Loader (``models/instantid``) → Apply (identities from Encode Identity with antelopev2, masks and the keypoint image
from Pose to Masks with ``control_image`` = InstantID, the IdentityNet from the stock Load ControlNet Model) → a
patched MODEL and conditionings carrying the IdentityNet:

* UNet: ``T_n = Resampler(e_n)`` (raw antelopev2 embedding, several photos averaged), unconditional tokens
  ``Resampler(0)`` (or with ``noise``), and in all 70 SDXL cross-attentions
  ``out += Σ_n w_n·m_n ⊙ softmax(q K_nᵀ/√d) V_n`` with the p-indexed ``to_k_ip``/``to_v_ip`` — the same additive rule
  as the FaceID mode (:class:`.faceid_patch.FaceIDRule`), one batched op;
* IdentityNet: one pass per step for all N people (:mod:`.identitynet`): context ``[T_1; …; T_N]``, token group n
  visible only inside region n, the keypoint image of all N faces as its hint, the UNet's ADM input.
"""

from __future__ import annotations

import logging
import os

import folder_paths
import torch
from comfy.model_management import throw_exception_if_processing_interrupted
from comfy.utils import ProgressBar

from instantfamily_core.errors import EmbeddingError
from instantfamily_core.identity import is_skipped, skipped_slots
from instantfamily_core.instantid import InstantIDResampler, InstantIDWeights, load_instantid
from instantfamily_core.instantid.files import EXTENSIONS

from . import paths
from .face_nodes import CATEGORY, IDENTITIES
from .faceid_patch import FaceIDRule, check_topology, install_faceid
from .file_cache import FileCache
from .identitynet import IdentityNetRule, identitynet_for
from .model_nodes import attach_controlnet, check_apply_inputs, check_base

logger = logging.getLogger("InstantFamily")

INSTANTID_FOLDER = "instantid"
INSTANTID = "INSTANTFAMILY_INSTANTID"
RECOMMENDED_PACK = "antelopev2"
LICENCE = ("Licence: InstantID's weights are Apache-2.0; the insightface antelopev2 face pack that encodes the "
           "identities is for non-commercial research only.")

paths._register(INSTANTID_FOLDER, os.path.join(folder_paths.models_dir, INSTANTID_FOLDER), set(EXTENSIONS))


class InstantIDModel:
    """A loaded ``ip-adapter.bin``: validated weights and the Resampler."""

    def __init__(self, weights: InstantIDWeights):
        self.weights = weights
        self.resampler = InstantIDResampler.from_weights(weights)

    @property
    def name(self) -> str:
        return self.weights.name


_LOADED = FileCache(2)


def load_instantid_model(path: str) -> InstantIDModel:
    return _LOADED.get(path, (), lambda: InstantIDModel(load_instantid(path)))


class InstantIDLoader:
    DESCRIPTION = ("Loads InstantID's ip-adapter.bin (InstantX/InstantID) from models/instantid: the Resampler "
                   "that turns a face embedding into 16 tokens and the to_k_ip/to_v_ip weights of SDXL's 70 "
                   "cross-attentions. Read tensors-only (weights_only); FaceID, SD1.5 and other adapters are refused "
                   "by name. The IdentityNet (ControlNetModel/diffusion_pytorch_model.safetensors) is loaded by the "
                   "stock Load ControlNet Model. " + LICENCE)
    CATEGORY = CATEGORY
    RETURN_TYPES = (INSTANTID,)
    RETURN_NAMES = ("instantid",)
    OUTPUT_TOOLTIPS = ("the InstantID Resampler and attention weights; connect to Apply InstantFamily InstantID",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"instantid_file": (folder_paths.get_filename_list(INSTANTID_FOLDER), {
            "tooltip": "InstantID's ip-adapter.bin in models/instantid"})}}

    def load(self, instantid_file):
        return (load_instantid_model(folder_paths.get_full_path_or_raise(INSTANTID_FOLDER, instantid_file)),)


def person_tokens(instantid: InstantIDModel, ident) -> torch.Tensor:
    """``(16, 2048)`` tokens of one identity from its per-photo raw embeddings."""
    raw = ident.extra.get("raw_embeddings")
    if not raw:
        raise EmbeddingError(f"{ident.name}: InstantID needs the raw face embedding, which saved identities and "
                             "identities from older versions do not keep; encode this person with Encode Identity "
                             f"(face pack {RECOMMENDED_PACK})")
    return instantid.resampler.tokens(raw, ident.name)


class ApplyInstantID:
    DESCRIPTION = ("InstantID for N people in one SDXL generation: each person's 16 InstantID tokens act only "
                   "inside their face mask, in all 70 cross-attentions of the UNet (middle block included) and in "
                   "the IdentityNet, which runs once per step for everybody (context: every person's tokens, each "
                   "group visible only in its region; hint: the keypoint image of all faces). Chain another "
                   "ControlNet (e.g. SDXL OpenPose) after it with Apply ControlNet: it still reads the text. "
                   + LICENCE)
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("model", "positive", "negative")
    OUTPUT_TOOLTIPS = ("a patched copy of the model (masked InstantID attention); connect to the KSampler",
                       "the positive conditioning with the IdentityNet", "the negative conditioning with the "
                       "IdentityNet (unconditional tokens)")
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "an SDXL model"}),
            "instantid": (INSTANTID, {"tooltip": "from InstantFamily InstantID Loader"}),
            "control_net": ("CONTROL_NET", {"tooltip": "InstantID's IdentityNet, from Load ControlNet Model"}),
            "identities": (IDENTITIES, {"tooltip": "from Encode Identity (antelopev2 pack); list order = slot order"}),
            "masks": ("MASK", {"tooltip": "one face mask per identity, from Pose to Masks"}),
            "kps_image": ("IMAGE", {"tooltip": "the keypoint image: Pose to Masks with control_image = InstantID"}),
            "positive": ("CONDITIONING", {"tooltip": "the positive prompt; the IdentityNet is added to it"}),
            "negative": ("CONDITIONING", {"tooltip": "the negative prompt; the IdentityNet is added to it with the "
                                                     "unconditional tokens"}),
            "ip_weight": ("FLOAT", {"default": 0.8, "min": 0.0, "max": 3.0, "step": 0.05, "tooltip": (
                "identity strength in the UNet (the reference's ip_adapter_scale; 0.8 as its published usage)")}),
            "cn_strength": ("FLOAT", {"default": 0.8, "min": 0.0, "max": 10.0, "step": 0.05, "tooltip": (
                "IdentityNet strength (the reference's controlnet_conditioning_scale; 0.8 as its published usage)")}),
            "identity_weights": ("STRING", {"default": "", "tooltip": "per identity, e.g. '1.0, 0.8'; empty = 1"}),
            "start_at": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": (
                "fraction of the sampling at which the identities start acting (UNet and IdentityNet)")}),
            "end_at": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": (
                "fraction of the sampling at which they stop acting")}),
            "noise": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip": (
                "0 = the reference's unconditional tokens Resampler(0); > 0 = Resampler(noise·uniform), as a popular "
                "pack does (0.35) against 'burnt' images")}),
        }}

    def apply(self, model, instantid, control_net, identities, masks, kps_image, positive, negative, ip_weight,
              cn_strength, identity_weights, start_at, end_at, noise):
        check_base(model, ("SDXL",), "InstantID")
        topology = check_topology(model, instantid.weights)
        n, masks, weights = check_apply_inputs(identities, masks, ip_weight, identity_weights, start_at, end_at)
        skipped = skipped_slots(identities)
        if skipped:  # a skipped identity keeps its slot but acts nowhere: empty mask, weight 0
            masks = masks.clone()
            masks[skipped] = 0.0
            for s in skipped:
                weights[s] = 0.0
            logger.warning("InstantFamily InstantID: identities %s were skipped (no face); their slots get no "
                           "identity", [f"{s + 1} ({identities[s].name})" for s in skipped])
        packs = {i.face_pack for i in identities if not is_skipped(i)} - {""}
        if packs - {RECOMMENDED_PACK}:
            logger.warning("InstantFamily InstantID: identities were encoded with %s; InstantID was trained on %s "
                           "embeddings, so identity fidelity may suffer", sorted(packs), RECOMMENDED_PACK)
        bar = ProgressBar(n)
        uncond = instantid.resampler.uncond_tokens(noise)
        tokens = []
        for ident in identities:
            throw_exception_if_processing_interrupted()
            tokens.append(torch.zeros_like(uncond) if is_skipped(ident) else person_tokens(instantid, ident))
            bar.update(1)
        tokens = torch.stack(tokens)
        uncond = uncond.expand_as(tokens).contiguous()
        sampling = model.get_model_object("model_sampling")
        sigma_range = (float(sampling.percent_to_sigma(start_at)), float(sampling.percent_to_sigma(end_at)))
        rule = FaceIDRule(instantid.weights, tokens, uncond, masks, weights, None, sigma_range, topology)
        patched = install_faceid(model.clone(), rule, sigma_range)
        control = identitynet_for(control_net, IdentityNetRule(tokens, uncond, masks), "control_net")
        hint = kps_image.movedim(-1, 1)
        cache: dict = {}
        pos = attach_controlnet(positive, control, hint, cn_strength, (start_at, end_at), cache)
        neg = attach_controlnet(negative, control, hint, cn_strength, (start_at, end_at), cache)
        return (patched, pos, neg)
