"""Builds the bundled workflows: API-format prompts defined here → ``workflows/api/<name>.json`` and their UI
(LiteGraph) twins ``workflows/<name>.json`` that the ComfyUI frontend loads as templates.

Needs a ComfyUI host (for ``/object_info``): ``python tools/build_workflows.py`` from the repository root.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

if not __package__:  # run as a file, not as python -m tools.build_workflows
    import _bootstrap  # noqa: F401  (tools/_bootstrap.py: the repository root first on sys.path)

ROOT = Path(__file__).resolve().parents[1]

from instantfamily_core.fileio import write_text_atomic  # noqa: E402
from tools.devkit.comfy_server import ComfyServer  # noqa: E402
from tools.devkit.workflow_format import api_to_ui  # noqa: E402

COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight"}
CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
INSTANTFAMILY = "instantfamily_sd15.safetensors"


def _graph():
    """An empty API prompt and its ``add(class_type, **inputs) -> node id``."""
    p: dict = {}

    def add(cls, **inputs):
        nid = str(len(p) + 1)
        p[nid] = {"class_type": cls, "inputs": inputs}
        return nid
    return p, add


def _people(add, n: int, photo: bool, pack: str, control_image: str):
    """What both modes share: the checkpoint, face analysis, one Encode Identity per person, Pose to Masks (from a
    group photo or a bundled template) and the two prompts. Returns (width, ckpt, ids, ptm, pos, neg)."""
    width = 512
    if not photo:
        with open(ROOT / "pose_templates" / f"family_{n}.json") as f:
            width = json.load(f)[0]["canvas_width"]
    ckpt = add("CheckpointLoaderSimple", ckpt_name=CHECKPOINT)
    fa = add("InstantFamilyFaceAnalysisLoader", pack=pack, provider="auto", det_size=640)
    ids = None
    for i in range(n):
        img = add("LoadImage", image=f"person_{i + 1}.png")
        kw = dict(face_analysis=[fa, 0], image=[img, 0], name=f"person {i + 1}", on_no_face="error")
        if ids:
            kw["identities"] = [ids, 0]
        ids = add("InstantFamilyEncodeIdentity", **kw)
    masks_kw = dict(identities=[ids, 0], width=width, height=512, margin=0.25, identity_order="auto",
                    control_image=control_image)
    if photo:
        photo_id = add("LoadImage", image="group_photo.png")
        kp = add("InstantFamilyPoseFromImage", image=[photo_id, 0], method="openpose (controlnet-aux)",
                 include_face=True, face_analysis=[fa, 0])
        ptm = add("InstantFamilyPoseToMasks", template="none (use pose_keypoint)", pose_keypoint=[kp, 0], **masks_kw)
    else:
        ptm = add("InstantFamilyPoseToMasks", template=f"family_{n}.json", **masks_kw)
    word = COUNT_WORDS[n]
    pos = add("CLIPTextEncode", clip=[ckpt, 1],
              text=f"{word} people, a family photo of {word} people standing together in a park, natural light")
    neg = add("CLIPTextEncode", clip=[ckpt, 1], text="blurry, lowres, deformed face, extra people")
    return width, ckpt, ids, ptm, pos, neg


def _sample_and_save(add, model, positive, negative, width: int, ckpt, ptm, prefix: str) -> None:
    """KSampler → VAEDecode → SaveImage, plus a preview of the masks."""
    lat = add("EmptyLatentImage", width=width, height=512, batch_size=1)
    ks = add("KSampler", model=model, seed=42, steps=30, cfg=6.0, sampler_name="dpmpp_2m", scheduler="karras",
             positive=positive, negative=negative, latent_image=[lat, 0], denoise=1.0)
    dec = add("VAEDecode", samples=[ks, 0], vae=[ckpt, 2])
    add("SaveImage", images=[dec, 0], filename_prefix=prefix)
    add("PreviewImage", images=[ptm, 2])


def family_prompt(n: int, photo: bool) -> dict:
    p, add = _graph()
    width, ckpt, ids, ptm, pos, neg = _people(add, n, photo, "antelopev2", CONTROL_CIRCLES)
    ifl = add("InstantFamilyLoader", checkpoint=INSTANTFAMILY)
    app = add("ApplyInstantFamily", model=[ckpt, 0], instantfamily=[ifl, 0], identities=[ids, 0],
              pose_image=[ptm, 0], masks=[ptm, 1], positive=[pos, 0], negative=[neg, 0], weight=1.0,
              identity_weights="", controlnet_strength=1.0, start_at=0.0, end_at=1.0, mask_mode="checkpoint")
    _sample_and_save(add, [app, 0], [app, 1], [app, 2], width, ckpt, ptm, "InstantFamily")
    return p


WORKFLOWS = {
    "instantfamily_2_identities_pose_from_photo": (2, True),
    "instantfamily_4_identities_template": (4, False),
    "instantfamily_7_identities_template": (7, False),
}

# Public-weights mode (IP-Adapter-FaceID + the public OpenPose ControlNet)
CONTROL_CIRCLES = "skeleton + slot circles (InstantFamily)"
CONTROL_OPENPOSE = "OpenPose: skeleton + face points (public weights)"
FACEID_FILES = {"faceid": "ip-adapter-faceid_sd15.bin", "plusv2": "ip-adapter-faceid-plusv2_sd15.bin"}
OPENPOSE_CONTROLNET = "control_v11p_sd15_openpose.pth"
CLIP_VISION_H = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"


def faceid_prompt(n: int, photo: bool, variant: str = "faceid") -> dict:
    """N people with a published FaceID file: Encode Identity (buffalo_l) → Pose to Masks (plain OpenPose image) →
    Apply InstantFamily FaceID on the model; the pose through the stock ControlNetLoader + ControlNetApplyAdvanced
    with control_v11p_sd15_openpose."""
    p, add = _graph()
    width, ckpt, ids, ptm, pos, neg = _people(add, n, photo, "buffalo_l", CONTROL_OPENPOSE)
    fid = add("InstantFamilyFaceIDLoader", ipadapter_file=FACEID_FILES[variant], plus_version="auto (file name)",
              lora="embedded (from the adapter file)")
    apply_kw = dict(model=[ckpt, 0], faceid=[fid, 0], identities=[ids, 0], masks=[ptm, 1], weight=1.0,
                    identity_weights="", lora_strength=1.0, start_at=0.0, end_at=1.0, s_scale=1.0)
    if variant == "plusv2":
        apply_kw["clip_vision"] = [add("CLIPVisionLoader", clip_name=CLIP_VISION_H), 0]
    app = add("ApplyInstantFamilyFaceID", **apply_kw)
    cn = add("ControlNetLoader", control_net_name=OPENPOSE_CONTROLNET)
    cna = add("ControlNetApplyAdvanced", positive=[pos, 0], negative=[neg, 0], control_net=[cn, 0],
              image=[ptm, 0], strength=1.0, start_percent=0.0, end_percent=1.0)
    _sample_and_save(add, [app, 0], [cna, 0], [cna, 1], width, ckpt, ptm, "InstantFamily_FaceID")
    return p


FACEID_WORKFLOWS = {
    "faceid_2_people_pose_from_photo": (2, True, "faceid"),
    "faceid_4_people_template": (4, False, "faceid"),
    "faceid_plusv2_2_people_pose_from_photo": (2, True, "plusv2"),
}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp, ComfyServer(Path(tmp)) as server:
        info = server.get("/object_info")
    (ROOT / "workflows" / "api").mkdir(parents=True, exist_ok=True)
    prompts = {name: family_prompt(n, photo) for name, (n, photo) in WORKFLOWS.items()}
    prompts.update({name: faceid_prompt(*spec) for name, spec in FACEID_WORKFLOWS.items()})
    for name, prompt in prompts.items():
        for path, data in ((ROOT / "workflows" / "api" / f"{name}.json", prompt),
                           (ROOT / "workflows" / f"{name}.json", api_to_ui(prompt, info))):
            write_text_atomic(path, json.dumps(data, indent=1) + "\n")
        print("wrote", name)


if __name__ == "__main__":
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    main()
