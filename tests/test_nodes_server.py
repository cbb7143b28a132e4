"""The pack in a real ComfyUI server on 127.0.0.1: bundled workflows run over HTTP, UI workflows agree with
/object_info, and bad input becomes a node error while the server goes on serving.

Set-up generates (seeded, never committed): a micro SD1.5 checkpoint ComfyUI's stock loader detects, a micro SD2
UNet, an InstantFamily checkpoint, a tiny insightface pack named ``antelopev2`` and reference images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tools.devkit.comfy_host import HOW_TO_PROVIDE, find_comfyui
from tools.devkit.workflow_format import WORKFLOWS_DIR, load_twin, shrink

pytestmark = pytest.mark.skipif(find_comfyui() is None, reason=HOW_TO_PROVIDE)

WORKFLOWS = sorted(p.stem for p in WORKFLOWS_DIR.glob("instantfamily_*.json"))  # faceid_*: test_faceid_server
COLORS = [(0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255), (255, 255, 255), (0, 0, 0)]


def _save(img: np.ndarray, path: Path) -> None:
    Image.fromarray(img).save(path)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from tools.devkit.comfy_host import import_host
    from tools.devkit.comfy_server import ComfyServer
    from tools.devkit.face_models import make_tiny_pack, write_tiny_recognizer
    import_host()
    from support import comfy_files
    base = tmp_path_factory.mktemp("comfy")
    srv = ComfyServer(base)
    models = base / "models"
    comfy_files.write_micro_sd15(str(models / "checkpoints" / "v1-5-pruned-emaonly.safetensors"))
    comfy_files.write_micro_sd2_unet(str(models / "unet" / "sd2_micro.safetensors"))
    comfy_files.write_micro_instantfamily(str(models / "instantfamily" / "instantfamily_sd15.safetensors"))
    _write_wrong_schema(models / "instantfamily" / "wrong_schema.safetensors")
    make_tiny_pack(models / "insightface", "antelopev2")
    write_tiny_recognizer(models / "insightface" / "models" / "nodetector" / "w600k_tiny.onnx")
    make_tiny_pack(models / "insightface" / "models" / "nested", "x")  # → nested/models/x: fixed below
    nested = models / "insightface" / "models" / "nested"
    shutil.move(str(nested / "models" / "x"), str(nested / "nested"))
    shutil.rmtree(nested / "models")
    comfy_files.write_face_photos(base / "in", COLORS)
    _save(np.full((640, 640, 3), 128, np.uint8), base / "in" / "no_face.png")
    with srv:
        yield srv


def _write_wrong_schema(path: Path) -> None:
    import torch
    from safetensors.torch import save_file
    save_file({"projector.x": torch.zeros(1)}, str(path), metadata={"format": "ipadapter"})




def of_class(prompt: dict, cls: str) -> list[str]:
    return [k for k, v in prompt.items() if v["class_type"] == cls]


def assert_image_output(srv, entry):
    assert entry.get("status", {}).get("status_str") == "success", (entry.get("status"), srv.log()[-3000:])
    images = [img for out in entry["outputs"].values() for img in out.get("images", [])]
    saved = [i for i in images if i["type"] == "output"]
    assert saved, entry["outputs"]
    path = srv.base / "out" / saved[0].get("subfolder", "") / saved[0]["filename"]
    with Image.open(path) as im:
        assert im.size[1] == 64 and im.size[0] >= 64


def node_error(srv, prompt) -> str:
    from tools.devkit.comfy_server import execution_error
    entry = srv.run(prompt)
    err = execution_error(entry) if "rejected" not in entry else None
    assert err is not None, entry
    return f"{err['exception_type']}: {err['exception_message']}"


def test_workflows_are_templates_and_agree_with_object_info(server):
    from tools.devkit.workflow_format import input_specs, ui_to_api
    info = server.get("/object_info")
    ours = [k for k in info if k.startswith(("InstantFamily", "ApplyInstantFamily"))]
    assert len(ours) == 14  # 9 InstantFamily nodes, 2 of the public-weights mode, 2 of InstantID, the doctor
    assert set(WORKFLOWS) <= set(server.get("/workflow_templates").get("ComfyUI-InstantFamily", []))
    assert len(WORKFLOWS) == 3
    for name in WORKFLOWS:
        with open(WORKFLOWS_DIR / f"{name}.json") as f:
            ui = json.load(f)
        twin = load_twin(name)
        assert ui_to_api(ui, info) == twin, name
        for nid, node in twin.items():  # every widget value is valid for its input
            for key, spec, required in input_specs(info[node["class_type"]]):
                value = node["inputs"].get(key)
                if required:
                    assert value is not None, (name, nid, key)
                if isinstance(spec[0], list) and not isinstance(value, list):
                    assert value in spec[0], (name, nid, key, value)


@pytest.mark.parametrize("name", WORKFLOWS)
def test_every_workflow_twin_generates_an_image(server, name):
    prompt = shrink(load_twin(name))
    for nid in of_class(prompt, "InstantFamilyPoseFromImage"):
        try:
            import controlnet_aux  # noqa: F401
            has_aux = True
        except Exception:
            has_aux = False
        if not has_aux:  # the detector is optional: its absence is a clear node error, then the offline method
            assert "controlnet-aux" in node_error(server, prompt)
        prompt[nid]["inputs"]["method"] = "faces (insightface)"
    assert_image_output(server, server.run(prompt))


def _two_ids():
    return shrink(load_twin("instantfamily_2_identities_pose_from_photo"))


def _with_faces_method(prompt):
    for nid in of_class(prompt, "InstantFamilyPoseFromImage"):
        prompt[nid]["inputs"]["method"] = "faces (insightface)"
    return prompt


BAD = {
    "no_face_in_reference": ("NoFaceError", "person 1: no face found in reference image 0"),
    "more_identities_than_people": ("IdentityCountError", "4 identities but the pose has only 2 people"),
    "pose_with_no_people": ("PoseError", "no people"),
    "mask_count": ("MaskError", "1 masks but there are 2 identities"),
    "sd2_model": ("BaseModelError", "Stable Diffusion 1.5"),
    "wrong_schema": ("CheckpointError", "not an InstantFamily checkpoint"),
    "pack_without_detector": ("ModelFileError", "nodetector"),
    "nested_pack": ("NestedPackError", "nested"),
}


def bad_prompt(case: str) -> dict:
    p = _with_faces_method(_two_ids())
    first = lambda cls: of_class(p, cls)[0]  # noqa: E731
    if case == "no_face_in_reference":
        p[first("LoadImage")]["inputs"]["image"] = "no_face.png"
    elif case == "more_identities_than_people":
        p = shrink(load_twin("instantfamily_4_identities_template"))
        p[first("InstantFamilyPoseToMasks")]["inputs"]["template"] = "family_2.json"
    elif case == "pose_with_no_people":
        photo = [k for k in of_class(p, "LoadImage") if p[k]["inputs"]["image"] == "group_photo.png"][0]
        p[photo]["inputs"]["image"] = "no_face.png"
    elif case == "mask_count":
        p["900"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 64, "height": 64}}
        p[first("ApplyInstantFamily")]["inputs"]["masks"] = ["900", 0]
    elif case == "sd2_model":
        p["901"] = {"class_type": "UNETLoader", "inputs": {"unet_name": "sd2_micro.safetensors",
                                                           "weight_dtype": "default"}}
        p[first("ApplyInstantFamily")]["inputs"]["model"] = ["901", 0]
    elif case == "wrong_schema":
        p[first("InstantFamilyLoader")]["inputs"]["checkpoint"] = "wrong_schema.safetensors"
    elif case == "pack_without_detector":
        p[first("InstantFamilyFaceAnalysisLoader")]["inputs"]["pack"] = "nodetector"
    elif case == "nested_pack":
        p[first("InstantFamilyFaceAnalysisLoader")]["inputs"]["pack"] = "nested"
    return p


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_a_node_error_and_the_server_serves_the_next_prompt(server, case):
    kind, text = BAD[case]
    message = node_error(server, bad_prompt(case))
    assert message.split(":")[0].rsplit(".", 1)[-1] == kind and text in message, message
    good = _with_faces_method(_two_ids())
    good[of_class(good, "KSampler")[0]]["inputs"]["seed"] = 1000 + sorted(BAD).index(case)
    assert_image_output(server, server.run(good))
