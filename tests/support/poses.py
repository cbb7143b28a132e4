"""Synthetic OpenPose people for tests (POSE_KEYPOINT shape)."""

import numpy as np


def person(cx, cy, s=20.0, conf=1.0, face=None):
    """An 18-point body with the head at (cx, cy); eyes s/3 apart from the nose, ears s/1.5, neck below."""
    body = np.zeros((18, 3))
    pts = {0: (cx, cy), 1: (cx, cy + 2 * s), 14: (cx - s / 3, cy - s / 6), 15: (cx + s / 3, cy - s / 6),
           16: (cx - s / 1.5, cy), 17: (cx + s / 1.5, cy), 2: (cx - s, cy + 2 * s), 5: (cx + s, cy + 2 * s),
           8: (cx - s / 2, cy + 5 * s), 11: (cx + s / 2, cy + 5 * s)}
    for i, (x, y) in pts.items():
        body[i] = (x, y, conf)
    d = {"pose_keypoints_2d": body.reshape(-1).tolist()}
    if face is not None:
        d["face_keypoints_2d"] = face
    return d


def frame(people, w=512, h=512):
    return [{"canvas_width": w, "canvas_height": h, "people": people}]
