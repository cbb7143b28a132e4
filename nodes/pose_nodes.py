"""Pose → control image with slot circles, identity masks and a preview; pose templates; pose from a photo."""

from __future__ import annotations

import json
import logging
import os

import comfy.model_management
import folder_paths
import torch
from comfy.utils import ProgressBar
from nodes import MAX_RESOLUTION  # ComfyUI's nodes.py (this package is <pack>.nodes, never the top-level name)

from instantfamily_core.errors import MaskError, ModelFileError, OptionError, PoseError
from instantfamily_core.identity import skipped_slots
from instantfamily_core.masks import resize_masks, validate_masks
from instantfamily_core.pose import (DEFAULT_MARGIN, assign_slots, count_frames, parse_order, parse_pose,
                                     pose_from_faces, poses_from_controlnet_aux)
from instantfamily_core.kps import draw_kps_canvas, kps_for_slots
from instantfamily_core.render import draw_caption, draw_control_image, draw_openpose_image, draw_preview

from . import paths
from .convert import images_to_uint8, uint8_to_image
from .face_nodes import CATEGORY, FACE_ANALYSIS, IDENTITIES

logger = logging.getLogger(__name__)
TEMPLATES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pose_templates")
NO_TEMPLATE = "none (use pose_keypoint)"
CONTROL_STYLES = ("skeleton + slot circles (InstantFamily)", "OpenPose: skeleton + face points (public weights)",
                  "InstantID: face keypoints (5 per face)")


def template_names() -> list[str]:
    if not os.path.isdir(TEMPLATES_DIR):
        return []
    return sorted(f for f in os.listdir(TEMPLATES_DIR) if f.endswith(".json"))


def load_template(name: str):
    path = os.path.join(TEMPLATES_DIR, os.path.basename(name))
    if not os.path.isfile(path):
        raise OptionError(f"template: {name!r} not found in {TEMPLATES_DIR}; choose one of {template_names()}")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class PoseToMasks:
    DESCRIPTION = ("Assigns identity slots to the people of a pose (left to right, or identity_order = person "
                   "indices), draws the OpenPose control image with one coloured circle per slot, and makes one "
                   "face mask per identity (face box + margin). A skipped identity (Encode Identity, on_no_face = "
                   "skip) keeps its person but gets no circle and an empty mask. The preview shows masks and slot "
                   "numbers, and marks skipped slots. A pose with several frames: only the first is used (the "
                   "preview says so).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "MASK", "IMAGE")
    RETURN_NAMES = ("pose_image", "masks", "preview")
    OUTPUT_TOOLTIPS = ("the control image for the ControlNet (InstantFamily: skeletons + one circle per slot; "
                       "or stock OpenPose style)",
                       "one face mask per identity (N, height, width), in slot order",
                       "the control image with masks and slot numbers drawn on, to check the assignment")
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "identities": (IDENTITIES, {"tooltip": "from Encode/Combine Identities; list order = slot order"}),
            "template": ([NO_TEMPLATE] + template_names(), {"default": NO_TEMPLATE, "tooltip": (
                "a bundled pose from pose_templates/, used when no pose_keypoint is connected")}),
            "width": ("INT", {"default": 512, "min": 64, "max": MAX_RESOLUTION, "step": 8, "tooltip": (
                "width of the control image and masks; use the width of the generated image")}),
            "height": ("INT", {"default": 512, "min": 64, "max": MAX_RESOLUTION, "step": 8, "tooltip": (
                "height of the control image and masks; use the height of the generated image")}),
            "margin": ("FLOAT", {"default": DEFAULT_MARGIN, "min": 0.0, "max": 2.0, "step": 0.05, "tooltip": (
                "how much each face box grows on every side for its mask (0.25 = the paper's 25%)")}),
            "identity_order": ("STRING", {"default": "auto",
                                          "tooltip": "'auto' = left to right, or person indices like '2,0,1'"}),
        }, "optional": {
            "pose_keypoint": ("POSE_KEYPOINT", {"tooltip": "from an OpenPose/DWPose preprocessor; wins over "
                                                           "the template"}),
            "masks": ("MASK", {"tooltip": "one mask per identity, replaces the automatic face masks"}),
            "control_image": (list(CONTROL_STYLES), {"default": CONTROL_STYLES[0], "tooltip": (
                "slot circles: InstantFamily's ControlNet; OpenPose: for a stock OpenPose ControlNet (public-weights "
                "mode) — skeletons, face landmarks as white dots when the pose has them, no slot circles; InstantID: "
                "the IdentityNet's keypoint image — each identity's eyes, nose and mouth corners on one canvas")}),
        }}

    def run(self, identities, template, width, height, margin, identity_order, pose_keypoint=None, masks=None,
            control_image=None):
        if pose_keypoint is None:
            if template == NO_TEMPLATE:
                raise PoseError("pose_keypoint: connect a POSE_KEYPOINT input or choose a template")
            pose_keypoint = load_template(template)
        frame = parse_pose(pose_keypoint, name="pose_keypoint").scaled(width, height)
        frames = count_frames(pose_keypoint)
        note = None
        if frames > 1:  # one set of masks and one control image per run: say so instead of dropping silently
            note = f"pose: frame 1 of {frames} used"
            logger.warning("Pose to Masks: pose_keypoint holds %d frames; only the first is used (one control "
                           "image and one set of masks for every latent of the batch)", frames)
        skipped = skipped_slots(identities)
        slots = assign_slots(frame, len(identities), parse_order(identity_order), margin, empty=skipped)
        if masks is not None:
            user = validate_masks(masks, expected_count=len(identities), name="masks")
            if user.ndim == 4:  # Pose to Masks makes one (N, H, W) set: a batch of one is fine, more is ambiguous
                if user.shape[0] != 1:
                    raise MaskError(f"masks: expected (N, H, W) masks, one per identity; got a batch of "
                                    f"{user.shape[0]} sets {tuple(user.shape)}")
                user = user[0]
            out_masks = resize_masks(user, (height, width)).clone()
            out_masks[skipped] = 0.0  # a skipped identity acts nowhere
        else:
            out_masks = slots.masks()
        if control_image in (None, CONTROL_STYLES[0]):
            control = draw_control_image(slots)
        elif control_image == CONTROL_STYLES[1]:
            control = draw_openpose_image(slots.frame)
        elif control_image == CONTROL_STYLES[2]:
            points = kps_for_slots(slots)
            missing = [f"{n + 1} ({identities[n].name})" for n, p in enumerate(points)
                       if p is None and not slots.is_empty(n)]
            if missing:
                raise PoseError(f"pose_keypoint: identities {missing} have no face keypoints in the pose (InstantID "
                                "needs eyes, nose and mouth corners: use a bundled template, Pose from Image, or an "
                                "OpenPose/DWPose preprocessor with faces on)")
            control = draw_kps_canvas(height, width, points)
        else:
            raise OptionError(f"control_image: expected one of {list(CONTROL_STYLES)}, got {control_image!r}")
        preview = draw_preview(control, slots, out_masks)
        if note:
            preview = draw_caption(preview, note)
        return (uint8_to_image(control), out_masks, uint8_to_image(preview))


OPENPOSE_METHOD = "openpose (controlnet-aux)"
FACES_METHOD = "faces (insightface)"


class PoseFromImage:
    DESCRIPTION = ("Keypoints (POSE_KEYPOINT) from a photo. 'openpose' runs controlnet-aux's OpenPose detector "
                   "(body + face; needs `pip install controlnet-aux` and body_pose_model.pth, hand_pose_model.pth, "
                   "facenet.pth in models/openpose/). 'faces' needs only the face analysis: head and neck "
                   "keypoints of every detected face.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("POSE_KEYPOINT",)
    OUTPUT_TOOLTIPS = ("OpenPose-format keypoints, one frame per input image; connect to Pose to Masks",)
    FUNCTION = "detect"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE", {"tooltip": "the photo(s) to read the people's poses from"}),
                             "method": ([OPENPOSE_METHOD, FACES_METHOD], {"default": OPENPOSE_METHOD, "tooltip": (
                                 "openpose: full body via controlnet-aux (optional package + weights in "
                                 "models/openpose); faces: head and neck points from the face analysis only")}),
                             "include_face": ("BOOLEAN", {"default": True, "tooltip": (
                                 "openpose method: also detect face landmarks (drawn by the OpenPose control "
                                 "style); ignored by the faces method")})},
                "optional": {"face_analysis": (FACE_ANALYSIS, {"tooltip": "required by the 'faces' method"})}}

    def detect(self, image, method, include_face, face_analysis=None):
        images = images_to_uint8(image, "image")  # RGB: controlnet-aux's detect_poses flips to BGR itself
        if method == FACES_METHOD:
            if face_analysis is None:
                raise ModelFileError("face_analysis: the 'faces' method needs a face analysis input "
                                     "(InstantFamily Face Analysis Loader)")
            detect = (lambda i, img: pose_from_faces([(f.bbox, f.kps) for f in face_analysis.detect(
                img, name=f"image {i}")], img.shape[1], img.shape[0]))
        else:
            detector = _openpose_detector()
            detect = (lambda i, img: poses_from_controlnet_aux(detector.detect_poses(
                img, include_hand=False, include_face=include_face), img.shape[1], img.shape[0]))
        bar = ProgressBar(len(images))
        frames = []
        for i, img in enumerate(images):
            comfy.model_management.throw_exception_if_processing_interrupted()
            frames.append(detect(i, img))
            bar.update(1)
        return (frames,)


def _openpose_detector():
    try:
        from controlnet_aux.open_pose import OpenposeDetector
    except Exception as e:  # ImportError, or its own import-time failures
        raise ModelFileError("Pose from image ('openpose' method) needs the optional package controlnet-aux "
                             f"(`pip install controlnet-aux`), or choose the 'faces' method: {type(e).__name__}: "
                             f"{e}") from None
    folders = folder_paths.get_folder_paths(paths.OPENPOSE_FOLDER)
    need = ["body_pose_model.pth", "hand_pose_model.pth", "facenet.pth"]
    folder = next((f for f in folders if all(os.path.isfile(os.path.join(f, n)) for n in need)), None)
    if folder is None:
        raise ModelFileError(f"Pose from image: OpenPose weights not found; put {', '.join(need)} into one of "
                             f"{folders}, or choose the 'faces' method")
    return OpenposeDetector.from_pretrained(folder)


def check_masks(masks: torch.Tensor, count: int) -> torch.Tensor:
    """MASK input of the apply node: exactly one mask per identity."""
    if masks is None:
        raise MaskError("masks: connect the masks output of 'InstantFamily Pose to Masks' (one per identity)")
    return validate_masks(masks, expected_count=count, name="masks")
