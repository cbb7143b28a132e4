"""The doctor as a node: the same report as ``python tools/doctor.py``, for the folders this ComfyUI really uses."""

from __future__ import annotations

import logging
import os

import folder_paths

from instantfamily_core import doctor

from .face_nodes import CATEGORY

logger = logging.getLogger(__name__)


def comfyui_locations() -> doctor.Locations:
    """This ComfyUI's root, version and model folders (defaults merged with extra_model_paths.yaml, as
    registered in ``folder_paths``)."""
    root = os.path.dirname(os.path.abspath(folder_paths.__file__))
    try:
        import comfyui_version
        version = comfyui_version.__version__
    except Exception:  # noqa: BLE001 - very old ComfyUI
        version = doctor.comfyui_version(doctor.Path(root))
    folders = {}
    for name in doctor.FOLDERS:
        try:
            folders[name] = list(folder_paths.get_folder_paths(name))
        except KeyError:  # not registered (e.g. ipadapter without the FaceID nodes): ComfyUI's default place
            folders[name] = [os.path.join(folder_paths.models_dir, doctor.FOLDERS[name])]
    return doctor.Locations(doctor.Path(root), version, folders)


class InstantFamilyDoctor:
    DESCRIPTION = ("Checks this installation — ComfyUI, torch/CUDA, onnxruntime (one distribution only), "
                   "insightface, face packs, InstantFamily checkpoints, FaceID files, the OpenPose ControlNet — and "
                   "says exactly what to fix. Connect 'report' to a Preview Any node to read it; it is also printed "
                   "to the console. Same report as `python tools/doctor.py`.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING", "BOOLEAN")
    RETURN_NAMES = ("report", "ready")
    OUTPUT_TOOLTIPS = ("the report as text", "True when everything needed is there (the CLI's exit code 0)")
    FUNCTION = "run"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    @classmethod
    def IS_CHANGED(cls):
        return float("nan")  # files change outside ComfyUI: check again on every run

    def run(self):
        rows = doctor.run_checks(comfyui_locations())
        report = doctor.format_report(rows)
        ready = doctor.exit_code(rows) == 0
        (logger.info if ready else logger.warning)("InstantFamily doctor:\n%s", report)
        return {"ui": {"text": (report,)}, "result": (report, ready)}
