"""Public-weights mode: InstantID (InstantX/InstantID, SDXL) for N masked people.

Adapter file and its validation: :mod:`.files`; face tokens (the Resampler over the raw antelopev2 embedding):
:mod:`.resampler`. The UNet term is the IP-Adapter decoupled attention over ``to_k_ip``/``to_v_ip``, the same
rule as FaceID's (:mod:`..faceid.attention`); ``InstantIDWeights.kv_weights(p)`` and ``.topology`` match
``FaceIDWeights``'. Pure torch; imports neither ComfyUI nor diffusers.

Licence: the InstantID weights are Apache-2.0 (model card); the antelopev2 face models they need are
insightface's, non-commercial.
"""

from .files import (DIM, ID_DIM, NUM_TOKENS, PUBLISHED_BYTES, InstantIDFileError, InstantIDWeights,
                    expected_image_proj, load_instantid, read_instantid_container, validate)
from .resampler import InstantIDResampler, raw_embeddings

__all__ = ["DIM", "ID_DIM", "NUM_TOKENS", "PUBLISHED_BYTES", "InstantIDFileError", "InstantIDWeights",
           "expected_image_proj", "load_instantid", "read_instantid_container", "validate", "InstantIDResampler",
           "raw_embeddings"]
