"""Typed errors of the evaluation CLI (all ``ValueError`` subclasses via the core base class).

``ImageFileError`` is the core's (:mod:`instantfamily_core.errors`), raised by the one image loader
:func:`instantfamily_core.faces.images.load_rgb`; it is re-exported here for the evaluation's callers.
"""

from instantfamily_core.errors import ImageFileError, InstantFamilyError, ModelFileError


class EvaluationError(InstantFamilyError):
    """Base class of evaluation input errors."""


class CasesFileError(EvaluationError):
    """The cases file is unreadable or a case has a missing / malformed field (the message names both)."""


class ReferenceFaceError(EvaluationError):
    """No face was found in an identity's reference image."""


class RecognizerSpecError(ModelFileError):
    """The ``--recognizer`` spec is malformed, or its package / weights are missing."""


__all__ = ["EvaluationError", "CasesFileError", "ImageFileError", "ReferenceFaceError", "RecognizerSpecError"]
