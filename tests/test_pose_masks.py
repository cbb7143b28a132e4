"""Pose parsing, face boxes, slot assignment and mask geometry."""

import json
import math

import numpy as np
import pytest
import torch

from instantfamily_core.errors import FaceKeypointsError, IdentityCountError, MaskError, OptionError, PoseError
from instantfamily_core.masks import boxes_to_masks, feature_size_for, resize_masks, validate_masks
from instantfamily_core.pose import assign_slots, expand_box, face_box, parse_order, parse_pose
from support.poses import frame, person


# Changed with issue 9: one face-box rule (the detector box) replaced the old per-source boxes; the references
# below are written out from the rule in face_box's docstring.

def _box(cx, cy, w):
    return (cx - w / 2, cy - 1.27 * w / 2, cx + w / 2, cy + 1.27 * w / 2)


def test_body_only_face_box_follows_eyes_and_ears():
    f = parse_pose(frame([person(100, 120, s=30)]))
    # nose (100, 120), eyes (90, 115) and (110, 115), ears (80, 120) and (120, 120)
    w_eyes = 1.6 * math.hypot(20, 1.6 * 5)
    w_ears = 0.92 * 40
    w = (w_eyes + w_ears) / 2
    assert face_box(f.people[0]) == pytest.approx(_box(100, 115 + 0.10 * w, w))


def test_full_face_points_give_the_detector_box_partial_ones_defer_to_the_body():
    pts = [(80 + 40 * (k % 9) / 8, 100 + 50 * (k // 9) / 7) for k in range(68)]  # a 40×50 grid of points
    face = [v for x, y in pts for v in (x, y, 1.0)]
    f = parse_pose(frame([person(300, 300, face=face)]))
    assert face_box(f.people[0]) == pytest.approx((100 - 0.965 * 20, 100 - 0.29 * 50, 100 + 0.965 * 20,
                                                   150 - 0.06 * 50))
    few = []
    for x, y in [(90, 110), (110, 110), (100, 130)] + [(0, 0)] * 67:
        few += [x, y, 1.0 if x else 0.0]
    body_only = face_box(parse_pose(frame([person(300, 300)])).people[0])
    assert face_box(parse_pose(frame([person(300, 300, face=few)])).people[0]) == pytest.approx(body_only)
    headless = {"pose_keypoints_2d": [0, 0, 0] * 18, "face_keypoints_2d": few}
    assert face_box(parse_pose(frame([headless])).people[0]) == pytest.approx(
        (100 - 0.965 * 10, 110 - 0.29 * 20, 100 + 0.965 * 10, 130 - 0.06 * 20))


def test_a_detector_box_carried_with_the_pose_is_the_face_box():
    p = person(100, 120, s=30)
    p["face_box_2d"] = [70, 80, 130, 150]
    f = parse_pose(frame([p]))
    assert face_box(f.people[0]) == (70, 80, 130, 150)
    assert face_box(f.scaled(256, 1024).people[0]) == pytest.approx((35, 160, 65, 300))
    with pytest.raises(PoseError, match="face_box_2d"):
        parse_pose(frame([{**p, "face_box_2d": [1, 2, 3]}]))
    with pytest.raises(PoseError, match="empty"):
        parse_pose(frame([{**p, "face_box_2d": [10, 10, 5, 20]}]))


def test_normalised_and_pixel_coordinates_give_the_same_boxes():
    px = frame([person(200, 100, s=24)], w=640, h=480)
    body = np.array(px[0]["people"][0]["pose_keypoints_2d"]).reshape(18, 3)
    body[:, 0] /= 640
    body[:, 1] /= 480
    norm = frame([{"pose_keypoints_2d": body.reshape(-1).tolist()}], w=640, h=480)
    a = face_box(parse_pose(px).people[0])
    b = face_box(parse_pose(norm).people[0])
    assert a == pytest.approx(b)


def test_normalised_points_slightly_outside_the_frame_are_still_normalised():
    body = np.zeros((18, 3))
    body[0] = (1.03, 0.5, 1)
    body[14] = (0.99, 0.48, 1)
    f = parse_pose(frame([{"pose_keypoints_2d": body.reshape(-1).tolist()}], w=100, h=200))
    assert f.people[0].body[0, :2] == pytest.approx((103, 100))


def test_missing_keypoints_confidence_zero_are_ignored():
    p = person(100, 100, s=30)
    body = np.array(p["pose_keypoints_2d"]).reshape(18, 3)
    body[[14, 15], 2] = 0  # eyes missing → ears decide: 0.92 · 40, centre 0.15·w above the nose
    p["pose_keypoints_2d"] = body.reshape(-1).tolist()
    w = 0.92 * 40
    assert face_box(parse_pose(frame([p])).people[0]) == pytest.approx(_box(100, 100 - 0.15 * w, w))
    body[[16, 17], 2] = 0  # only nose + neck: 1.2 · 60
    p["pose_keypoints_2d"] = body.reshape(-1).tolist()
    w = 1.2 * 60
    assert face_box(parse_pose(frame([p])).people[0]) == pytest.approx(_box(100, 100 - 0.15 * w, w))
    body[[0, 1], 2] = 0
    p["pose_keypoints_2d"] = body.reshape(-1).tolist()
    assert face_box(parse_pose(frame([p, person(300, 300)])).people[0]) is None


def test_slots_left_to_right_and_explicit_order():
    f = parse_pose(frame([person(400, 100), person(100, 100), person(250, 300)]))
    assert assign_slots(f, 3).person_of_slot == (1, 2, 0)
    assert assign_slots(f, 2).person_of_slot == (1, 2)
    assert assign_slots(f, 2, order=[0, 1]).person_of_slot == (0, 1)


def test_margin_scales_the_box_and_masks_cover_it():
    f = parse_pose(frame([person(100, 120, s=30)]))
    slots = assign_slots(f, 1, margin=0.25)
    x1, y1, x2, y2 = slots.face_boxes[0]
    cx, cy, w, h = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
    assert slots.mask_boxes[0] == pytest.approx((cx - 0.625 * w, cy - 0.625 * h, cx + 0.625 * w, cy + 0.625 * h))
    m = slots.masks()
    assert m.shape == (1, 512, 512)
    mx1, _, mx2, _ = slots.mask_boxes[0]
    assert m[0, 120, 100] == 1 and m[0, 120, int(mx1) - 1] == 0 and m[0, 120, int(mx1) + 1] == 1
    assert m[0, 120, int(mx2) + 1] == 0 and m[0, 120, int(mx2) - 1] == 1


def test_faces_at_the_edge_are_clipped_but_not_empty_and_off_canvas_is_empty():
    f = parse_pose(frame([person(2, 2, s=30), person(500, 500, s=30)]))
    slots = assign_slots(f, 2)
    for x1, y1, x2, y2 in slots.mask_boxes:
        assert 0 <= x1 < x2 <= 512 and 0 <= y1 < y2 <= 512
    assert (slots.masks().flatten(1).sum(1) > 0).all()
    assert boxes_to_masks([(600, 600, 700, 700)], 512, 512).sum() == 0
    thin = boxes_to_masks([(10.2, 10.2, 10.4, 10.4)], 32, 32)
    assert thin.sum() == 1


def test_overlapping_faces_get_overlapping_masks():
    f = parse_pose(frame([person(100, 100, s=30), person(130, 100, s=30)]))
    m = assign_slots(f, 2).masks()
    assert ((m[0] > 0) & (m[1] > 0)).any()


@pytest.mark.parametrize("n", [1, 2, 7, 16])
def test_one_to_sixteen_people_on_non_square_canvases(n):
    w, h = 1024, 384
    people = [person(40 + i * 60, 100 + (i % 3) * 80, s=12) for i in range(n)]
    slots = assign_slots(parse_pose(frame(people, w=w, h=h)), n)
    xs = [c[0] for c in slots.centres()]
    assert xs == sorted(xs)
    m = slots.masks()
    assert m.shape == (n, h, w) and (m.flatten(1).sum(1) > 0).all()
    small = resize_masks(m, (h // 8, w // 8))
    assert small.shape == (n, 48, 128) and (small.flatten(1).sum(1) > 0).all()


def test_resize_to_rounded_up_feature_sizes_never_loses_a_face():
    m = torch.zeros(1, 96, 64)
    m[0, 10:14, 50:54] = 1
    for size in [(12, 8), (6, 4), (3, 2), (2, 1), (1, 1)]:
        r = resize_masks(m, size)
        assert r.shape == (1, *size) and r.sum() > 0


def test_feature_size_for_follows_unet_rounding():
    assert feature_size_for(96, (12, 8)) == (12, 8)
    assert feature_size_for(6, (12, 8)) == (3, 2)
    assert feature_size_for(2, (12, 8)) == (2, 1)
    with pytest.raises(MaskError):
        feature_size_for(7, (12, 8))


def test_bad_pose_inputs():
    with pytest.raises(PoseError, match="non-empty list"):
        parse_pose([])
    with pytest.raises(PoseError, match="no people"):
        parse_pose(frame([]))
    with pytest.raises(PoseError, match="canvas_width"):
        parse_pose([{"people": [person(1, 1)]}])
    with pytest.raises(PoseError, match="triples"):
        parse_pose(frame([{"pose_keypoints_2d": [1, 2]}]))
    with pytest.raises(PoseError, match="expected 18"):
        parse_pose(frame([{"pose_keypoints_2d": [1, 2, 1] * 10}]))
    with pytest.raises(PoseError, match="empty"):
        parse_pose(frame([{"pose_keypoints_2d": [0, 0, 0] * 18}]))
    with pytest.raises(PoseError, match="JSON"):
        parse_pose("{nope")
    f = parse_pose(json.dumps(frame([person(100, 100), person(300, 100)])))
    with pytest.raises(IdentityCountError, match="only 2 people"):
        assign_slots(f, 3)
    with pytest.raises(OptionError, match="does not exist"):
        assign_slots(f, 1, order=[5])
    with pytest.raises(OptionError, match="repeat"):
        assign_slots(f, 2, order=[0, 0])
    with pytest.raises(OptionError, match="1,0,2"):
        parse_order("a,b")
    assert parse_order(" 1, 0 ") == [1, 0] and parse_order("auto") is None


def test_person_without_face_keypoints_cannot_hold_an_identity():
    headless = {"pose_keypoints_2d": ([0, 0, 0] + [200, 300, 1] + [0, 0, 0] * 16)}
    f = parse_pose(frame([person(100, 100), headless]))
    assert assign_slots(f, 1).person_of_slot == (0,)
    with pytest.raises(FaceKeypointsError, match=r"persons \[1\]"):
        assign_slots(f, 2)
    with pytest.raises(FaceKeypointsError, match="person 1"):
        assign_slots(f, 1, order=[1])


def test_body25_maps_to_coco18():
    b25 = np.zeros((25, 3))
    b25[0] = (50, 50, 1)
    b25[15] = (45, 48, 1)  # BODY_25 R-eye
    f = parse_pose(frame([{"pose_keypoints_2d": b25.reshape(-1).tolist()}], w=100, h=100))
    assert f.people[0].body[14, :2] == pytest.approx((45, 48))


def test_mask_validation():
    with pytest.raises(MaskError, match="3 identities"):
        validate_masks(torch.zeros(2, 8, 8), expected_count=3)
    with pytest.raises(MaskError, match="shape"):
        validate_masks(torch.zeros(2, 2, 2, 8, 8))
    assert validate_masks(torch.ones(8, 8)).shape == (1, 8, 8)
    assert expand_box((10, 10, 20, 20), 0.0, 100, 100) == (10, 10, 20, 20)


def test_pose_from_faces_gives_boxes_near_the_detected_faces():
    from instantfamily_core.pose import pose_from_faces
    kps = [(90, 110), (110, 110), (100, 120), (92, 130), (108, 130)]
    faces = [((300, 80, 340, 140), [(x + 220, y) for x, y in kps]), ((80, 90, 120, 150), kps)]
    f = parse_pose(pose_from_faces(faces, 512, 512))
    assert len(f.people) == 2
    slots = assign_slots(f, 2)
    assert slots.person_of_slot == (0, 1)
    (ax1, ay1, ax2, ay2), (bx1, _, bx2, _) = slots.face_boxes
    assert ax1 < 90 and ax2 > 110 and ay1 < 110 and ay2 > 120  # covers eyes and nose
    assert bx1 > 250  # second person on the right


def _openpose_person(cx=200, cy=150, width=512, height=384, missing=()):
    from support.controlnet_aux_shapes import face_points, pose_result
    body = {0: (cx, cy), 14: (cx - 12, cy - 8), 15: (cx + 12, cy - 8), 16: (cx - 30, cy), 17: (cx + 30, cy),
            1: (cx, cy + 70)}
    pts = face_points(cx, cy, 60, 76)
    face = [None if k in missing else p for k, p in enumerate(pts)]
    return pose_result(body, face, width, height)


def test_controlnet_aux_missing_face_markers_are_missing_points():
    """controlnet-aux writes a face point it could not place as (−1/W, −1/H) with score 1; it must not stretch the
    face box to the image corner (it used to)."""
    from instantfamily_core.pose import poses_from_controlnet_aux
    clean = parse_pose(poses_from_controlnet_aux([_openpose_person()], 512, 384))
    marked_result = _openpose_person(missing=(3, 40, 69))
    marked = parse_pose(poses_from_controlnet_aux([marked_result], 512, 384))
    assert (marked.people[0].face[[3, 40, 69], 2] == 0).all() and (marked.people[0].face[:, 2] > 0).sum() == 67
    box = face_box(marked.people[0])
    assert box == pytest.approx(face_box(clean.people[0]), abs=1.0)
    assert box[0] > 150 and box[1] > 90  # not stretched towards (0, 0)
    # the same markers arriving as POSE_KEYPOINT JSON written by comfyui_controlnet_aux (normalised, score 1) …
    raw = {"canvas_width": 512, "canvas_height": 384, "people": [{
        "pose_keypoints_2d": [v for kp in marked_result.body.keypoints
                              for v in ((kp.x, kp.y, 1.0) if kp else (0.0, 0.0, 0.0))],
        "face_keypoints_2d": [v for kp in marked_result.face for v in (kp.x, kp.y, 1.0)]}]}
    assert face_box(parse_pose(raw).people[0]) == pytest.approx(box)
    # … or already in pixels (x or y = −1), for face and body points
    px = json.loads(json.dumps(raw))
    person_px = px["people"][0]
    for key in ("pose_keypoints_2d", "face_keypoints_2d"):
        a = np.array(person_px[key]).reshape(-1, 3)
        a[:, 0] *= 512
        a[:, 1] *= 384
        a[a[:, 2] == 0, :2] = 0
        person_px[key] = a.reshape(-1).tolist()
    body = np.array(person_px["pose_keypoints_2d"]).reshape(18, 3)
    body[17] = (-1, -1, 1.0)  # left ear: marker
    person_px["pose_keypoints_2d"] = body.reshape(-1).tolist()
    f = parse_pose(px)
    assert f.people[0].body[17, 2] == 0
    assert face_box(f.people[0]) == pytest.approx(box, abs=1e-3)


def test_controlnet_aux_results_become_pose_keypoint_frames():
    from instantfamily_core.pose import poses_from_controlnet_aux
    from support.controlnet_aux_shapes import Keypoint
    result = _openpose_person(missing=(0,))
    # its face list can hold a 71st peak (the background heatmap): dropped
    result = result._replace(face=result.face + [Keypoint(0.9, 0.9)])
    frame_ = poses_from_controlnet_aux([result, _openpose_person(cx=400, missing=())._replace(face=None)], 512, 384)
    assert frame_["canvas_width"] == 512 and frame_["canvas_height"] == 384 and len(frame_["people"]) == 2
    a, b = frame_["people"]
    assert len(a["pose_keypoints_2d"]) == 54 and len(a["face_keypoints_2d"]) == 210
    assert a["face_keypoints_2d"][:3] == [0.0, 0.0, 0.0]  # the marker
    assert a["pose_keypoints_2d"][2 * 3:2 * 3 + 3] == [0.0, 0.0, 0.0]  # a None body point
    assert a["pose_keypoints_2d"][:2] == pytest.approx([200 / 512, 150 / 384])
    assert b["face_keypoints_2d"] is None
    f = parse_pose(frame_)
    assert f.people[0].body[0, :2] == pytest.approx((200, 150)) and assign_slots(f, 2).person_of_slot == (0, 1)


def test_prepare_gives_controlnet_aux_the_rgb_image_it_expects():
    """detect_poses flips RGB → BGR itself; prepare.py used to flip first, so the networks saw RGB as BGR."""
    from support.controlnet_aux_shapes import FakeOpenposeDetector
    from training.prepare import PoseDetector
    fake = FakeOpenposeDetector([_openpose_person(missing=(5,))])
    det = PoseDetector.__new__(PoseDetector)
    det.detector = fake
    rgb = np.zeros((384, 512, 3), np.uint8)
    rgb[..., 0] = 200  # red
    rgb[..., 2] = 10
    out = det(rgb)
    assert np.array_equal(fake.images[0], rgb)
    f = parse_pose(out)
    assert (f.width, f.height) == (512, 384) and f.people[0].face[5, 2] == 0
    assert face_box(f.people[0])[0] > 150
