"""Drawing: the OpenPose control image with identity circles, and a preview of masks and slots.

The skeleton follows the standard OpenPose/ControlNet rendering (18 COCO points, 17 limbs drawn as filled
ellipses of half-width 4 at 60 % of the limb colour, joints as radius-4 discs) so the usual OpenPose ControlNet
reads it. Those sizes are for a 512-px canvas, as the annotators draw at their 512-px detect resolution and scale
the picture to the output: on a larger canvas (SDXL's 1024², 1216×832 …) widths and radii grow with the shorter
side (:func:`draw_scale`); at 512 px and below they are exactly the classic ones. On top, each identity slot gets a filled circle at its face centre in :func:`slot_color` — the paper's
"coloured circles" telling the model which identity goes where. The palette and radius are part of the
checkpoint contract: training and inference both draw through this module.
"""

from __future__ import annotations

import colorsys
import math

import numpy as np

from .pose import PoseFrame, SlotAssignment, expand_box, face_box

LIMBS = [(1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13),
         (1, 0), (0, 14), (14, 16), (0, 15), (15, 17)]
JOINT_COLORS = [(255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
                (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
                (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85)]
STICK_WIDTH = 4

# Slot colours (RGB). Chosen away from the skeleton's fully saturated hues; slot n ≥ 8 continues on a
# golden-ratio hue walk at lower saturation so any number of slots gets distinct, deterministic colours.
SLOT_PALETTE = [(255, 255, 255), (128, 128, 128), (255, 128, 128), (128, 128, 255), (128, 255, 128),
                (255, 224, 128), (224, 128, 255), (128, 224, 224)]
CIRCLE_RADIUS_FRACTION = 0.2  # circle radius = this × the shorter side of the face box (before margin), ≥ 3 px
COORD_LIMIT = float(1 << 20)  # drawing coordinates are clamped to ±this many pixels (OpenCV takes int32)


def px(v) -> int:
    """A drawing coordinate: ``v`` clamped to ±:data:`COORD_LIMIT` (far-off keypoints draw nothing on the
    canvas instead of overflowing OpenCV's int32), as an int."""
    return int(min(COORD_LIMIT, max(-COORD_LIMIT, float(v))))


def slot_color(n: int) -> tuple[int, int, int]:
    if n < len(SLOT_PALETTE):
        return SLOT_PALETTE[n]
    h = (0.13 + 0.618033988749895 * (n - len(SLOT_PALETTE))) % 1.0
    r, g, b = colorsys.hsv_to_rgb(h, 0.45, 0.9)
    return int(r * 255), int(g * 255), int(b * 255)


def _cv2():
    import cv2  # opencv comes with insightface; imported lazily to keep the core importable without it
    return cv2


def draw_scale(height: int, width: int) -> float:
    """How much thicker than at 512 px lines and dots are drawn on an ``height``×``width`` canvas (≥ 1)."""
    return max(1.0, min(int(height), int(width)) / 512.0)


def draw_skeletons(frame: PoseFrame) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB image of every person's body skeleton on black (sizes: :func:`draw_scale`)."""
    cv2 = _cv2()
    canvas = np.zeros((frame.height, frame.width, 3), dtype=np.uint8)
    scale = draw_scale(frame.height, frame.width)
    stick, joint = int(round(STICK_WIDTH * scale)), int(round(4 * scale))
    for person in frame.people:
        b = person.body
        for i, (a, c) in enumerate(LIMBS):
            if b[a, 2] <= 0 or b[c, 2] <= 0:
                continue
            (x0, y0), (x1, y1) = (np.clip(b[j, :2], -COORD_LIMIT, COORD_LIMIT) for j in (a, c))
            length = math.hypot(x1 - x0, y1 - y0)
            angle = math.degrees(math.atan2(y1 - y0, x1 - x0))
            poly = cv2.ellipse2Poly((int((x0 + x1) / 2), int((y0 + y1) / 2)), (int(length / 2), stick),
                                    int(angle), 0, 360, 1)
            cv2.fillConvexPoly(canvas, poly, [int(v * 0.6) for v in JOINT_COLORS[i]])
        for i in range(18):
            if b[i, 2] > 0:
                cv2.circle(canvas, (px(b[i, 0]), px(b[i, 1])), joint, JOINT_COLORS[i], thickness=-1)
    return canvas


FACE_POINT_RADIUS = 3  # OpenPose's face landmarks: white dots of radius 3 (ControlNet annotator draw_facepose)


def draw_openpose_image(frame: PoseFrame, face_points: bool = True) -> np.ndarray:
    """The plain OpenPose rendering for a stock OpenPose ControlNet: skeletons, plus each person's face landmarks
    as white dots when the pose has them; no slot circles (those are InstantFamily's own, out of distribution
    for ``control_v11p_sd15_openpose``)."""
    cv2 = _cv2()
    canvas = draw_skeletons(frame)
    radius = int(round(FACE_POINT_RADIUS * draw_scale(frame.height, frame.width)))
    if face_points:
        for person in frame.people:
            if person.face is None:
                continue
            for x, y, c in person.face:
                if c > 0:
                    cv2.circle(canvas, (px(x), px(y)), radius, (255, 255, 255), thickness=-1)
    return canvas


def circle_radius(face_box) -> int:
    x1, y1, x2, y2 = face_box
    return max(3, int(round(CIRCLE_RADIUS_FRACTION * min(x2 - x1, y2 - y1))))


def draw_control_image(slots: SlotAssignment) -> np.ndarray:
    """The control image: skeletons plus one filled circle per identity slot at its face centre (empty slots:
    none, their colour is simply absent)."""
    cv2 = _cv2()
    canvas = draw_skeletons(slots.frame)
    for n, (box, centre) in enumerate(zip(slots.face_boxes, slots.centres())):
        if box is None:  # empty slot (padding or skipped identity): no circle
            continue
        cx, cy = centre
        cv2.circle(canvas, (px(round(cx)), px(round(cy))), min(circle_radius(box), px(COORD_LIMIT)), slot_color(n),
                   thickness=-1)
    return canvas


def draw_preview(control: np.ndarray, slots: SlotAssignment, masks=None) -> np.ndarray:
    """A person-readable check of the assignment: masks tinted in their slot colour over the control image,
    mask outlines and the slot number at each face; a skipped identity's person gets a grey box and
    "<n> skipped"."""
    cv2 = _cv2()
    img = control.astype(np.float32)
    m = slots.masks() if masks is None else masks
    m = np.asarray(m, dtype=np.float32)
    for n in range(m.shape[0]):
        color = np.array(slot_color(n), dtype=np.float32)
        a = 0.45 * m[n][..., None]
        img = img * (1 - a) + color * a
    out = np.clip(img, 0, 255).astype(np.uint8)
    scale = max(0.4, min(slots.frame.width, slots.frame.height) / 512)
    for n, box in enumerate(slots.mask_boxes):
        label = str(n + 1)
        color = slot_color(n)
        if box is None:  # empty slot: a skipped identity's person is marked, a padding slot has no person
            person = slots.person_of_slot[n]
            fb = None if person is None else face_box(slots.frame.people[person])
            if fb is None:
                continue
            box = expand_box(fb, 0.0, slots.frame.width, slots.frame.height)
            label += " skipped"
            color = (160, 160, 160)
        x1, y1, x2, y2 = box
        cv2.rectangle(out, (px(x1), px(y1)), (max(px(x1), px(x2) - 1), max(px(y1), px(y2) - 1)), color, 1)
        org = (px(x1) + 2, px(y1) + int(18 * scale))
        cv2.putText(out, label, org, cv2.FONT_HERSHEY_SIMPLEX, 0.6 * scale, (0, 0, 0), 3, cv2.LINE_AA)
        cv2.putText(out, label, org, cv2.FONT_HERSHEY_SIMPLEX, 0.6 * scale, color, 1, cv2.LINE_AA)
    return out


def draw_caption(image: np.ndarray, text: str) -> np.ndarray:
    """``image`` (H×W×3 uint8) with ``text`` written along its bottom edge (black outline, white letters)."""
    cv2 = _cv2()
    out = image.copy()
    scale = max(0.3, min(out.shape[0], out.shape[1]) / 512 * 0.6)
    org = (4, out.shape[0] - 6)
    cv2.putText(out, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(out, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return out
