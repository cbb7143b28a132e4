"""Choose onnxruntime execution providers from a user-facing choice.

``select_providers(choice)`` maps ``"auto" | "CPU" | "CUDA" | "ROCm" | "CoreML"`` (case-insensitive) to the list
that ``onnxruntime.InferenceSession`` / insightface take, based on ``onnxruntime.get_available_providers()``:

* the list always ends with ``"CPUExecutionProvider"`` (ORT falls back to it per node / on EP failure);
* ``"auto"`` picks the first available of CUDA, ROCm, CoreML, else CPU only;
* a named provider that this onnxruntime build does not offer falls back to CPU with a ``logging`` warning
  (e.g. "CUDA" with the CPU-only ``onnxruntime`` wheel; install ``onnxruntime-gpu``);
* an unknown name raises :class:`~instantfamily_core.errors.InstantFamilyError` listing the valid choices.
"""

from __future__ import annotations

import logging

from ..errors import InstantFamilyError, OptionError

logger = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"

PROVIDER_NAMES: dict[str, str] = {
    "CPU": CPU,
    "CUDA": "CUDAExecutionProvider",
    "ROCm": "ROCMExecutionProvider",
    "CoreML": "CoreMLExecutionProvider",
}
"""User-facing name → ORT provider name."""

AUTO_ORDER = ("CUDA", "ROCm", "CoreML")
"""Preference of ``"auto"`` among the accelerated providers."""

PROVIDER_CHOICES = ("auto", *PROVIDER_NAMES)
"""All accepted choices, for UI dropdowns."""


def available_providers() -> list[str]:
    """``onnxruntime.get_available_providers()``; a typed error if onnxruntime is not installed."""
    try:
        import onnxruntime
    except ImportError as e:
        raise InstantFamilyError(
            "onnxruntime is not installed; run `pip install onnxruntime` (CPU) or `pip install onnxruntime-gpu` "
            "(NVIDIA) in ComfyUI's Python environment") from e
    return list(onnxruntime.get_available_providers())


def _canonical(choice: str) -> str:
    if not isinstance(choice, str):
        raise OptionError(f"provider: expected one of {list(PROVIDER_CHOICES)}, got {choice!r}")
    for name in PROVIDER_CHOICES:
        if choice.strip().lower() == name.lower():
            return name
    raise OptionError(f"provider: unknown choice {choice!r}; expected one of {list(PROVIDER_CHOICES)}")


def select_providers(choice: str = "auto") -> list[str]:
    """ORT provider list for ``choice``, always ending with ``CPUExecutionProvider`` (see module docstring)."""
    name = _canonical(choice)
    available = available_providers()
    if name == "auto":
        for candidate in AUTO_ORDER:
            if PROVIDER_NAMES[candidate] in available:
                return [PROVIDER_NAMES[candidate], CPU]
        return [CPU]
    if name == "CPU":
        return [CPU]
    wanted = PROVIDER_NAMES[name]
    if wanted in available:
        return [wanted, CPU]
    logger.warning("provider %r is not available in this onnxruntime build (available: %s); falling back to CPU. "
                   "For CUDA install onnxruntime-gpu (and uninstall onnxruntime).", name, ", ".join(available))
    return [CPU]


def is_cpu_only(providers: list[str]) -> bool:
    """True when ``providers`` holds nothing but the CPU provider (insightface's ``ctx_id=-1``)."""
    return all(p == CPU for p in providers)
