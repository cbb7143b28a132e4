"""Public-weights mode end to end over HTTP: the bundled FaceID workflows (2 people posed from a group photo, 4
people on a template) run in a real ComfyUI server and produce images.

Files (random values, generated at test time, never committed): a **full-size** SD1.5 checkpoint (the FaceID
weights address all 16 cross-attentions at 320/640/1280, so a reduced UNet cannot take them; TAESD as the VAE),
a full-size ControlNet in ``control_v11p_sd15_openpose.pth``'s layout loaded by the stock ControlNetLoader, an
``ip-adapter-faceid_sd15.bin`` in the published layout, and a tiny insightface pack named ``buffalo_l``. The two
full-size files are cached in ``~/.cache/instantfamily/fixtures`` (≈2.7 GB, generated once, ~3 min on 2 cores).
Images are 64 px high, 2 steps. The PlusV2 workflow needs a full CLIP ViT-H (632 M parameters) and is only
checked against /object_info here."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from tools.devkit.comfy_host import HOW_TO_PROVIDE, find_comfyui
from tools.devkit.workflow_format import WORKFLOWS_DIR, load_twin, shrink as shrink_graph

pytestmark = pytest.mark.skipif(find_comfyui() is None, reason=HOW_TO_PROVIDE)

FACEID_WORKFLOWS = sorted(p.stem for p in WORKFLOWS_DIR.glob("faceid_*.json"))
RUN = ["faceid_2_people_pose_from_photo", "faceid_4_people_template"]
COLORS = [(0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]


def faceid_server(base, extra_args: tuple = (), folders: tuple = ("ipadapter", "controlnet")):
    """A ComfyUI server whose model paths also list ``models/<folder>`` for each of ``folders`` (all made)."""
    from tools.devkit.comfy_server import ComfyServer

    class Server(ComfyServer):
        def _yaml(self):
            path = super()._yaml()
            with open(path, "a") as f:
                f.write("".join(f"  {d}: models/{d}\n" for d in folders))
            return path

    for d in folders:
        (base / "models" / d).mkdir(parents=True, exist_ok=True)
    return Server(base, extra_args=extra_args)


@contextlib.contextmanager
def serving_models(base, files: dict, pack: str, extra_args: tuple = (), folders: tuple = ("ipadapter", "controlnet")):
    """A running :func:`faceid_server` over ``base`` with ``files`` under ``models/`` (``{relative path: cached
    file to link | writer called with the path}``), a tiny insightface pack named ``pack`` and the person / group
    photos in ``input/``; ``base`` (GB-sized adapter files) is deleted when the server is done."""
    from tools.devkit.comfy_host import import_host
    from tools.devkit.face_models import make_tiny_pack
    import_host()
    from support import comfy_files
    srv = faceid_server(base, extra_args, folders)
    try:
        for rel, source in files.items():
            if callable(source):
                source(base / "models" / rel)
            else:
                os.symlink(source, base / "models" / rel)
        make_tiny_pack(base / "models" / "insightface", pack)
        comfy_files.write_face_photos(base / "in", COLORS)
        with srv:
            yield srv
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from support import faceid_files as ff
    files = {"checkpoints/v1-5-pruned-emaonly.safetensors": ff.cached_full_size("checkpoint"),
             "controlnet/control_v11p_sd15_openpose.pth": ff.cached_full_size("controlnet"),
             "ipadapter/ip-adapter-faceid_sd15.bin": lambda path: ff.write_bin(path, ff.faceid_parts("faceid"))}
    with serving_models(tmp_path_factory.mktemp("comfy_faceid"), files, "buffalo_l") as srv:
        yield srv


def shrink(prompt: dict, height: int = 64) -> dict:
    """The shared test-size graph; Pose from Image uses the offline faces method (controlnet-aux is optional)."""
    p = shrink_graph(prompt, height)
    for node in p.values():
        if node["class_type"] == "InstantFamilyPoseFromImage":
            node["inputs"]["method"] = "faces (insightface)"
    return p


def saved_image(srv, entry) -> np.ndarray:
    """The saved PNG of a finished prompt (success required; 64 px high)."""
    assert entry.get("status", {}).get("status_str") == "success", (entry.get("status"), srv.log()[-3000:])
    images = [i for out in entry["outputs"].values() for i in out.get("images", []) if i["type"] == "output"]
    assert images, entry["outputs"]
    with Image.open(srv.base / "out" / images[0].get("subfolder", "") / images[0]["filename"]) as im:
        assert im.size[1] == 64
        return np.asarray(im).astype(np.int16)


def of_class(prompt, cls):
    return [k for k, v in prompt.items() if v["class_type"] == cls]


def test_faceid_workflows_agree_with_object_info_and_are_templates(server):
    from tools.devkit.workflow_format import input_specs, ui_to_api
    info = server.get("/object_info")
    assert set(FACEID_WORKFLOWS) == {"faceid_2_people_pose_from_photo", "faceid_4_people_template",
                                     "faceid_plusv2_2_people_pose_from_photo"}
    assert set(FACEID_WORKFLOWS) <= set(server.get("/workflow_templates").get("ComfyUI-InstantFamily", []))
    for name in FACEID_WORKFLOWS:
        with open(WORKFLOWS_DIR / f"{name}.json") as f:
            assert ui_to_api(json.load(f), info) == load_twin(name), name
        prompt = load_twin(name)
        for nid, node in prompt.items():
            for key, spec, required in input_specs(info[node["class_type"]]):
                if required:
                    assert node["inputs"].get(key) is not None, (name, nid, key)
        cn = prompt[of_class(prompt, "ControlNetLoader")[0]]["inputs"]["control_net_name"]
        assert cn == "control_v11p_sd15_openpose.pth"
        ptm = prompt[of_class(prompt, "InstantFamilyPoseToMasks")[0]]["inputs"]
        assert ptm["control_image"].startswith("OpenPose")  # no slot circles for the stock ControlNet
        cna = prompt[of_class(prompt, "ControlNetApplyAdvanced")[0]]["inputs"]
        assert cna["image"] == [of_class(prompt, "InstantFamilyPoseToMasks")[0], 0]
        fid = prompt[of_class(prompt, "InstantFamilyFaceIDLoader")[0]]["inputs"]
        assert ("plusv2" in fid["ipadapter_file"]) == ("plusv2" in name)
        assert bool(of_class(prompt, "CLIPVisionLoader")) == ("plusv2" in name)


def with_latent_output(prompt: dict, prefix: str) -> dict:
    """The prompt plus the stock SaveLatent on the sampler's output (random weights decode to a saturated image,
    so effects are compared on the latent)."""
    p = copy.deepcopy(prompt)
    p["990"] = {"class_type": "SaveLatent", "inputs": {"samples": [of_class(p, "KSampler")[0], 0],
                                                        "filename_prefix": f"latents/{prefix}"}}
    return p


def saved_latent(srv, prefix: str):
    from safetensors.torch import load_file
    files = sorted((srv.base / "out" / "latents").glob(f"{prefix}_*.latent"))
    assert files, list((srv.base / "out").rglob("*"))
    return load_file(str(files[-1]))["latent_tensor"]


@pytest.mark.parametrize("name", RUN)
def test_faceid_workflow_generates_an_image_and_the_identities_act(server, name):
    import torch
    prompt = with_latent_output(shrink(load_twin(name)), f"{name}_on")
    saved_image(server, server.run(prompt))
    on = saved_latent(server, f"{name}_on")
    assert torch.isfinite(on).all()
    if name != RUN[0]:  # one comparison is enough (each full-size run costs minutes on a loaded 2-core box)
        return
    off = with_latent_output(shrink(load_twin(name)), f"{name}_off")
    off[of_class(off, "ApplyInstantFamilyFaceID")[0]]["inputs"]["weight"] = 0.0
    saved_image(server, server.run(off))
    # the FaceID term changes the result (the LoRA is identical in both runs)
    assert (saved_latent(server, f"{name}_off") - on).abs().max() > 1e-4


def test_bad_faceid_inputs_are_node_errors(server, tmp_path):
    from tools.devkit.comfy_server import execution_error
    prompt = shrink(load_twin("faceid_2_people_pose_from_photo"))
    bad = copy.deepcopy(prompt)
    bad[of_class(bad, "ApplyInstantFamilyFaceID")[0]]["inputs"]["identity_weights"] = "1, 2, 3"
    err = execution_error(server.run(bad))
    assert err is not None and "identity_weights: 3 weights for 2 identities" in err["exception_message"], err
