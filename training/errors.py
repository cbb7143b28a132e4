"""Typed errors of the training tools (all :class:`~instantfamily_core.errors.InstantFamilyError` subclasses, so
``ValueError`` too). The evaluation's own errors live in :mod:`training.evaluation.errors`; bad option values of any
tool raise the core's :class:`~instantfamily_core.errors.OptionError`."""

from instantfamily_core.errors import InstantFamilyError


class DatasetError(InstantFamilyError):
    """Shards or a manifest are missing, from another version, or inconsistent."""


class GenerateError(InstantFamilyError):
    """Bad options or inputs of the generate CLI (the message names the option or case)."""


class TrainingError(InstantFamilyError):
    """Bad training arguments or an inconsistent output / resume folder."""


__all__ = ["DatasetError", "GenerateError", "TrainingError"]
