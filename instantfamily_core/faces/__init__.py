"""Face analysis for InstantFamily: insightface packs, detection, global embeddings and local feature maps.

Importing this package needs only numpy; onnx / onnxruntime / insightface are imported when used, torch only by
``FaceAnalyzer.encode`` (which returns :class:`~instantfamily_core.identity.IdentityFeatures`).
"""

from .analyzer import DetectedFace, FaceAnalyzer, clear_analyzer_cache, get_analyzer
from .images import ImageInputError, as_image_list, check_image
from .localmap import LocalMapModel, find_local_map, local_map_model_path
from .packs import EXPECTED_FILES, FacePack, classify_onnx, list_packs, models_dir, resolve_pack
from .providers import PROVIDER_CHOICES
from .providers import available_providers, select_providers

__all__ = [
    "DetectedFace", "FaceAnalyzer", "get_analyzer", "clear_analyzer_cache",
    "ImageInputError", "check_image", "as_image_list",
    "LocalMapModel", "find_local_map", "local_map_model_path",
    "FacePack", "EXPECTED_FILES", "list_packs", "models_dir", "resolve_pack", "classify_onnx",
    "PROVIDER_CHOICES", "available_providers", "select_providers",
]
