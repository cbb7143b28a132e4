"""Model folders: ``models/instantfamily`` (checkpoints), ``models/instantfamily/identities`` (encoded
identities), ``models/insightface`` (face packs under ``models/<pack>/``) — merged with any entries that
``extra_model_paths.yaml`` registered before the pack loaded."""

from __future__ import annotations

import os

import folder_paths

from instantfamily_core.faces import list_packs

CHECKPOINTS_FOLDER = "instantfamily"
IDENTITIES_FOLDER = "instantfamily_identities"
INSIGHTFACE_FOLDER = "insightface"
OPENPOSE_FOLDER = "instantfamily_openpose"


def _register(name: str, default: str, extensions: set) -> None:
    paths, exts = folder_paths.folder_names_and_paths.get(name, ([], set()))
    paths = list(paths)
    if default not in paths:
        paths.append(default)
    merged = set(exts or ()) | extensions if extensions else set()
    folder_paths.folder_names_and_paths[name] = (paths, merged)


def register_folders() -> None:
    models = folder_paths.models_dir
    _register(CHECKPOINTS_FOLDER, os.path.join(models, "instantfamily"), {".safetensors"})
    _register(IDENTITIES_FOLDER, os.path.join(models, "instantfamily", "identities"), {".safetensors"})
    _register(INSIGHTFACE_FOLDER, os.path.join(models, "insightface"), set())
    _register(OPENPOSE_FOLDER, os.path.join(models, "openpose"), set())


def insightface_roots() -> list[str]:
    return list(folder_paths.get_folder_paths(INSIGHTFACE_FOLDER))


def face_packs() -> list[str]:
    """Pack names found as ``<root>/models/<pack>/`` in every insightface root (nested packs included, so
    choosing one reports how to fix it)."""
    packs = {p for root in insightface_roots() for p in list_packs(root, include_nested=True)}
    return sorted(packs) or ["antelopev2"]


def root_for_pack(pack: str) -> str:
    """The insightface root that holds ``models/<pack>`` (the first root when none does, for the error)."""
    roots = insightface_roots()
    for root in roots:
        if os.path.isdir(os.path.join(root, "models", pack)):
            return root
    return roots[0]
