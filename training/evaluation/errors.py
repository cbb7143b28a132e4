"""Typed errors of the evaluation CLI (all ``ValueError`` subclasses via the core base class)."""

from instantfamily_core.errors import InstantFamilyError, ModelFileError


class EvaluationError(InstantFamilyError):
    """Base class of evaluation input errors."""


class CasesFileError(EvaluationError):
    """The cases file is unreadable or a case has a missing / malformed field (the message names both)."""


class ImageFileError(EvaluationError):
    """An image file is missing or cannot be decoded."""


class ReferenceFaceError(EvaluationError):
    """No face was found in an identity's reference image."""


class RecognizerSpecError(ModelFileError):
    """The ``--recognizer`` spec is malformed, or its package / weights are missing."""
