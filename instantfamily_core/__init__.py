"""InstantFamily core: framework-free building blocks shared by the ComfyUI nodes and the training CLI.

Imports torch, numpy, safetensors and (lazily) onnx, onnxruntime, insightface and opencv — never ComfyUI or
diffusers.
"""

from .attention import MODES, MaskedCrossAttention, paper_attention, sdpa_attention
from .checkpoint import CheckpointMeta, InstantFamilyCheckpoint, load_checkpoint, read_metadata, save_checkpoint
from .errors import (BaseModelError, CheckpointError, EmbeddingError, FaceKeypointsError, IdentityCountError,
                     InstantFamilyError, MaskError, ModelFileError, NestedPackError, NoFaceError, PoseError)
from .identity import IdentityFeatures
from .masks import boxes_to_masks, feature_size_for, resize_masks, validate_masks
from .pose import PoseFrame, SlotAssignment, assign_slots, face_box, parse_order, parse_pose
from .projector import IdentityProjector, ProjectorConfig
from .stack import SlotLayout, stack_context

__version__ = "0.1.0"
