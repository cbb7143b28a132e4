"""InstantID end to end over HTTP, at full size: every bundled InstantID workflow runs in a real ComfyUI server
(``--cpu --bf16-unet``) on files in the published layouts, and reversing the identity photos changes the result.

Files (random values, generated at test time, never committed): ``sd_xl_base_1.0.safetensors`` (SGM single file,
fp16; cached), InstantID's IdentityNet (diffusers keys, fp16, ``{"format": "pt"}`` metadata: the published
2,502,139,136 B exactly; cached; through the stock ControlNetLoader) and ``ip-adapter.bin`` (FP32 nested pickle, the
published layout, 12.8 KB under the published size; ``tests/support/instantid_files.py``), a tiny insightface pack
named ``antelopev2``. Images are 64 px high, 2 steps.

The three workflows share every model file, so one server runs them all and ComfyUI's cache keeps one copy of each;
its peak resident memory is read from ``/proc`` and printed (docs/testing.md states the figure); it must stay under
20 GiB. Run alone: never beside the FaceID SDXL server test (pytest runs modules one after the other).
"""

from __future__ import annotations

import pytest

from tools.devkit.comfy_host import HOW_TO_PROVIDE, find_comfyui
from tools.devkit.workflow_format import WORKFLOWS_DIR, load_twin

pytestmark = pytest.mark.skipif(find_comfyui() is None, reason=HOW_TO_PROVIDE)

INSTANTID_WORKFLOWS = sorted(p.stem for p in WORKFLOWS_DIR.glob("instantid_*.json"))
PEOPLE = {"instantid_2_people_pose_from_photo": 2, "instantid_2_people_template": 2, "instantid_4_people_template": 4}
COLORS = [(0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]
IDENTITYNET = "instantid-identitynet-sdxl.safetensors"
PEAK_LIMIT_GIB = 20.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from support import instantid_files as idf
    from support import sdxl_files as sx
    from test_faceid_sdxl_server import vm_hwm_gib
    from test_faceid_server import serving_models
    files = {"checkpoints/sd_xl_base_1.0.safetensors": sx.cached_sdxl("checkpoint"),
             f"controlnet/{IDENTITYNET}": sx.cached_sdxl("identitynet"),
             "instantid/ip-adapter.bin": lambda path: idf.write_bin(path, idf.instantid_parts())}  # 1.7 GB
    with serving_models(tmp_path_factory.mktemp("comfy_instantid"), files, "antelopev2", ("--bf16-unet",),
                        folders=("instantid", "controlnet")) as srv:
        yield srv
        peak = vm_hwm_gib(srv.proc)
        print(f"\nInstantID server (all {len(INSTANTID_WORKFLOWS)} workflows): peak resident memory {peak:.2f} GiB")
        assert peak < PEAK_LIMIT_GIB


def test_instantid_workflows_are_listed_templates_for_the_published_files(server):
    from test_faceid_server import of_class
    assert INSTANTID_WORKFLOWS == sorted(PEOPLE)
    listed = server.get("/workflow_templates").get("ComfyUI-InstantFamily", [])
    for name in INSTANTID_WORKFLOWS:
        assert name in listed
        p = load_twin(name)
        assert p[of_class(p, "CheckpointLoaderSimple")[0]]["inputs"]["ckpt_name"] == "sd_xl_base_1.0.safetensors"
        assert p[of_class(p, "InstantFamilyInstantIDLoader")[0]]["inputs"]["instantid_file"] == "ip-adapter.bin"
        assert p[of_class(p, "ControlNetLoader")[0]]["inputs"]["control_net_name"] == IDENTITYNET
        assert {p[n]["inputs"]["pack"] for n in of_class(p, "InstantFamilyFaceAnalysisLoader")} == {"antelopev2"}
        assert len(of_class(p, "InstantFamilyEncodeIdentity")) == PEOPLE[name]
        (ptm,) = [p[n]["inputs"] for n in of_class(p, "InstantFamilyPoseToMasks")]
        assert ptm["control_image"].startswith("InstantID")
        (app,) = [p[n]["inputs"] for n in of_class(p, "ApplyInstantFamilyInstantID")]
        assert app["ip_weight"] == app["cn_strength"] == 0.8 and app["noise"] == 0.0  # the reference's usage
        assert app["kps_image"] == [of_class(p, "InstantFamilyPoseToMasks")[0], 0]
        ks = p[of_class(p, "KSampler")[0]]["inputs"]
        assert ks["model"][0] == ks["positive"][0] == ks["negative"][0] == of_class(p, "ApplyInstantFamilyInstantID")[0]
        assert ks["cfg"] == 5.0
        lat = p[of_class(p, "EmptyLatentImage")[0]]["inputs"]
        assert lat["height"] == ptm["height"] == 1024 and lat["width"] == ptm["width"] >= 1024


@pytest.mark.parametrize("name", sorted(PEOPLE))
def test_instantid_workflow_runs_at_full_size_and_reversing_the_photos_changes_the_image(server, name):
    from test_faceid_sdxl_server import runs_and_reversing_the_photos_changes_the_latent
    runs_and_reversing_the_photos_changes_the_latent(server, name, PEOPLE[name])
