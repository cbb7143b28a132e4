"""Builds the bundled workflows: API-format prompts defined here → ``example_workflows/api/<name>.json``, their UI
(LiteGraph) twins ``example_workflows/<name>.json`` that ComfyUI lists as this pack's templates, and a ``.jpg``
thumbnail of each (its pose with slot circles beside the tinted mask preview, drawn by the pack's own code).

Every UI workflow gets the same readable layout (:func:`layout_for`): groups "People", "Pose and masks", "Model",
"Generate" in columns that follow the data, and a note naming each file to download, its folder, and what to
change first (:func:`note_for`). New templates get it too: a node class without a group is an error here.

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
from tools.devkit.workflow_format import API_DIR, WORKFLOWS_DIR, api_to_ui  # noqa: E402

COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight"}
CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
SDXL_CHECKPOINT = "sd_xl_base_1.0.safetensors"
INSTANTFAMILY = "instantfamily_sd15.safetensors"


def _graph():
    """An empty API prompt and its ``add(class_type, **inputs) -> node id``."""
    p: dict = {}

    def add(cls, **inputs):
        nid = str(len(p) + 1)
        p[nid] = {"class_type": cls, "inputs": inputs}
        return nid
    return p, add


def _people(add, n: int, photo: bool, pack: str, control_image: str, height: int = 512,
            checkpoint: str = CHECKPOINT):
    """What every mode shares: the checkpoint, face analysis, one Encode Identity per person, Pose to Masks (from a
    group photo or a bundled template, at ``height`` px and the template's aspect) and the two prompts. Returns
    (width, ckpt, ids, ptm, pos, neg)."""
    width = height
    if not photo:
        with open(ROOT / "pose_templates" / f"family_{n}.json") as f:
            canvas = json.load(f)[0]
        width = 8 * round(canvas["canvas_width"] * height / canvas["canvas_height"] / 8)
    ckpt = add("CheckpointLoaderSimple", ckpt_name=checkpoint)
    fa = add("InstantFamilyFaceAnalysisLoader", pack=pack, provider="auto", det_size=640)
    ids = None
    for i in range(n):
        img = add("LoadImage", image=f"person_{i + 1}.png")
        kw = dict(face_analysis=[fa, 0], image=[img, 0], name=f"person {i + 1}", on_no_face="error")
        if ids:
            kw["identities"] = [ids, 0]
        ids = add("InstantFamilyEncodeIdentity", **kw)
    masks_kw = dict(identities=[ids, 0], width=width, height=height, margin=0.25, identity_order="auto",
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


def _sample_and_save(add, model, positive, negative, width: int, ckpt, ptm, prefix: str, height: int = 512,
                     cfg: float = 6.0) -> None:
    """KSampler → VAEDecode → SaveImage, plus a preview of the masks."""
    lat = add("EmptyLatentImage", width=width, height=height, batch_size=1)
    ks = add("KSampler", model=model, seed=42, steps=30, cfg=cfg, sampler_name="dpmpp_2m", scheduler="karras",
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
FACEID_FILES = {"faceid": "ip-adapter-faceid_sd15.bin", "plusv2": "ip-adapter-faceid-plusv2_sd15.bin",
                "sdxl": "ip-adapter-faceid_sdxl.bin"}
OPENPOSE_CONTROLNET = "control_v11p_sd15_openpose.pth"
SDXL_OPENPOSE = {"thibaud": "OpenPoseXL2.safetensors", "xinsir": "xinsir-openpose-sdxl-1.0.safetensors"}
CONTROLNET_SOURCES = {
    OPENPOSE_CONTROLNET: "lllyasviel/ControlNet-v1-1",
    SDXL_OPENPOSE["thibaud"]: "thibaud/controlnet-openpose-sdxl-1.0",
    SDXL_OPENPOSE["xinsir"]: "xinsir/controlnet-openpose-sdxl-1.0: its `diffusion_pytorch_model.safetensors`, "
                             "renamed",
}
CLIP_VISION_H = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"


def faceid_prompt(n: int, photo: bool, variant: str = "faceid", openpose: str = OPENPOSE_CONTROLNET) -> dict:
    """N people with a published FaceID file: Encode Identity (buffalo_l) → Pose to Masks (plain OpenPose image) →
    Apply InstantFamily FaceID on the model; the pose through the stock ControlNetLoader + ControlNetApplyAdvanced
    with a public OpenPose ControlNet (SD1.5 at 512 px; SDXL files at 1024 px, CFG 5)."""
    p, add = _graph()
    sdxl = variant.startswith("sdxl")
    height = 1024 if sdxl else 512
    width, ckpt, ids, ptm, pos, neg = _people(add, n, photo, "buffalo_l", CONTROL_OPENPOSE, height,
                                              SDXL_CHECKPOINT if sdxl else CHECKPOINT)
    fid = add("InstantFamilyFaceIDLoader", ipadapter_file=FACEID_FILES[variant], plus_version="auto (file name)",
              lora="embedded (from the adapter file)")
    apply_kw = dict(model=[ckpt, 0], faceid=[fid, 0], identities=[ids, 0], masks=[ptm, 1], weight=1.0,
                    identity_weights="", lora_strength=1.0, start_at=0.0, end_at=1.0, s_scale=1.0)
    if variant == "plusv2":
        apply_kw["clip_vision"] = [add("CLIPVisionLoader", clip_name=CLIP_VISION_H), 0]
    app = add("ApplyInstantFamilyFaceID", **apply_kw)
    cn = add("ControlNetLoader", control_net_name=openpose)
    cna = add("ControlNetApplyAdvanced", positive=[pos, 0], negative=[neg, 0], control_net=[cn, 0],
              image=[ptm, 0], strength=1.0 if not sdxl else 0.8, start_percent=0.0, end_percent=1.0)
    _sample_and_save(add, [app, 0], [cna, 0], [cna, 1], width, ckpt, ptm,
                     "InstantFamily_FaceID_SDXL" if sdxl else "InstantFamily_FaceID", height, 5.0 if sdxl else 6.0)
    return p


FACEID_WORKFLOWS = {
    "faceid_2_people_pose_from_photo": (2, True, "faceid"),
    "faceid_4_people_template": (4, False, "faceid"),
    "faceid_plusv2_2_people_pose_from_photo": (2, True, "plusv2"),
    "sdxl_faceid_2_people_pose_from_photo": (2, True, "sdxl", SDXL_OPENPOSE["thibaud"]),
    "sdxl_faceid_4_people_template": (4, False, "sdxl", SDXL_OPENPOSE["xinsir"]),
}


# InstantID mode (InstantX/InstantID's ip-adapter.bin + IdentityNet, SDXL)
CONTROL_INSTANTID = "InstantID: face keypoints (5 per face)"
INSTANTID_FILE = "ip-adapter.bin"
IDENTITYNET = "instantid-identitynet-sdxl.safetensors"
CONTROLNET_SOURCES[IDENTITYNET] = ("InstantX/InstantID: its `ControlNetModel/diffusion_pytorch_model.safetensors`, "
                                   "renamed")


def instantid_prompt(n: int, photo: bool) -> dict:
    """N people with InstantID: Encode Identity (antelopev2, the pack InstantID was trained on) → Pose to Masks (the
    keypoint image of all faces) → Apply InstantFamily InstantID (masked UNet term on the model, one masked
    IdentityNet on both prompts) at 1024 px, CFG 5, ip_weight = cn_strength = 0.8 (the reference's usage)."""
    p, add = _graph()
    width, ckpt, ids, ptm, pos, neg = _people(add, n, photo, "antelopev2", CONTROL_INSTANTID, 1024, SDXL_CHECKPOINT)
    iid = add("InstantFamilyInstantIDLoader", instantid_file=INSTANTID_FILE)
    cn = add("ControlNetLoader", control_net_name=IDENTITYNET)
    app = add("ApplyInstantFamilyInstantID", model=[ckpt, 0], instantid=[iid, 0], control_net=[cn, 0],
              identities=[ids, 0], masks=[ptm, 1], kps_image=[ptm, 0], positive=[pos, 0], negative=[neg, 0],
              ip_weight=0.8, cn_strength=0.8, identity_weights="", start_at=0.0, end_at=1.0, noise=0.0)
    _sample_and_save(add, [app, 0], [app, 1], [app, 2], width, ckpt, ptm, "InstantFamily_InstantID", 1024, 5.0)
    return p


INSTANTID_WORKFLOWS = {
    "instantid_2_people_pose_from_photo": (2, True),
    "instantid_2_people_template": (2, False),
    "instantid_4_people_template": (4, False),
}


GROUPS = (("People", 0, "#3f789e"), ("Pose and masks", 0, "#8A8"), ("Model", 1, "#b06634"), ("Generate", 2, "#a1309b"))
"""(title, band, colour): bands are columns left to right in data order; groups of one band stack downwards."""
GROUP_OF_CLASS = {
    "InstantFamilyFaceAnalysisLoader": "People", "InstantFamilyEncodeIdentity": "People",
    "InstantFamilyCombineIdentities": "People", "InstantFamilyLoadIdentities": "People",
    "InstantFamilyPoseFromImage": "Pose and masks", "InstantFamilyPoseToMasks": "Pose and masks",
    "PreviewImage": "Pose and masks",
    "CheckpointLoaderSimple": "Model", "InstantFamilyLoader": "Model", "InstantFamilyFaceIDLoader": "Model",
    "CLIPVisionLoader": "Model", "ControlNetLoader": "Model", "CLIPTextEncode": "Model",
    "InstantFamilyInstantIDLoader": "Model", "ApplyInstantFamilyInstantID": "Model",
    "ApplyInstantFamily": "Model", "ApplyInstantFamilyFaceID": "Model", "ControlNetApplyAdvanced": "Model",
    "EmptyLatentImage": "Generate", "KSampler": "Generate", "VAEDecode": "Generate", "SaveImage": "Generate",
}


def layout_for(prompt: dict) -> dict:
    """Cells for :func:`~tools.devkit.workflow_format.api_to_ui`: in "People" the face analysis on top, then one
    row per person (two people per row from three people on): photo, then its Encode Identity; in the other
    groups a node's column is its depth among its group's nodes, and a preview sits under the node it shows."""
    cells: dict = {}
    people = [nid for nid in prompt if prompt[nid]["class_type"] == "InstantFamilyEncodeIdentity"]
    per_row = 1 if len(people) <= 2 else 2
    for i, nid in enumerate(people):
        row, col = divmod(i, per_row)
        image = prompt[nid]["inputs"]["image"][0]
        cells[image] = ("People", 2 * col, row + 1)
        cells[nid] = ("People", 2 * col + 1, row + 1)
    group = {}
    for nid, node in prompt.items():
        if nid in cells:
            group[nid] = cells[nid][0]
        elif node["class_type"] == "LoadImage":
            group[nid] = "Pose and masks"  # photos of people are placed above; this one shows the pose
        elif node["class_type"] in GROUP_OF_CLASS:
            group[nid] = GROUP_OF_CLASS[node["class_type"]]
        else:
            raise ValueError(f"{node['class_type']}: no group for this node class; add it to GROUP_OF_CLASS")
    depth: dict = {}

    def col(nid):
        if nid not in depth:
            srcs = [v[0] for v in prompt[nid]["inputs"].values() if isinstance(v, list) and len(v) == 2
                    and isinstance(v[0], str) and group.get(v[0]) == group[nid]]
            depth[nid] = 1 + max((col(s) for s in srcs), default=-1)
        return depth[nid]
    used: dict = {}
    for nid in sorted(prompt, key=int):
        if nid in cells:
            continue
        node = prompt[nid]
        if node["class_type"] == "PreviewImage":
            continue
        c = 0 if node["class_type"] == "InstantFamilyFaceAnalysisLoader" else col(nid)
        key = (group[nid], c)
        cells[nid] = (group[nid], c, used.get(key, 0))
        used[key] = used.get(key, 0) + 1
    for nid, node in prompt.items():
        if node["class_type"] == "PreviewImage":  # under the node whose image it shows
            g, c, r = cells[node["inputs"]["images"][0]]
            cells[nid] = (g, c, used.get((g, c), r + 1))
            used[(g, c)] = cells[nid][2] + 1
    return {"groups": GROUPS, "cells": cells}


FOLDERS = {
    ("CheckpointLoaderSimple", "ckpt_name"): "`ComfyUI/models/checkpoints/`",
    ("InstantFamilyLoader", "checkpoint"): "`ComfyUI/models/instantfamily/` (nobody has released weights: train "
                                           "and export one, docs/training.md)",
    ("InstantFamilyFaceIDLoader", "ipadapter_file"): "`ComfyUI/models/ipadapter/` (h94/IP-Adapter-FaceID)",
    ("ControlNetLoader", "control_net_name"): "`ComfyUI/models/controlnet/` ({source})",
    ("CLIPVisionLoader", "clip_name"): "`ComfyUI/models/clip_vision/`",
    ("InstantFamilyInstantIDLoader", "instantid_file"): "`ComfyUI/models/instantid/` (InstantX/InstantID)",
    ("InstantFamilyFaceAnalysisLoader", "pack"): "`ComfyUI/models/insightface/models/{value}/` (the `.onnx` files "
                                                 "directly inside)",
}


def note_for(name: str, prompt: dict) -> str:
    """The workflow's Markdown note: what it does, each file to download and its folder (read from the loaders'
    widgets), the photos it expects, and what to change first."""
    files, photos = [], []
    for node in prompt.values():
        for (cls, key), folder in FOLDERS.items():
            if node["class_type"] == cls:
                value = node["inputs"][key]
                files.append(f"- **{value}** → {folder.format(value=value, source=CONTROLNET_SOURCES.get(value))}")
        if node["class_type"] == "LoadImage":
            photos.append(node["inputs"]["image"])
    people = _count_people(prompt)
    sdxl = any(n["class_type"] == "CheckpointLoaderSimple" and n["inputs"]["ckpt_name"] == SDXL_CHECKPOINT
               for n in prompt.values())
    classes = {n["class_type"] for n in prompt.values()}
    if "ApplyInstantFamilyInstantID" in classes:
        mode = "InstantID (its adapter and IdentityNet, both masked per person)"
    elif "ApplyInstantFamilyFaceID" in classes:
        mode = f"public IP-Adapter-FaceID {'SDXL ' if sdxl else ''}weights"
    else:
        mode = "an InstantFamily checkpoint"
    pose = ("the pose of `group_photo.png` (Pose from Image; `pip install controlnet-aux`, or set its method to "
            "*faces*)" if "group_photo.png" in photos else "a bundled pose template")
    lines = [f"## {name.replace('_', ' ')}", "",
             f"{people} people in one image with {mode}, placed by {pose}. Each person's face acts only inside "
             "their own mask (the preview in *Pose and masks*).", "", "**Download** (then run the doctor: "
             "`python custom_nodes/ComfyUI-InstantFamily/tools/doctor.py`):", *dict.fromkeys(files), "",
             "**Change first:** in *People*, pick one photo per person (" + ", ".join(
                 f"`{p}`" for p in photos if p.startswith("person_")) + " in `ComfyUI/input/`); list order = "
             "left to right in the pose. Then check the file names in *Model* and Queue."]
    return "\n".join(lines)


def _count_people(prompt: dict) -> int:
    return sum(node["class_type"] == "InstantFamilyEncodeIdentity" for node in prompt.values())


def render_thumbnail(prompt: dict, height: int = 200):
    """The thumbnail (H×W×3 uint8): the control image this workflow's Pose to Masks makes above its mask preview,
    by the pack's own drawing code; for a pose from a photo, the bundled template of as many people, captioned."""
    import numpy as np
    from instantfamily_core.kps import draw_kps_image
    from instantfamily_core.pose import assign_slots, parse_pose
    from instantfamily_core.render import draw_caption, draw_control_image, draw_openpose_image, draw_preview
    (ptm,) = [n["inputs"] for n in prompt.values() if n["class_type"] == "InstantFamilyPoseToMasks"]
    people = _count_people(prompt)
    from_photo = not ptm["template"].endswith(".json")
    with open(ROOT / "pose_templates" / (f"family_{people}.json" if from_photo else ptm["template"])) as f:
        data = json.load(f)
    width = max(64, 8 * round(data[0]["canvas_width"] * height / data[0]["canvas_height"] / 8))
    slots = assign_slots(parse_pose(data).scaled(width, height), people, None, ptm["margin"])
    style = ptm.get("control_image", CONTROL_CIRCLES)
    draw = {CONTROL_OPENPOSE: lambda: draw_openpose_image(slots.frame), CONTROL_INSTANTID: lambda: draw_kps_image(slots),
            CONTROL_CIRCLES: lambda: draw_control_image(slots)}
    control = draw[style]()
    preview = draw_preview(control, slots)
    if from_photo:
        control = draw_caption(control, "pose from your photo")
    return np.concatenate([control, np.full((8, width, 3), 255, np.uint8), preview], axis=0)  # near-square cards


def write_thumbnail(path: Path, image) -> None:
    import io
    from PIL import Image
    from instantfamily_core.fileio import write_bytes_atomic
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=88)
    write_bytes_atomic(path, buf.getvalue())


def all_prompts() -> dict:
    prompts = {name: family_prompt(n, photo) for name, (n, photo) in WORKFLOWS.items()}
    prompts.update({name: faceid_prompt(*spec) for name, spec in FACEID_WORKFLOWS.items()})
    prompts.update({name: instantid_prompt(*spec) for name, spec in INSTANTID_WORKFLOWS.items()})
    return prompts


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp, ComfyServer(Path(tmp)) as server:
        info = server.get("/object_info")
    API_DIR.mkdir(parents=True, exist_ok=True)
    for name, prompt in all_prompts().items():
        ui = api_to_ui(prompt, info, layout=layout_for(prompt), note=note_for(name, prompt))
        for path, data in ((API_DIR / f"{name}.json", prompt), (WORKFLOWS_DIR / f"{name}.json", ui)):
            write_text_atomic(path, json.dumps(data, indent=1) + "\n")
        write_thumbnail(WORKFLOWS_DIR / f"{name}.jpg", render_thumbnail(prompt))
        print("wrote", name)


if __name__ == "__main__":
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    main()
