"""The one import bootstrap of the repository's scripts when they run as files.

``python training/train.py`` puts ``training/`` itself, not the repository root, first on ``sys.path``, and without
this bootstrap ``training``, ``instantfamily_core`` and ``tools`` would be found wherever Python looks first. Each
script under ``training/`` starts with

    if not __package__:  # run as a file; nothing to do for ``python -m training.train``
        import _bootstrap  # noqa: F401  (training/_bootstrap.py)

and the scripts under ``tools/`` and ``benchmarks/`` run this same file through a one-line delegate
(``tools/_bootstrap.py``, ``benchmarks/_common.py``). Running it

* puts the repository root first on ``sys.path`` (or leaves it where it is when nothing before it shadows its
  packages);
* when the script's folder ``training/`` is first on ``sys.path``, moves it to the end, so that its modules
  (``evaluate.py``, ``data.py``, ``model.py``, …) no longer shadow installed top-level modules of the same names
  (Hugging Face's ``evaluate``); it stays on the path, so that ``multiprocessing``'s spawned children re-running the
  script still find this file;
* checks that this repository's packages are the ones imported: if another ``training`` (or ``instantfamily_core``,
  ``tools``) is already imported (by a ``.pth`` file or ``sitecustomize``), or would be found first, the script stops
  with a message naming both places.

Run as a module from the repository root (``python -m training.train``), the root is already first on ``sys.path``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("instantfamily_core", "training", "tools")  # the repository's top-level packages (those present)


def _same(a: str, b: str) -> bool:
    return os.path.realpath(os.path.abspath(a or os.curdir)) == os.path.realpath(b)


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder + os.sep)


def location(name: str) -> Optional[str]:
    """The file or folder that top-level package ``name`` is imported from (already imported) or would be imported
    from (found, not executed); ``None`` when it is not found at all."""
    module = sys.modules.get(name)
    if module is not None and getattr(module, "__file__", None):
        return module.__file__
    spec = getattr(module, "__spec__", None) if module is not None else importlib.util.find_spec(name)
    if spec is None:
        return None
    if spec.origin and spec.has_location:
        return spec.origin
    portions = list(spec.submodule_search_locations or [])  # a namespace package: no __init__.py anywhere
    return portions[0] if portions else None


def _ours(name: str) -> bool:
    """Whether package ``name`` resolves to this repository's (or the repository has no such package)."""
    ours = os.path.join(ROOT, name)
    if not os.path.isfile(os.path.join(ours, "__init__.py")):
        return True
    where = location(name)
    return where is not None and _inside(where, ours)


def check(name: str) -> None:
    """Stop with a message when package ``name`` of this repository is shadowed by another one."""
    if _ours(name):
        return
    ours, where = os.path.join(ROOT, name), location(name)
    how = ("was imported before this script started (a .pth file or sitecustomize imports it)"
           if name in sys.modules else "is found first on sys.path")
    raise SystemExit(f"error: another package named '{name}' {how}: {where or '(no file)'}. This script needs "
                     f"the one in this repository ({ours}). Uninstall or rename the other one (pip show {name}), or "
                     "take its folder off PYTHONPATH.")


def activate() -> None:
    """Put the repository root on ``sys.path`` (first, unless it is there already and nothing before it shadows
    its packages: callers that insert a folder and pop it again keep working), ``training/`` last, and check the
    packages (see above)."""
    here = os.path.join(ROOT, "training")
    if sys.path and _same(sys.path[0], here):
        sys.path.append(sys.path.pop(0))
    if not any(_same(p, ROOT) for p in sys.path):
        sys.path.insert(0, ROOT)
    elif not all(_ours(name) for name in PACKAGES if name not in sys.modules):  # found earlier on the path
        sys.path[:] = [ROOT] + [p for p in sys.path if not _same(p, ROOT)]
    for name in PACKAGES:
        check(name)


activate()
