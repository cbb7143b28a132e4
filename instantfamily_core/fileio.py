"""Atomic file writes: a temp file in the target folder, then ``os.replace`` — a crash never leaves half a file."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager


@contextmanager
def atomic_path(path: str, suffix: str = ""):
    """Yield a temp path next to ``path``; on success it replaces ``path``, on error it is removed."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_safetensors_atomic(tensors: dict, path: str, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file
    with atomic_path(path, ".safetensors") as tmp:
        save_file(tensors, tmp, metadata=metadata)
