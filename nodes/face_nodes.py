"""Face analysis loader and identity nodes (encode, combine, save, load)."""

from __future__ import annotations

import logging
import os

import folder_paths
import comfy.model_management
from comfy.utils import ProgressBar

from instantfamily_core.errors import NoFaceError, OptionError
from instantfamily_core.faces import PROVIDER_CHOICES, get_analyzer
from instantfamily_core.identity import IdentityFeatures, SkippedIdentity, load_identities, save_identities

from . import paths
from .convert import images_to_uint8

logger = logging.getLogger("InstantFamily")
CATEGORY = "InstantFamily"
IDENTITIES = "INSTANTFAMILY_IDENTITIES"
FACE_ANALYSIS = "INSTANTFAMILY_FACE_ANALYSIS"


class FaceAnalysisLoader:
    DESCRIPTION = ("Loads an insightface pack from models/insightface/models/<pack>/ (detector + ArcFace "
                   "recognizer). Loaded once and reused; face analysis runs on the chosen onnxruntime provider.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (FACE_ANALYSIS,)
    OUTPUT_TOOLTIPS = ("the loaded face detector + recogniser; connect to Encode Identity (and Pose from Image, "
                       "'faces' method)",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "pack": (paths.face_packs(), {"tooltip": "folder under models/insightface/models/"}),
            "provider": (list(PROVIDER_CHOICES), {"default": "auto", "tooltip": (
                "onnxruntime execution provider; auto = CUDA when available, else CPU")}),
            "det_size": ("INT", {"default": 640, "min": 192, "max": 1280, "step": 64, "tooltip": (
                "side of the square the detector runs at; 640 = insightface's default, larger finds smaller "
                "faces but is slower")}),
        }}

    def load(self, pack, provider, det_size):
        return (get_analyzer(paths.root_for_pack(pack), pack, provider, det_size),)


class EncodeIdentity:
    DESCRIPTION = ("Encodes one person from one or more reference images (averaged) and appends it to the "
                   "identity list. The order of the list is the slot order. With on_no_face = skip, a person "
                   "without a face keeps its place as an explicit 'skipped' entry: its slot (and person in the "
                   "pose) gets no circle, no mask and no tokens, and later identities stay with their people.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (IDENTITIES,)
    RETURN_NAMES = ("identities",)
    OUTPUT_TOOLTIPS = ("the incoming identities with this person appended (list order = slot order)",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "face_analysis": (FACE_ANALYSIS, {"tooltip": "from InstantFamily Face Analysis Loader"}),
            "image": ("IMAGE", {"tooltip": "one or more photos of the same person"}),
            "name": ("STRING", {"default": "person", "tooltip": "a label for this person (shown in logs, "
                                                                "previews and error messages)"}),
            "on_no_face": (["error", "skip"], {"default": "error",
                                               "tooltip": "skip: images without a face are left out; if none has "
                                                          "one, the list gets a 'skipped' entry that keeps this "
                                                          "identity's slot (its person gets no identity) so later "
                                                          "identities are not shifted to other people"}),
        }, "optional": {"identities": (IDENTITIES, {"tooltip": "identities to append this one to"})}}

    def encode(self, face_analysis, image, name, on_no_face, identities=None):
        images = images_to_uint8(image, f"{name} image")
        bar = ProgressBar(len(images))
        encoded = []
        for k, img in enumerate(images):
            comfy.model_management.throw_exception_if_processing_interrupted()
            try:
                one = face_analysis.encode([img], name=name, on_no_face=on_no_face)
            except NoFaceError:
                raise NoFaceError(f"{name}: no face found in reference image {k} of {len(images)}; use a photo "
                                  "where the face is clearly visible, or set on_no_face to 'skip'") from None
            if one is not None:
                encoded.append(one)
            bar.update(1)
        out = list(identities or [])
        if encoded:
            out.append(IdentityFeatures.average(encoded, name=name))
        else:  # on_no_face == "skip" and no image had a face: keep the slot, say so in the list
            reason = f"no face found in any of the {len(images)} reference image(s)"
            logger.warning("%s: %s; slot %d keeps its place without an identity (on_no_face = skip)", name, reason,
                           len(out) + 1)
            out.append(SkippedIdentity(name, reason))
        return (out,)


class CombineIdentities:
    DESCRIPTION = "Concatenates identity lists in order (slot order = list order)."
    CATEGORY = CATEGORY
    RETURN_TYPES = (IDENTITIES,)
    RETURN_NAMES = ("identities",)
    OUTPUT_TOOLTIPS = ("identities_1, then identities_2, … in that order",)
    FUNCTION = "combine"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"identities_1": (IDENTITIES, {"tooltip": "the first identities (first slots)"})},
                "optional": {f"identities_{i}": (IDENTITIES, {"tooltip": f"appended after identities_{i - 1}"})
                             for i in range(2, 9)}}

    def combine(self, **lists):
        out = []
        for i in range(1, 9):
            out += list(lists.get(f"identities_{i}") or [])
        return (out,)


class SaveIdentities:
    DESCRIPTION = "Saves encoded identities to models/instantfamily/identities/<filename>.safetensors."
    CATEGORY = CATEGORY
    RETURN_TYPES = ()
    OUTPUT_TOOLTIPS = ()
    OUTPUT_NODE = True
    FUNCTION = "save"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "identities": (IDENTITIES, {"tooltip": "the identities to save (from Encode/Combine Identities)"}),
            "filename": ("STRING", {"default": "family", "tooltip": (
                "file name in models/instantfamily/identities/ (.safetensors is added); an existing file is "
                "replaced")}),
        }}

    def save(self, identities, filename):
        base = os.path.basename(filename.strip())
        if not base or base in (".", ".."):
            raise OptionError(f"filename: expected a file name like 'family', got {filename!r}")
        if not base.endswith(".safetensors"):
            base += ".safetensors"
        folder = folder_paths.get_folder_paths(paths.IDENTITIES_FOLDER)[-1]
        path = os.path.join(folder, base)
        save_identities(path, identities)
        return {"ui": {"text": [path]}}


class LoadIdentities:
    DESCRIPTION = "Loads identities saved by 'Save Identities' (no face analysis needed)."
    CATEGORY = CATEGORY
    RETURN_TYPES = (IDENTITIES,)
    RETURN_NAMES = ("identities",)
    OUTPUT_TOOLTIPS = ("the saved identities, in their saved order",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"file": (folder_paths.get_filename_list(paths.IDENTITIES_FOLDER), {
            "tooltip": "a file saved by Save Identities in models/instantfamily/identities/"})}}

    def load(self, file):
        return (load_identities(folder_paths.get_full_path_or_raise(paths.IDENTITIES_FOLDER, file)),)
