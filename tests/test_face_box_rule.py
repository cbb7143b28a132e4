"""One face-box rule: the same face gets the same box (the detector's) whichever pose source describes it.

Reference detector boxes: MTCNN (trained on WIDER FACE, like insightface's SCRFD) on real offline photos, recorded
in tests/data/face_box_reference.json by tools/calibrate_face_box.py (MTCNN itself needs a torch too old for the
suite). The face and body keypoints of the same faces are computed here, live, from dlib's 68-point predictor.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from instantfamily_core.pose import assign_slots, expand_box, face_box, parse_pose, pose_from_faces
from instantfamily_core.render import circle_radius

REPO = Path(__file__).resolve().parents[1]
REFERENCE = Path(__file__).parent / "data" / "face_box_reference.json"
TOLERANCE = 0.15


@pytest.fixture(scope="module")
def calib():
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import calibrate_face_box
    finally:
        sys.path.remove(str(REPO / "tools"))
    return calibrate_face_box


@pytest.fixture(scope="module")
def faces(calib):
    """Per real face: the detector box, its 5 points, and the 70-point face / 18-point body keypoints."""
    reference = json.loads(REFERENCE.read_text(encoding="utf-8"))["faces"]
    images = calib.photos()
    out = []
    for f in reference:
        img = images[f["image"]]
        pts = calib.dlib_landmarks(img, f["bbox"])
        assert pts is not None, f"dlib found no face at {f['bbox']} in {f['image']}"
        body, face70 = calib.keypoints_from_landmarks(pts)
        out.append({"image": f["image"], "size": (img.shape[1], img.shape[0]), "det": f["bbox"], "kps": f["kps"],
                    "body": body, "face70": face70, "face68": face70[:68 * 3]})
    assert len(out) == 8 and {f["image"] for f in out} == {"t1", "astronaut", "grace_hopper"}
    return out


def _box(person: dict, size) -> tuple:
    return face_box(parse_pose({"canvas_width": size[0], "canvas_height": size[1], "people": [person]}).people[0])


def _sources(f) -> dict:
    w, h = f["size"]
    faces_person = pose_from_faces([(f["det"], f["kps"])], w, h)["people"][0]
    return {
        "face-70 + body": _box({"pose_keypoints_2d": f["body"], "face_keypoints_2d": f["face70"]}, f["size"]),
        "face-68 + body": _box({"pose_keypoints_2d": f["body"], "face_keypoints_2d": f["face68"]}, f["size"]),
        "body only": _box({"pose_keypoints_2d": f["body"]}, f["size"]),
        "faces method": _box(faces_person, f["size"]),
        "faces method without its box": _box({k: v for k, v in faces_person.items() if k != "face_box_2d"},
                                             f["size"]),
    }


def _size(box) -> float:
    return float(np.sqrt((box[2] - box[0]) * (box[3] - box[1])))


def test_every_pose_source_gives_the_detector_box_within_15_percent(faces):
    for f in faces:
        det = f["det"]
        dw, dh = det[2] - det[0], det[3] - det[1]
        for source, box in _sources(f).items():
            w, h = box[2] - box[0], box[3] - box[1]
            where = f"{source} on {f['image']} face {det}"
            assert abs(_size(box) / _size(det) - 1) <= TOLERANCE, f"{where}: size {_size(box):.1f} vs {_size(det):.1f}"
            assert abs(w / dw - 1) <= 0.2 and abs(h / dh - 1) <= 0.2, f"{where}: {w:.1f}×{h:.1f} vs {dw:.1f}×{dh:.1f}"
            # and the box sits on the face: its centre within 12 % of the detector box's size of the detector's
            c = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])
            dc = np.array([(det[0] + det[2]) / 2, (det[1] + det[3]) / 2])
            assert (np.abs(c - dc) <= 0.12 * np.array([dw, dh])).all(), f"{where}: centre {c} vs {dc}"


def test_sources_agree_with_each_other_on_mask_and_circle_size(faces):
    for f in faces:
        sources = _sources(f)
        sizes = {s: _size(b) for s, b in sources.items()}
        radii = {s: circle_radius(b) for s, b in sources.items()}
        masks = {s: _size(expand_box(b, 0.25, *f["size"])) for s, b in sources.items()}
        for values in (sizes, masks):
            lo, hi = min(values.values()), max(values.values())
            assert hi / lo <= 1 + 2 * TOLERANCE, f"{f['image']} {f['det']}: {values}"
        lo, hi = min(radii.values()), max(radii.values())
        assert hi / lo <= 1 + 2 * TOLERANCE + 1 / lo, f"{f['image']} {f['det']}: circle radii {radii}"


def test_the_paper_example_detector_box_plus_25_percent():
    """A 100×120 px detection gives a 125×150 px mask (it used to give a 187.5 px square)."""
    kps = [(130, 150), (170, 150), (150, 172), (135, 190), (165, 190)]
    frame = parse_pose(pose_from_faces([((100, 100, 200, 220), kps)], 512, 512))
    slots = assign_slots(frame, 1, margin=0.25)
    assert slots.face_boxes[0] == pytest.approx((100, 100, 200, 220))
    assert slots.mask_boxes[0] == pytest.approx((87.5, 85, 212.5, 235))
    m = slots.masks()[0]
    assert m.sum() == 125 * 150


def test_training_masks_use_the_stored_detector_box():
    from training.data import with_detector_boxes
    from support.poses import frame, person
    record = {"key": "k", "pose": frame([person(100, 100, s=30), person(300, 100, s=30)])[0],
              "faces": [{"person": 1, "bbox": [270.0, 70.0, 330.0, 146.0], "det_score": 0.9}]}
    pose = parse_pose(with_detector_boxes(record))
    assert face_box(pose.people[1]) == (270.0, 70.0, 330.0, 146.0)
    assert face_box(pose.people[0]) == face_box(parse_pose(record["pose"]).people[0])  # no detection: the rule
    assert "face_box_2d" not in record["pose"]["people"][1]  # the record itself is untouched


def test_person_for_box_gives_the_box_back_through_the_margin():
    from instantfamily_core.pose import person_for_box
    box = (40.0, 30.0, 140.0, 150.0)
    p = person_for_box(box, 0.25)
    f = parse_pose({"canvas_width": 512, "canvas_height": 512, "people": [p]})
    assert expand_box(face_box(f.people[0]), 0.25, 512, 512) == pytest.approx(box)
    # without the carried box its keypoints still describe about the same face (the body rule)
    body_only = _box({"pose_keypoints_2d": p["pose_keypoints_2d"]}, (512, 512))
    assert abs(_size(body_only) / _size(face_box(f.people[0])) - 1) <= TOLERANCE
