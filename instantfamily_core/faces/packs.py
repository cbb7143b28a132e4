"""Locate and validate an insightface face-model pack before insightface ever sees it.

Layout (insightface's own; in ComfyUI ``root = <ComfyUI>/models/insightface``)::

    <root>/models/<pack>/det_10g.onnx      detector (antelopev2: scrfd_10g_bnkps.onnx)
    <root>/models/<pack>/w600k_r50.onnx    ArcFace recognizer (antelopev2: glintr100.onnx)
    <root>/models/<pack>/...               optional landmark / gender-age models

Why validate first: insightface *downloads* a pack whose folder does not exist (fails offline, or fetches a
non-commercial pack the user did not ask for), asserts ``'detection' in self.models`` with no message, and gives
protobuf errors that do not name the file. :func:`resolve_pack` turns each of these into a typed error that says
what to do:

* folder missing → :class:`ModelFileError` naming the folder, the expected files and where to put them;
* pack unzipped one level too deep (``antelopev2/antelopev2/*.onnx``) → :class:`NestedPackError` naming the
  folder to move up;
* an unreadable / truncated ``.onnx`` → :class:`ModelFileError` naming the file (insightface loads *every*
  ``*.onnx`` in the folder, so every file is checked);
* no detector, no recognizer, or a detector without 5 keypoints → :class:`ModelFileError`.

Files are classified with insightface's routing rules (first input shape, number of outputs) in sorted filename
order, first file per task wins — the same file insightface will pick.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelFileError, NestedPackError

EXPECTED_FILES = ("a detector with keypoints (e.g. det_10g.onnx or scrfd_10g_bnkps.onnx) and an ArcFace recognizer "
                  "(e.g. w600k_r50.onnx or glintr100.onnx)")

CACHE_DIRNAME = ".instantfamily_cache"


@dataclass(frozen=True)
class FacePack:
    """A validated pack: ``path`` = ``<root>/models/<name>``; ``detector`` / ``recognizer`` = the files insightface
    will use for detection / recognition; ``roles`` = ``{file name: task or None}`` for every ``.onnx``."""

    root: Path
    name: str
    path: Path
    detector: Path
    recognizer: Path
    roles: dict

    def signature(self) -> tuple:
        """Names, sizes and mtimes of the pack's ``.onnx`` files: changes when a file is replaced."""
        out = []
        for p in sorted(self.path.glob("*.onnx")):
            st = p.stat()
            out.append((p.name, st.st_size, st.st_mtime_ns))
        return tuple(out)


def models_dir(root: str | os.PathLike) -> Path:
    """``<root>/models``: the folder that holds one sub-folder per pack."""
    return Path(root).expanduser() / "models"


def _onnx_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.onnx") if p.is_file())


def list_packs(root: str | os.PathLike, include_nested: bool = False) -> list[str]:
    """Names of the folders under ``<root>/models`` that contain ``.onnx`` files (sorted); ``[]`` if none.

    ``include_nested`` also lists folders whose ``.onnx`` files sit one level too deep (``antelopev2/antelopev2/``),
    so a UI can offer them and :func:`resolve_pack` can say how to fix them."""
    base = models_dir(root)
    if not base.is_dir():
        return []
    return sorted(p.name for p in base.iterdir()
                  if p.is_dir() and not p.name.startswith(".")
                  and (_onnx_files(p) or include_nested and _nested_dirs(p)))


def _check_pack_name(pack: str) -> None:
    if not isinstance(pack, str) or not pack.strip() or pack in (".", "..") or "/" in pack or "\\" in pack:
        raise ModelFileError(f"face-model pack: expected a folder name such as 'antelopev2', got {pack!r}")


def _missing_folder_error(root: Path, pack: str, folder: Path) -> ModelFileError:
    hint = ""
    misplaced = root.expanduser() / pack
    if misplaced.is_dir():
        hint = f" A folder {misplaced} exists: move it into {models_dir(root)}/ (insightface looks in models/<pack>)."
    packs = list_packs(root)
    have = f" Packs found under {models_dir(root)}: {', '.join(packs)}." if packs else ""
    return ModelFileError(
        f"face-model pack '{pack}' not found: folder {folder} does not exist. It must contain {EXPECTED_FILES}. "
        f"Download the pack (e.g. {pack}.zip) and unzip it so that the .onnx files lie directly in {folder}."
        f"{hint}{have}")


def _nested_dirs(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.iterdir())
            if p.is_dir() and not p.name.startswith(".") and _onnx_files(p)]


_ROLE_CACHE: dict[tuple, tuple] = {}


def classify_onnx(path: Path) -> tuple[str | None, int]:
    """``(task, number of outputs)`` of one ``.onnx`` by insightface's routing rules.

    ``task`` is ``'detection'``, ``'recognition'``, ``'landmark'``, ``'attribute'``, ``'inswapper'`` or ``None``
    (not recognised). Raises :class:`ModelFileError` naming the file if it cannot be parsed.
    """
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key in _ROLE_CACHE:
        return _ROLE_CACHE[key]
    import onnx

    corrupt = (f"model file {path} is not a readable ONNX model ({{}}); it is corrupt or incompletely downloaded — "
               f"download it again (or remove it from {path.parent})")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf DecodeError, OSError, ...
        raise ModelFileError(corrupt.format(f"{type(e).__name__}: {e}")) from e
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if not graph.node or not inputs or not graph.output:
        raise ModelFileError(corrupt.format("no graph, inputs or outputs"))
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    h, w = (dims[2], dims[3]) if len(dims) == 4 else (None, None)
    n_out = len(graph.output)
    if n_out >= 5:
        task = "detection"
    elif h == w == 192:
        task = "landmark"
    elif h == w == 96:
        task = "attribute"
    elif len(inputs) == 2 and h == w == 128:
        task = "inswapper"
    elif h is not None and h == w and h >= 112 and h % 16 == 0:
        task = "recognition"
    else:
        task = None
    _ROLE_CACHE[key] = (task, n_out)
    return task, n_out


def resolve_pack(root: str | os.PathLike, pack: str) -> FacePack:
    """Validate ``<root>/models/<pack>`` and return its :class:`FacePack` (errors: see module docstring)."""
    _check_pack_name(pack)
    root = Path(root).expanduser()
    folder = models_dir(root) / pack
    if not folder.is_dir():
        raise _missing_folder_error(root, pack, folder)
    files = _onnx_files(folder)
    if not files:
        nested = _nested_dirs(folder)
        if nested:
            inner = nested[0]
            raise NestedPackError(
                f"face-model pack '{pack}' is nested one folder too deep: the .onnx files are in {inner}, but "
                f"insightface reads {folder}. Move the files from {inner} up into {folder} "
                f"(then delete the empty {inner.name}/ folder).")
        raise ModelFileError(f"face-model pack '{pack}': folder {folder} contains no .onnx files; it must contain "
                             f"{EXPECTED_FILES}.")
    roles: dict[str, str | None] = {}
    chosen: dict[str, tuple[Path, int]] = {}
    for f in files:
        task, n_out = classify_onnx(f)
        roles[f.name] = task
        if task is not None and task not in chosen:
            chosen[task] = (f, n_out)
    found = ", ".join(f"{k} ({v or 'not recognised'})" for k, v in roles.items())
    for task, what in (("detection", "no face detector"), ("recognition", "no ArcFace recognizer")):
        if task not in chosen:
            raise ModelFileError(f"face-model pack '{pack}' in {folder} has {what}. Found: {found}. The pack must "
                                 f"contain {EXPECTED_FILES}.")
    det, n_out = chosen["detection"]
    if n_out not in (9, 15):
        kind = "gives no facial keypoints" if n_out in (6, 10) else f"has {n_out} outputs (expected 9 or 15)"
        raise ModelFileError(f"face detector {det} {kind}; InstantFamily aligns faces on 5 keypoints and needs an "
                             f"SCRFD/RetinaFace detector with keypoints (e.g. det_10g.onnx, scrfd_10g_bnkps.onnx).")
    return FacePack(root=root, name=pack, path=folder, detector=det, recognizer=chosen["recognition"][0],
                    roles=roles)
