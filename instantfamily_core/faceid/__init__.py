"""Public-weights mode: SD1.5 and SDXL IP-Adapter-FaceID files (FaceID, Plus v1/v2, Portrait) for N masked people.

Files and variants: :mod:`.files`; block and LoRA key layout: :mod:`.layout`; identity tokens: :mod:`.projection`;
the N-person decoupled masked attention: :mod:`.attention`. Pure torch; imports neither ComfyUI nor diffusers.

Licence: the FaceID weights are "for research purposes, not for commercial use" (h94/IP-Adapter-FaceID), because
the insightface models they were trained on are non-commercial.
"""

from .attention import decoupled_masked_attention, identity_term, pad_people
from .files import (PLUS_VERSIONS, VARIANTS, FaceIDFileError, FaceIDWeights, base_topology, detect_variant,
                    load_faceid, read_container, validate)
from .layout import PUBLISHED, SD15, SDXL, Topology, TransformerSlot, lora_to_comfy
from .projection import FaceIDProjection, person_tokens

__all__ = ["decoupled_masked_attention", "identity_term", "pad_people", "PLUS_VERSIONS", "VARIANTS",
           "FaceIDFileError", "FaceIDWeights", "base_topology", "detect_variant", "load_faceid", "read_container",
           "validate", "PUBLISHED", "SD15", "SDXL", "Topology", "TransformerSlot", "lora_to_comfy",
           "FaceIDProjection", "person_tokens"]
