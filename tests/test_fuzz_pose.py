"""Fuzz: POSE_KEYPOINT values and MASK tensors through the real Pose to Masks node (ComfyUI host, in-process).

Generated values: lists of frames, single frame dicts and JSON strings; pixel and normalised coordinates; missing
points ``[0, 0, 0]``; controlnet-aux's −1 markers; NaN / ±inf; negative, zero, huge or non-numeric canvas sizes;
0 people; animal-only frames (comfyui_controlnet_aux AnimalPose); several frames; BODY_25 and odd point counts;
face points and detector boxes. Every call either succeeds — masks of exactly (N, height, width), values in
{0, 1}, each identity's mask non-empty, images of the requested size — or raises one of the pack's typed errors
naming the input. Deterministic (``derandomize``) with bounded example counts; the counts are printed at the end.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from instantfamily_core.errors import InstantFamilyError
from tools.devkit.comfy_host import HOW_TO_PROVIDE, find_comfyui
from support.fuzz import check_typed, fuzz_settings, register_report, tried
from tools.devkit.identities import random_identities

pytestmark = pytest.mark.skipif(find_comfyui() is None, reason=HOW_TO_PROVIDE)

POSE_NAMES = ("pose_keypoint", "identities", "identity order", "identity_order")
MASK_NAMES = ("masks",)
IDS = random_identities(4, seed=3)


@pytest.fixture(scope="module")
def node():
    import sys

    from tools.devkit.comfy_host import import_host, load_pack
    import_host()
    pack = load_pack()
    return sys.modules[f"{pack.__name__}.nodes.pose_nodes"]


@pytest.fixture(scope="module", autouse=True)
def fuzz_report(request):
    register_report(request.config)


# -- strategies ---------------------------------------------------------------------------------------------------

FINITE_PX = st.floats(-50, 700, allow_nan=False, allow_infinity=False)
FINITE_NORM = st.floats(-0.05, 1.05, allow_nan=False, allow_infinity=False)
WILD = st.one_of(st.just(float("nan")), st.just(float("inf")), st.just(float("-inf")), st.just(-1.0),
                 st.floats(-1e12, 1e12, allow_nan=False), st.just(1e300))


@st.composite
def points(draw, count, normalised, wild):
    out = []
    for _ in range(count):
        kind = draw(st.sampled_from(["ok"] * 6 + ["missing", "marker"] + (["wild"] if wild else [])))
        if kind == "missing":
            out += [0.0, 0.0, 0.0]
        elif kind == "marker":  # controlnet-aux writes −1 (pixels) → −1/W (normalised) with confidence 1
            coord = FINITE_NORM if normalised else FINITE_PX
            out += [-1.0, draw(coord), 1.0] if draw(st.booleans()) else [draw(coord), -1.0, 1.0]
        elif kind == "wild":
            out += [draw(WILD), draw(WILD), draw(st.sampled_from([1.0, 0.5, float("nan"), -1.0]))]
        else:
            coord = FINITE_NORM if normalised else FINITE_PX
            out += [draw(coord), draw(coord), draw(st.sampled_from([1.0, 0.9, 0.3]))]
    return out


@st.composite
def person(draw, normalised, wild, structural):
    if structural and draw(st.integers(0, 3)) == 0:  # garbage person
        return draw(st.sampled_from([None, 3, "person", [1, 2, 3], {"pose_keypoints_2d": "abc"},
                                     {"pose_keypoints_2d": [1, 2]}, {"pose_keypoints_2d": [[1, 2, 1]] * 18},
                                     {"pose_keypoints_2d": [0] * 51}, {"face_box_2d": [1, 2, 3]}]))
    n_body = draw(st.sampled_from([18, 18, 18, 25, 0]))
    p = {"pose_keypoints_2d": draw(points(n_body, normalised, wild)) if n_body else draw(st.sampled_from([[], None]))}
    face = draw(st.sampled_from([None, None, 70, 68, 5]))
    p["face_keypoints_2d"] = None if face is None else draw(points(face, normalised, wild))
    if draw(st.integers(0, 4)) == 0:
        x1, y1 = draw(FINITE_NORM) if normalised else draw(FINITE_PX), draw(FINITE_NORM) if normalised else draw(
            FINITE_PX)
        span = st.floats(0.01, 0.4) if normalised else st.floats(1, 200)
        p["face_box_2d"] = [x1, y1, x1 + draw(span), y1 + draw(span)]
    p["hand_left_keypoints_2d"] = p["hand_right_keypoints_2d"] = None
    return p


GOOD_CANVAS = st.sampled_from([64, 100, 512, 768, 2048])
BAD_CANVAS = st.sampled_from([0, -5, 10 ** 9, 1.5, "512", None, float("nan"), float("inf"), True, [512]])


@st.composite
def frame(draw, mode):
    normalised = draw(st.booleans())
    structural = mode == "structural"
    kind = draw(st.sampled_from(["people"] * 6 + ["empty", "animal"] + (["garbage"] if structural else [])))
    f = {"canvas_width": draw(GOOD_CANVAS), "canvas_height": draw(GOOD_CANVAS)}
    if structural:
        which = draw(st.sampled_from(["canvas_width", "canvas_height", None, None]))
        if which:
            f[which] = draw(BAD_CANVAS)
            if draw(st.integers(0, 5)) == 0:
                del f[which]
    if kind == "people":
        f["people"] = draw(st.lists(person(normalised, mode == "wild", structural), min_size=1, max_size=4))
    elif kind == "empty":
        f["people"] = draw(st.sampled_from([[], None]))
    elif kind == "animal":  # comfyui_controlnet_aux AnimalPose (ap10k): 17 [x, y, c] per animal
        f["version"] = "ap10k"
        f["animals"] = [np.asarray(draw(points(17, normalised, False))).reshape(-1, 3).tolist()
                        for _ in range(draw(st.integers(1, 3)))]
    else:
        return draw(st.sampled_from([None, 1, "frame", [], {"people": "x"}]))
    return f


@st.composite
def pose_value(draw):
    mode = draw(st.sampled_from(["clean", "clean", "clean", "wild", "structural"]))
    frames = draw(st.lists(frame(mode), min_size=1, max_size=3))
    container = draw(st.sampled_from(["list", "list", "dict", "json"] + (["garbage"] if mode == "structural"
                                                                         else [])))
    if container == "dict":
        return frames[0]
    if container == "json":
        return json.dumps(frames)  # NaN / Infinity become JSON's non-standard tokens, as Python writes them
    if container == "garbage":
        return draw(st.sampled_from(["", "{not json", "[]", 42, [], None, b"\xff", "null", "[{}]"]))
    return frames


# -- the node -----------------------------------------------------------------------------------------------------

def run_pose_to_masks(node, value, n, width, height, margin, order, masks=None, style=None):
    style = style or node.CONTROL_STYLES[0]
    return node.PoseToMasks().run(IDS[:n], node.NO_TEMPLATE, width, height, margin, order, pose_keypoint=value,
                                  masks=masks, control_image=style)


def check_outputs(out, n, width, height):
    pose_image, masks, preview = out
    assert pose_image.shape == (1, height, width, 3) and preview.shape == (1, height, width, 3)
    assert torch.isfinite(pose_image).all() and torch.isfinite(preview).all()
    assert masks.shape == (n, height, width) and masks.dtype == torch.float32
    assert torch.isfinite(masks).all() and (masks.numel() == 0 or (masks.min() >= 0 and masks.max() <= 1))


@fuzz_settings(300)
@given(value=pose_value(), n=st.sampled_from([0, 1, 1, 2, 2, 3, 4]), size=st.sampled_from([(64, 64), (96, 64), (128, 192)]),
       margin=st.sampled_from([0.0, 0.25, 2.0]), order=st.sampled_from(["auto", "auto", "1,0", "0", "x", "3,3"]),
       style=st.integers(0, 1))
def test_pose_keypoint(node, value, n, size, margin, order, style):
    width, height = size
    try:
        out = run_pose_to_masks(node, value, n, width, height, margin, order, style=node.CONTROL_STYLES[style])
    except Exception as e:  # noqa: BLE001 - the check re-raises anything untyped
        tried("POSE_KEYPOINT (Pose to Masks)", check_typed(e, (InstantFamilyError,), POSE_NAMES))
        return
    check_outputs(out, n, width, height)
    masks = out[1]
    for k in range(n):  # every identity asked for acts somewhere on the canvas
        assert masks[k].sum() > 0, f"identity {k} got an empty mask"
    tried("POSE_KEYPOINT (Pose to Masks)", "ok")


def _good_pose(people=2):
    ps = []
    for i in range(people):
        body = np.zeros((18, 3))
        cx = 100 + 200 * i
        body[0] = (cx, 120, 1)
        body[14], body[15] = (cx - 15, 105, 1), (cx + 15, 105, 1)
        body[16], body[17] = (cx - 35, 110, 1), (cx + 35, 110, 1)
        body[1] = (cx, 200, 1)
        ps.append({"pose_keypoints_2d": body.reshape(-1).tolist()})
    return [{"people": ps, "canvas_width": 512, "canvas_height": 512}]


MASK_VALUE = st.one_of(st.just(0.0), st.just(1.0), st.just(0.5), st.just(float("nan")), st.just(float("inf")),
                       st.just(-0.5), st.just(2.0))


@st.composite
def mask_input(draw):
    kind = draw(st.sampled_from(["right"] * 4 + ["tensor"] * 4 + ["other"]))
    if kind == "other":
        return draw(st.sampled_from([None, [[0.0, 1.0]], np.ones((2, 8, 8)), "mask", 1.0]))
    if kind == "right":  # (n, H, W) for the n the test draws (the mask count is the first value drawn)
        shape = (draw(st.sampled_from([1, 2, 3])), draw(st.sampled_from([1, 7, 16, 64])),
                 draw(st.sampled_from([1, 9, 16, 64])))
        if draw(st.integers(0, 3)) == 0:
            shape = (1,) + shape
    else:
        ndim = draw(st.integers(0, 5))
        shape = tuple(draw(st.integers(0, 3)) if d < ndim - 2 else draw(st.sampled_from([0, 1, 7, 16]))
                      for d in range(ndim))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.float64, torch.uint8, torch.bool,
                                  torch.int64]))
    fill = draw(st.sampled_from(["zeros", "ones", "random", "value"]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 1000)))
    if fill == "zeros":
        t = torch.zeros(shape)
    elif fill == "ones":
        t = torch.ones(shape)
    elif fill == "random":
        t = torch.rand(shape, generator=g)
    else:
        t = torch.full(shape, draw(MASK_VALUE))
    if dtype in (torch.uint8, torch.int64, torch.bool):
        t = torch.nan_to_num(t, nan=0.0, posinf=1.0, neginf=0.0).clamp(0, 255)
    return t.to(dtype)


@fuzz_settings(150)
@given(masks=mask_input(), n=st.sampled_from([1, 2, 3]))
def test_mask_input_of_pose_to_masks(node, masks, n):
    try:
        out = run_pose_to_masks(node, _good_pose(3), n, 64, 64, 0.25, "auto", masks=masks)
    except Exception as e:  # noqa: BLE001
        tried("MASK (Pose to Masks masks)", check_typed(e, (InstantFamilyError,), MASK_NAMES))
        return
    check_outputs(out, n, 64, 64)
    tried("MASK (Pose to Masks masks)", "ok")


@fuzz_settings(150)
@given(masks=mask_input(), n=st.sampled_from([1, 2, 3]))
def test_mask_input_of_apply(node, masks, n):
    """The apply node's mask check (``check_masks``) — the part of Apply that reads the MASK input."""
    try:
        out = node.check_masks(masks, n)
    except Exception as e:  # noqa: BLE001
        tried("MASK (Apply masks)", check_typed(e, (InstantFamilyError,), MASK_NAMES))
        return
    assert out.shape[-3] == n and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert out.min() >= 0 and out.max() <= 1
    tried("MASK (Apply masks)", "ok")


# -- the known gaps, stated exactly -------------------------------------------------------------------------------

def test_animal_pose_says_it_is_an_animal_pose(node):
    """comfyui_controlnet_aux's AnimalPose output shape: ``{"version": "ap10k", "animals": [[[x, y, c], ...]], ...}``."""
    animal = {"version": "ap10k", "animals": [[[0.3, 0.4, 0.9]] * 17, [[0.6, 0.5, 0.8]] * 17],
              "canvas_width": 512, "canvas_height": 512}
    for value in (animal, [animal], json.dumps([animal])):
        with pytest.raises(InstantFamilyError, match=r"pose_keypoint: frame 0 is an animal pose \(ap10k, 2 "
                                                     r"animal\(s\)\)"):
            run_pose_to_masks(node, value, 1, 64, 64, 0.25, "auto")


def test_several_frames_use_the_first_and_say_so(node, caplog):
    one = _good_pose(2)
    moved = json.loads(json.dumps(one))
    for p in moved[0]["people"]:  # a second frame with the people elsewhere
        kp = p["pose_keypoints_2d"]
        p["pose_keypoints_2d"] = [v + 60 if i % 3 == 1 and v else v for i, v in enumerate(kp)]
    single = run_pose_to_masks(node, one, 2, 128, 128, 0.25, "auto")
    with caplog.at_level("WARNING"):
        several = run_pose_to_masks(node, one + moved + moved, 2, 128, 128, 0.25, "auto")
    assert torch.equal(single[0], several[0]) and torch.equal(single[1], several[1])  # frame 0's image and masks
    assert "3 frames; only the first is used" in caplog.text
    diff = (single[2] - several[2]).abs().sum(dim=-1)[0]  # the preview carries a caption along its bottom edge
    rows = torch.nonzero(diff.sum(dim=1)).flatten()
    assert len(rows) > 0 and rows.min() >= 128 - 24
    with caplog.at_level("WARNING"):
        caplog.clear()
        run_pose_to_masks(node, one, 2, 128, 128, 0.25, "auto")
    assert "frames" not in caplog.text
