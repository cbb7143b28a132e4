#!/usr/bin/env python
"""Calibrate and check the one face-box rule (``instantfamily_core.pose.face_box``) against face-detector boxes.

Two sources of detector boxes:

``--shards DIR``
    Training shards written by ``training/prepare.py``: every face record holds the insightface detector box
    (``bbox``) of a person whose keypoints are in the record's pose. For each face the rule is applied to the
    keypoints alone (face points, then body points only) and compared with the stored box. Use it to re-check the
    constants on your own data.

``--photos`` (default)
    Real photographs available offline (insightface's ``t1.jpg``, 6 people, loaded from the installed package and
    never copied; scikit-image's public-domain ``astronaut``; matplotlib's public-domain ``grace_hopper.jpg``).
    Detector boxes come from MTCNN (facenet-pytorch; trained on WIDER FACE like insightface's SCRFD), 68 landmarks
    from dlib's predictor (face-recognition-models). facenet-pytorch pins an old torch, so install it aside:
    ``pip install --no-deps --target /tmp/fnp facenet-pytorch==2.6.0`` and pass ``--facenet-path /tmp/fnp``.
    ``--write-reference tests/data/face_box_reference.json`` records the MTCNN boxes and 5 points that
    ``tests/test_face_box_rule.py`` checks the rule against (the test recomputes the dlib landmarks itself).

Prints the median ratios behind the constants in ``instantfamily_core/pose.py`` and the agreement of each pose
source with the detector box.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

if not __package__:  # run as a file, not as python -m tools.calibrate_face_box
    import _bootstrap  # noqa: F401  (tools/_bootstrap.py: the repository root first on sys.path)

from instantfamily_core.fileio import write_text_atomic  # noqa: E402
from instantfamily_core.pose import face_box, parse_pose  # noqa: E402


def photos() -> dict[str, np.ndarray]:
    """The offline photographs, RGB uint8."""
    import insightface
    import matplotlib.cbook
    import skimage.data
    from PIL import Image
    t1 = os.path.join(os.path.dirname(insightface.__file__), "data", "images", "t1.jpg")
    with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")) as im:
        hopper = np.asarray(im.convert("RGB"))
    with Image.open(t1) as im:
        group = np.asarray(im.convert("RGB"))
    return {"t1": group, "astronaut": skimage.data.astronaut(), "grace_hopper": hopper}


def dlib_landmarks(image: np.ndarray, box) -> np.ndarray | None:
    """dlib's 68 landmarks of the face whose HOG detection overlaps ``box`` (IoU > 0.3), or None."""
    import importlib.util

    import dlib
    models = Path(importlib.util.find_spec("face_recognition_models").submodule_search_locations[0]) / "models"
    if not hasattr(dlib_landmarks, "_cache"):
        dlib_landmarks._cache = (dlib.get_frontal_face_detector(),
                                 dlib.shape_predictor(str(models / "shape_predictor_68_face_landmarks.dat")), {})
    hog, predictor, dets_cache = dlib_landmarks._cache
    key = (image.shape, int(image[::97, ::89].sum()))
    if key not in dets_cache:
        dets_cache[key] = list(hog(image, 1))
    best, best_iou = None, 0.3
    for d in dets_cache[key]:
        ix = max(0.0, min(box[2], d.right()) - max(box[0], d.left()))
        iy = max(0.0, min(box[3], d.bottom()) - max(box[1], d.top()))
        inter = ix * iy
        iou = inter / ((box[2] - box[0]) * (box[3] - box[1]) + d.width() * d.height() - inter)
        if iou > best_iou:
            best, best_iou = d, iou
    if best is None:
        return None
    shape = predictor(image, best)
    return np.array([(shape.part(i).x, shape.part(i).y) for i in range(68)], dtype=np.float64)


def keypoints_from_landmarks(pts: np.ndarray) -> tuple[list, list]:
    """(body-18, face-70) OpenPose keypoints of one face from its 68 dlib landmarks.

    Face-70 = the 68 points + the two eye centres as pupils. Body: nose = nose tip (30), eyes = eye centres,
    ears = the jaw's ends (0, 16) moved outwards by 5 % of the jaw width (OpenPose's ear point lies on the tragus,
    just outside the face contour), neck below the chin."""
    right_eye, left_eye = pts[36:42].mean(0), pts[42:48].mean(0)  # the person's right eye is on the image's left
    body = np.zeros((18, 3))
    body[0, :2], body[14, :2], body[15, :2] = pts[30], right_eye, left_eye
    body[16, :2] = pts[0] + 0.05 * (pts[0] - pts[16])
    body[17, :2] = pts[16] + 0.05 * (pts[16] - pts[0])
    body[1, :2] = pts[8] + 0.6 * (pts[8] - pts[27])
    body[[0, 1, 14, 15, 16, 17], 2] = 1.0
    face = np.concatenate([pts, right_eye[None], left_eye[None]])
    face = np.concatenate([face, np.ones((70, 1))], 1)
    return body.reshape(-1).tolist(), face.reshape(-1).tolist()


def rule_box(person: dict, width: int, height: int):
    return face_box(parse_pose({"canvas_width": width, "canvas_height": height, "people": [person]}).people[0])


def ratios(box, det) -> tuple[float, float, float]:
    """(width, height, size = √area) of ``box`` over those of the detector box ``det``."""
    w, h = box[2] - box[0], box[3] - box[1]
    dw, dh = det[2] - det[0], det[3] - det[1]
    return w / dw, h / dh, float(np.sqrt(w * h / (dw * dh)))


def detect_mtcnn(images: dict, facenet_path: str | None) -> list[dict]:
    if facenet_path:
        sys.path.insert(0, facenet_path)
    from facenet_pytorch import MTCNN
    from PIL import Image
    mtcnn = MTCNN(keep_all=True, device="cpu", thresholds=[0.6, 0.7, 0.9])
    out = []
    for name, img in images.items():
        boxes, probs, points = mtcnn.detect(Image.fromarray(img), landmarks=True)
        for b, p, k in zip(np.asarray(boxes, float), np.asarray(probs, float), np.asarray(points, float)):
            if p >= 0.95:
                out.append({"image": name, "bbox": [round(float(v), 2) for v in b], "det_score": round(float(p), 4),
                            "kps": [[round(float(x), 2), round(float(y), 2)] for x, y in k]})
    return out


def photo_report(reference: list[dict], images: dict) -> list[dict]:
    from instantfamily_core.pose import pose_from_faces
    rows = []
    for face in reference:
        img = images[face["image"]]
        h, w = img.shape[:2]
        det = face["bbox"]
        pts = dlib_landmarks(img, det)
        if pts is None:
            continue
        body, face70 = keypoints_from_landmarks(pts)
        faces_pose = pose_from_faces([(det, face["kps"])], w, h)["people"][0]
        no_box = {k: v for k, v in faces_pose.items() if k != "face_box_2d"}
        tw, th = np.ptp(pts[:, 0]), np.ptp(pts[:, 1])
        rows.append({"image": face["image"], "det": det,
                     "face points": ratios(rule_box({"pose_keypoints_2d": body, "face_keypoints_2d": face70}, w, h),
                                           det),
                     "body only": ratios(rule_box({"pose_keypoints_2d": body}, w, h), det),
                     "faces method": ratios(rule_box(faces_pose, w, h), det),
                     "faces method, box dropped": ratios(rule_box(no_box, w, h), det),
                     "calib": {"W/tight_w": (det[2] - det[0]) / tw, "top/tight_h": (pts[:, 1].min() - det[1]) / th,
                               "bottom/tight_h": (det[3] - pts[:, 1].max()) / th,
                               "H/W": (det[3] - det[1]) / (det[2] - det[0])}})
    return rows


def shard_report(folder: str) -> list[dict]:
    from training.data import read_manifest, read_shard_metadata
    manifest = read_manifest(folder)
    rows = []
    for shard in manifest["shards"]:
        for record in read_shard_metadata(Path(manifest["_folder"]) / shard["file"])["samples"]:
            frame = record["pose"][0] if isinstance(record["pose"], list) else record["pose"]
            r = int(frame["canvas_width"]), int(frame["canvas_height"])
            for f in record["faces"]:
                p = {k: v for k, v in frame["people"][f["person"]].items() if k != "face_box_2d"}
                row = {"image": record["key"], "det": f["bbox"]}
                if p.get("face_keypoints_2d"):
                    row["face points"] = ratios(rule_box(p, *r), f["bbox"])
                body = {"pose_keypoints_2d": p["pose_keypoints_2d"]}
                if rule_box(body, *r) is not None:
                    row["body only"] = ratios(rule_box(body, *r), f["bbox"])
                rows.append(row)
    return rows


def summarise(rows: list[dict]) -> None:
    sources = [s for s in ("face points", "body only", "faces method", "faces method, box dropped")
               if any(s in r for r in rows)]
    for s in sources:
        vals = np.array([r[s] for r in rows if s in r])
        print(f"{s:27s} n={len(vals):3d}  width {np.median(vals[:, 0]):.3f} [{vals[:, 0].min():.2f}, "
              f"{vals[:, 0].max():.2f}]  height {np.median(vals[:, 1]):.3f} [{vals[:, 1].min():.2f}, "
              f"{vals[:, 1].max():.2f}]  size {np.median(vals[:, 2]):.3f} [{vals[:, 2].min():.2f}, "
              f"{vals[:, 2].max():.2f}]  (rule / detector)")
    calib = [r["calib"] for r in rows if "calib" in r]
    if calib:
        print("medians for the constants: " + ", ".join(f"{k} {np.median([c[k] for c in calib]):.3f}"
                                                       for k in calib[0]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", help="a shard folder written by training/prepare.py")
    p.add_argument("--facenet-path", help="folder holding facenet_pytorch (installed with --no-deps --target)")
    p.add_argument("--reference", help="read MTCNN detections from this JSON instead of running MTCNN")
    p.add_argument("--write-reference", help="write the MTCNN detections of the photos to this JSON")
    args = p.parse_args(argv)
    if args.shards:
        summarise(shard_report(args.shards))
        return 0
    images = photos()
    if args.reference:
        reference = json.loads(Path(args.reference).read_text(encoding="utf-8"))["faces"]
    else:
        reference = detect_mtcnn(images, args.facenet_path)
    if args.write_reference:
        write_text_atomic(args.write_reference, json.dumps({
            "about": "MTCNN (facenet-pytorch 2.6.0, thresholds 0.6/0.7/0.9, p >= 0.95) face boxes and 5 points "
                     "[x, y] in pixels of the offline photos; written by tools/calibrate_face_box.py",
            "faces": reference}, indent=1) + "\n")
    summarise(photo_report(reference, images))
    return 0


if __name__ == "__main__":
    sys.exit(main())
