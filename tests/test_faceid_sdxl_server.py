"""FaceID SDXL end to end over HTTP, at full size: every bundled SDXL FaceID workflow runs in a real ComfyUI server
(``--cpu --bf16-unet``) on files in the published layouts, and reversing the identity photos changes the result.

Files (random values, generated at test time, cached in ``~/.cache/instantfamily/fixtures``, never committed;
``tests/support/sdxl_files.py``): ``sd_xl_base_1.0.safetensors`` (SGM single file, fp16: UNet, both text encoders,
VAE), ``OpenPoseXL2.safetensors`` (thibaud: diffusers keys, FP32) and the xinsir OpenPose ControlNet (diffusers
keys, FP16), both through the stock ControlNetLoader; ``ip-adapter-faceid_sdxl.bin`` in the published layout (fp16,
rank-128 LoRA embedded); a tiny insightface pack named ``buffalo_l``. Images are 64 px high, 2 steps.

This is the suite's one full-size SDXL test: the server's peak resident memory is read from ``/proc`` and printed
(docs/testing.md states the figure); it must stay under 20 GiB, and is meant to stay under 16 GiB.
"""

from __future__ import annotations

import copy

import pytest

from tools.devkit.comfy_host import HOW_TO_PROVIDE, find_comfyui
from tools.devkit.workflow_format import WORKFLOWS_DIR, load_twin

pytestmark = pytest.mark.skipif(find_comfyui() is None, reason=HOW_TO_PROVIDE)

SDXL_WORKFLOWS = sorted(p.stem for p in WORKFLOWS_DIR.glob("sdxl_faceid_*.json"))
COLORS = [(0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]
PEAK_LIMIT_GIB = 20.0
peak = {}


def vm_hwm_gib(proc) -> float:
    """The server's peak resident memory (GiB), read while it still runs."""
    if proc.poll() is not None:
        raise AssertionError(f"the ComfyUI server ended early (exit code {proc.returncode}; -9 = killed, e.g. by "
                             "the kernel's OOM killer: the machine ran out of memory)")
    with open(f"/proc/{proc.pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2 ** 20
    raise AssertionError("no VmHWM in /proc status")


@pytest.fixture(scope="module", params=SDXL_WORKFLOWS)
def server(request, tmp_path_factory):
    """One fresh server per workflow (``--cpu --bf16-unet``), so that the peak is one workflow's, not the sum of
    two workflows' models held in ComfyUI's cache."""
    from support import faceid_files as ff
    from support import sdxl_files as sx
    from test_faceid_server import serving_models
    cached = {k: sx.cached_sdxl(k) for k in ("checkpoint", "openpose_thibaud", "openpose_xinsir")}
    files = {"checkpoints/sd_xl_base_1.0.safetensors": cached["checkpoint"],
             "controlnet/OpenPoseXL2.safetensors": cached["openpose_thibaud"],
             "controlnet/xinsir-openpose-sdxl-1.0.safetensors": cached["openpose_xinsir"],
             "ipadapter/ip-adapter-faceid_sdxl.bin": lambda path: ff.write_bin(path, ff.faceid_parts("sdxl"))}
    # a GB-sized adapter file per server: gone before the next one
    with serving_models(tmp_path_factory.mktemp("comfy_faceid_sdxl"), files, "buffalo_l", ("--bf16-unet",)) as srv:
        srv.workflow = request.param
        yield srv
        peak[request.param] = vm_hwm_gib(srv.proc)
        print(f"\nFaceID SDXL server ({request.param}): peak resident memory {peak[request.param]:.2f} GiB")
        assert peak[request.param] < PEAK_LIMIT_GIB


def sdxl_prompt(name: str, prefix: str) -> dict:
    """The bundled API twin ``name``, shrunk to the test size (64 px high), 2 steps, its latent saved."""
    from test_faceid_server import of_class, shrink, with_latent_output
    p = with_latent_output(shrink(load_twin(name)), prefix)
    ks = p[of_class(p, "KSampler")[0]]["inputs"]
    ks["steps"] = 2
    return p


def test_sdxl_workflow_is_a_listed_template_for_sdxl_files(server):
    from test_faceid_server import of_class
    assert SDXL_WORKFLOWS == ["sdxl_faceid_2_people_pose_from_photo", "sdxl_faceid_4_people_template"]
    assert server.workflow in server.get("/workflow_templates").get("ComfyUI-InstantFamily", [])
    p = load_twin(server.workflow)
    assert p[of_class(p, "CheckpointLoaderSimple")[0]]["inputs"]["ckpt_name"] == "sd_xl_base_1.0.safetensors"
    assert p[of_class(p, "InstantFamilyFaceIDLoader")[0]]["inputs"]["ipadapter_file"] == "ip-adapter-faceid_sdxl.bin"
    lat = p[of_class(p, "EmptyLatentImage")[0]]["inputs"]
    ptm = p[of_class(p, "InstantFamilyPoseToMasks")[0]]["inputs"]
    assert lat["height"] == ptm["height"] == 1024 and lat["width"] == ptm["width"] >= 1024


def runs_and_reversing_the_photos_changes_the_latent(server, name: str, people: int) -> None:
    """Run workflow ``name`` (shrunk, 2 steps) with its photos as bundled, then with the person photos reversed:
    both succeed with finite latents, and the reversed one differs."""
    import torch
    from test_faceid_server import of_class, saved_image, saved_latent
    saved_image(server, server.run(sdxl_prompt(name, f"{name}_on"), timeout=1500))
    forward = saved_latent(server, f"{name}_on")
    assert torch.isfinite(forward).all()
    p = sdxl_prompt(name, f"{name}_reversed")
    photos = [nid for nid in of_class(p, "LoadImage") if p[nid]["inputs"]["image"].startswith("person_")]
    assert len(photos) == people
    names = [p[nid]["inputs"]["image"] for nid in photos]
    for nid, image in zip(photos, names[::-1]):
        p[nid]["inputs"]["image"] = image
    saved_image(server, server.run(copy.deepcopy(p), timeout=1500))
    reversed_ = saved_latent(server, f"{name}_reversed")
    assert torch.isfinite(reversed_).all() and (forward - reversed_).abs().max() > 1e-4


def test_sdxl_workflow_runs_at_full_size_and_reversing_the_photos_changes_the_image(server):
    people = {"sdxl_faceid_2_people_pose_from_photo": 2, "sdxl_faceid_4_people_template": 4}[server.workflow]
    runs_and_reversing_the_photos_changes_the_latent(server, server.workflow, people)
