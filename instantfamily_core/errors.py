"""Typed errors of InstantFamily.

Every error is a ``ValueError`` subclass so ComfyUI shows it on the node that raised it and the server goes on
serving the next prompt. Messages name the input that was wrong and say what was expected.
"""


class InstantFamilyError(ValueError):
    """Base class of every error this pack raises on bad input or bad files."""


class NoFaceError(InstantFamilyError):
    """No face was found in an image that must contain one."""


class EmbeddingError(InstantFamilyError):
    """A face embedding or feature map is NaN, infinite, zero or of the wrong shape."""


class PoseError(InstantFamilyError):
    """Pose keypoints are missing, empty or malformed."""


class FaceKeypointsError(PoseError):
    """A person's keypoints do not locate a face (no nose, eyes, ears or face points)."""


class IdentityCountError(InstantFamilyError):
    """The number of identities does not fit the pose, the masks or the slot order."""


class MaskError(InstantFamilyError):
    """Masks of the wrong count, size or value range."""


class ModelFileError(InstantFamilyError):
    """A model file or folder is missing, corrupt or laid out wrongly."""


class NestedPackError(ModelFileError):
    """A face-model pack was unpacked one folder too deep (``antelopev2/antelopev2/``)."""


class FaceIDFileError(ModelFileError):
    """An IP-Adapter file that is not a readable IP-Adapter-FaceID file (SD1.5 or SDXL)."""


class InstantIDFileError(ModelFileError):
    """A file given as InstantID's adapter that is unreadable, of another kind, or not in the published layout."""


class ImageInputError(InstantFamilyError):
    """An image given to face analysis has the wrong type, dtype or shape."""


class ImageFileError(InstantFamilyError):
    """An image file (or stored image bytes) is missing or cannot be decoded; the message names the file."""


class CheckpointError(InstantFamilyError):
    """An InstantFamily checkpoint has the wrong schema, keys, shapes or base model."""


class BaseModelError(InstantFamilyError):
    """The diffusion model is not the family InstantFamily was trained for (SD1.5)."""


class OptionError(InstantFamilyError):
    """An option has a bad value (a range, a weight, a name, a file name or a count the user chose); the message
    names the option and the values it accepts."""
