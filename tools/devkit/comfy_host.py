"""Finding and importing the real ComfyUI host for tests, and loading this pack into it the way ComfyUI does.

The host is found via ``COMFYUI_PATH``, or this pack sitting in ``ComfyUI/custom_nodes``, or comfy-cli's default
workspace ``~/comfy/ComfyUI``, or the read-only ComfyUI source tree in ``../shared/hosts`` (copied to a cache folder
before use; the tree itself is never written). Without one, host tests skip with :data:`HOW_TO_PROVIDE` — except
under ``CI=true``, where ``tests/conftest.py`` turns a missing host (and any skip) into a failure.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[2]
SHARED_HOST = REPO.parent / "shared" / "hosts" / "ComfyUI-0.3.64"
HOW_TO_PROVIDE = ("no ComfyUI host found: set COMFYUI_PATH to a ComfyUI checkout (with its requirements installed), "
                  "or put this pack in ComfyUI/custom_nodes, or lay ComfyUI out at ~/comfy/ComfyUI, "
                  f"or provide the source tree {SHARED_HOST}")


def _is_host(p: Path) -> bool:
    return (p / "main.py").is_file() and (p / "comfy").is_dir() and (p / "folder_paths.py").is_file()


def find_comfyui() -> Optional[Path]:
    candidates = []
    if os.environ.get("COMFYUI_PATH"):
        candidates.append(Path(os.environ["COMFYUI_PATH"]).expanduser())
    if REPO.parent.name == "custom_nodes":
        candidates.append(REPO.parent.parent)
    candidates.append(Path.home() / "comfy" / "ComfyUI")
    found = next((c.resolve() for c in candidates if _is_host(c)), None)
    if found is None and _is_host(SHARED_HOST):
        found = copy_shared_host()
    return found


def copy_shared_host() -> Path:
    """A writable copy of the read-only shared host tree (made once, atomically; the same place ``.ci/run`` uses)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "instantfamily" / "hosts"
    dest = cache / SHARED_HOST.name
    if _is_host(dest):
        return dest
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".copy-", dir=cache)) / SHARED_HOST.name
    shutil.copytree(SHARED_HOST, tmp, symlinks=True)
    for d, _, files in os.walk(tmp):
        for name in (d, *(os.path.join(d, f) for f in files)):
            if not os.path.islink(name):
                os.chmod(name, os.stat(name).st_mode | stat.S_IWUSR)
    try:
        tmp.rename(dest)
    except OSError:  # another process won the race: use its copy
        shutil.rmtree(tmp.parent, ignore_errors=True)
    else:
        tmp.parent.rmdir()
    return dest


_IMPORTED: dict = {}


def import_host(extra_args: tuple = (), cpu: bool = True):
    """Import ComfyUI in this process (once; ``--cpu`` unless ``cpu=False``) and return its ``nodes`` module."""
    if "nodes" in _IMPORTED:
        return _IMPORTED["nodes"]
    root = find_comfyui()
    if root is None:
        raise RuntimeError(HOW_TO_PROVIDE)
    sys.argv = ["main.py", *(["--cpu"] if cpu else []), "--disable-all-custom-nodes", *extra_args]
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import comfy.options
    comfy.options.enable_args_parsing()
    import comfy.cli_args  # noqa: F401  (parses sys.argv)
    import nodes
    _IMPORTED["nodes"] = nodes
    return nodes


def load_pack():
    """Load this repository as a custom node pack through ComfyUI's own loader; return the pack module."""
    nodes = import_host()
    if "pack" not in _IMPORTED:
        ok = asyncio.run(nodes.load_custom_node(str(REPO)))
        if not ok:
            raise RuntimeError("ComfyUI failed to load the pack; see the log above")
        _IMPORTED["pack"] = sys.modules[str(REPO).replace(".", "_x_")]
    return _IMPORTED["pack"]
