"""controlnet-aux's OpenPose output shapes, built by hand (controlnet-aux and its weights are not installable here).

``detect_poses(rgb_image, include_hand, include_face)`` returns ``PoseResult(body=BodyResult(keypoints, total_score,
total_parts), left_hand, right_hand, face)``; body keypoints are ``Keypoint(x, y, score=1.0, id=-1)`` normalised
by the image size, or None when missing; face keypoints are ``Keypoint``s whose coordinates are
``np.where(peak < 1e-6, -1, peak + crop_offset) / W`` (resp. ``/ H``) — a peak on the crop border becomes the
marker −1/W (−1/H) with score 1. Its networks want BGR: ``detect_poses`` flips the RGB input itself
(``oriImg[:, :, ::-1]``).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np


class Keypoint(NamedTuple):
    x: float
    y: float
    score: float = 1.0
    id: int = -1


class BodyResult(NamedTuple):
    keypoints: list
    total_score: float = 0.0
    total_parts: int = 0


class PoseResult(NamedTuple):
    body: BodyResult
    left_hand: Optional[list]
    right_hand: Optional[list]
    face: Optional[list]


def pose_result(body_px: dict, face_px: Optional[list], width: int, height: int) -> PoseResult:
    """``body_px``: {index: (x, y)} in pixels (others None); ``face_px``: list of (x, y) pixels, or None for a
    point the face network placed on its crop border (→ controlnet-aux's −1 marker)."""
    body = [Keypoint(body_px[i][0] / width, body_px[i][1] / height) if i in body_px else None for i in range(18)]
    face = None
    if face_px is not None:
        face = [Keypoint(-1 / width, -1 / height) if p is None else Keypoint(p[0] / width, p[1] / height)
                for p in face_px]
    return PoseResult(BodyResult(body, 10.0, len(body_px)), None, None, face)


def face_points(cx: float, cy: float, w: float, h: float) -> list:
    """70 face points on a (w × h) oval around (cx, cy) — jaw, brows, eyes, nose, mouth, pupils in iBUG order."""
    pts = []
    for k in range(17):  # jaw from the right ear side to the left
        a = np.pi * (1 - k / 16)
        pts.append((cx + w / 2 * np.cos(a), cy + 0.05 * h + h / 2 * np.sin(a) * 0.9))
    for k in range(10):  # brows
        pts.append((cx - 0.4 * w + k * 0.8 * w / 9, cy - 0.28 * h))
    for k in range(9):  # nose bridge and nostrils
        pts.append((cx + (k - 4) * 0.03 * w if k >= 4 else cx, cy - 0.2 * h + min(k, 4) * 0.07 * h))
    for side in (-1, 1):  # eyes
        for k in range(6):
            a = 2 * np.pi * k / 6
            pts.append((cx + side * 0.2 * w + 0.08 * w * np.cos(a), cy - 0.15 * h + 0.03 * h * np.sin(a)))
    for k in range(20):  # mouth
        a = 2 * np.pi * k / 20
        pts.append((cx + 0.2 * w * np.cos(a), cy + 0.25 * h + 0.06 * h * np.sin(a)))
    pts += [(cx - 0.2 * w, cy - 0.15 * h), (cx + 0.2 * w, cy - 0.15 * h)]
    assert len(pts) == 70
    return pts


class FakeOpenposeDetector:
    """Stands in for ``controlnet_aux.open_pose.OpenposeDetector``: records the image it is given and returns
    fixed results."""

    def __init__(self, results):
        self.results = results
        self.images = []

    def detect_poses(self, oriImg, include_hand=False, include_face=False):  # noqa: N803 (its name)
        self.images.append(np.array(oriImg))
        return [r if include_face else r._replace(face=None) for r in self.results]
