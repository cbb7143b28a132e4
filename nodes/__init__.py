"""ComfyUI adapters of InstantFamily: thin nodes that parse inputs, call the core and patch a clone."""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # the core library lives beside this package; appended, so ComfyUI's own
    sys.path.append(_ROOT)  # top-level modules (e.g. its nodes.py) always win
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from . import paths  # noqa: E402

paths.register_folders()

from .doctor_node import InstantFamilyDoctor  # noqa: E402
from .face_nodes import CombineIdentities, EncodeIdentity, FaceAnalysisLoader, LoadIdentities, SaveIdentities  # noqa: E402
from .faceid_nodes import ApplyFaceID, FaceIDLoader  # noqa: E402
from .instantid_nodes import ApplyInstantID, InstantIDLoader  # noqa: E402
from .model_nodes import ApplyInstantFamily, InstantFamilyLoader  # noqa: E402
from .pose_nodes import PoseFromImage, PoseToMasks  # noqa: E402

_NODES = {
    "InstantFamilyFaceAnalysisLoader": (FaceAnalysisLoader, "InstantFamily Face Analysis Loader"),
    "InstantFamilyEncodeIdentity": (EncodeIdentity, "InstantFamily Encode Identity"),
    "InstantFamilyCombineIdentities": (CombineIdentities, "InstantFamily Combine Identities"),
    "InstantFamilySaveIdentities": (SaveIdentities, "InstantFamily Save Identities"),
    "InstantFamilyLoadIdentities": (LoadIdentities, "InstantFamily Load Identities"),
    "InstantFamilyPoseToMasks": (PoseToMasks, "InstantFamily Pose to Masks"),
    "InstantFamilyPoseFromImage": (PoseFromImage, "InstantFamily Pose from Image"),
    "InstantFamilyLoader": (InstantFamilyLoader, "InstantFamily Loader"),
    "ApplyInstantFamily": (ApplyInstantFamily, "Apply InstantFamily"),
    "InstantFamilyFaceIDLoader": (FaceIDLoader, "InstantFamily FaceID Loader (public weights)"),
    "ApplyInstantFamilyFaceID": (ApplyFaceID, "Apply InstantFamily FaceID (public weights)"),
    "InstantFamilyInstantIDLoader": (InstantIDLoader, "InstantFamily InstantID Loader"),
    "ApplyInstantFamilyInstantID": (ApplyInstantID, "Apply InstantFamily InstantID"),
    "InstantFamilyDoctor": (InstantFamilyDoctor, "InstantFamily Doctor (check installation)"),
}
NODE_CLASS_MAPPINGS = {k: v[0] for k, v in _NODES.items()}
NODE_DISPLAY_NAME_MAPPINGS = {k: v[1] for k, v in _NODES.items()}
