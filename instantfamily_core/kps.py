"""InstantID keypoint images: the five insightface face points of every identity slot, drawn on one canvas.

InstantID's IdentityNet reads a *keypoint image*: on black, each face's five insightface points (kp0 the eye on
the image's left, kp1 the eye on the image's right, kp2 the nose tip, kp3 / kp4 the mouth corners on the image's
left / right) joined to the nose by ellipses and marked by discs. The reference (``draw_kps`` of
instantX-research/InstantID's SDXL pipeline, Apache-2.0; re-implemented here from its description, see
/work/shared/notes/sdxl-weights.md §1.4) draws one face on an image-sized canvas:

1. a float canvas of zeros; for each limb ``(a, 2)`` with ``a`` = 0, 1, 3, 4 in that order, a filled convex
   polygon from ``cv2.ellipse2Poly(centre, axes, angle, 0, 360, 1)`` with ``centre = (int(mean x), int(mean y))``
   of the two points, ``axes = (int(length / 2), 4)``, ``angle = int(degrees(atan2(y_a − y_2, x_a − x_2)))``
   (first point minus nose; ``int`` truncates towards zero), in the colour of point ``a`` — later limbs overwrite
   earlier ones;
2. the canvas times 0.6, truncated to uint8 (so a limb is ``int(0.6 · colour)``, 255 → 153);
3. filled discs of radius 10 at ``(int(x), int(y))`` of kp0…kp4 in that order, in full colour.

Colours are RGB: kp0 red, kp1 green, kp2 blue, kp3 yellow, kp4 magenta (:data:`KPS_COLORS`). Drawing is
cv2's default 8-connected rasterisation, no anti-aliasing.

This module draws **all faces on one canvas** (the multi-person IdentityNet hint): first every face's limbs (in
the order the faces are given), then every face's discs, so a disc is never hidden under another face's limb.
Where faces do not overlap, the canvas equals each face drawn alone.

**Size rule.** The reference's stick half-width 4 and radius 10 are kept at the SDXL working size and scaled
with the canvas otherwise: ``s = sqrt(H · W) / 1024``; stick = ``max(1, round(4 · s))``, radius =
``max(1, round(10 · s))``, rounding halves up (:func:`kps_draw_sizes`). The geometric mean of the sides is used,
not the shorter side, because SDXL's resolutions all hold about 1024² pixels: every SDXL bucket (1024², 1152×896,
1216×832, 1344×768, 1536×640, …) gets exactly the published 4 and 10, as at 1024×1024; 512² gets 2 and 5,
2048² gets 8 and 20. The ellipse lengths come from the points and are never scaled.

Where the points come from (:func:`kps_for_slots`): a person's OpenPose/DWPose face landmarks
(:func:`five_points_from_openpose_face`), or, for poses built from detected faces (``pose.pose_from_faces``),
the detector's own five points passed in. Body points alone give none (:func:`five_points_from_body`).

Imports numpy and (lazily) opencv only.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from .errors import IdentityCountError, PoseError
from .pose import SlotAssignment
from .render import COORD_LIMIT

KPS_COLORS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255))  # RGB, kp0…kp4
KPS_LIMBS = ((0, 2), (1, 2), (3, 2), (4, 2))  # every point to the nose; drawn in the colour of the first point
KPS_STICK_WIDTH = 4        # ellipse half-width (minor semi-axis) at the reference size
KPS_RADIUS = 10            # disc radius at the reference size
KPS_LIMB_SHADE = 0.6       # the limb layer is multiplied by this
KPS_REFERENCE_SIDE = 1024  # sqrt(H·W) at which the reference sizes apply

# OpenPose / DWPose face landmarks: the 68 iBUG points (0-based), then the pupils (OpenPose's 70-point face).
# iBUG "right" is the subject's right, i.e. the image's left for a frontal face — insightface's kp0 side.
RIGHT_EYE_CONTOUR = tuple(range(36, 42))  # subject's right eye → kp0
LEFT_EYE_CONTOUR = tuple(range(42, 48))   # subject's left eye → kp1
RIGHT_PUPIL, LEFT_PUPIL = 68, 69          # OpenPose: 68 = right pupil (with 36–41), 69 = left pupil (with 42–47)
NOSE_TIP = 30
MOUTH_RIGHT_CORNER, MOUTH_LEFT_CORNER = 48, 54  # subject's right (image left) → kp3; subject's left → kp4
EYE_CONTOUR_MIN = 3        # an eye from its contour needs at least this many of the 6 points


def _cv2():
    import cv2  # opencv comes with insightface; imported lazily to keep the core importable without it
    return cv2


def _half_up(v: float) -> int:
    return int(math.floor(v + 0.5))


def kps_draw_sizes(height: int, width: int) -> tuple[int, int]:
    """``(stick half-width, disc radius)`` in pixels for an ``height``×``width`` canvas: the reference's 4 and 10
    times ``sqrt(H·W) / 1024``, rounded half up, at least 1 (4, 10 at 1024² and every SDXL resolution; 2, 5 at
    512²; 8, 20 at 2048²)."""
    s = math.sqrt(int(height) * int(width)) / KPS_REFERENCE_SIDE
    return max(1, _half_up(KPS_STICK_WIDTH * s)), max(1, _half_up(KPS_RADIUS * s))


def _as_five(points, what: str) -> np.ndarray:
    """``points`` as a float (5, 2) array (extra columns such as a confidence are dropped); PoseError if it is
    not five finite points."""
    try:
        arr = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError):
        raise PoseError(f"{what}: expected five [x, y] points, got {type(points).__name__}") from None
    if arr.ndim == 1 and arr.size in (10, 15):
        arr = arr.reshape(5, -1)
    if arr.ndim != 2 or arr.shape[0] != 5 or arr.shape[1] < 2:
        raise PoseError(f"{what}: expected five [x, y] points (shape (5, 2)), got shape {tuple(arr.shape)}")
    arr = arr[:, :2].copy()
    if not np.isfinite(arr).all():
        raise PoseError(f"{what}: the five points contain NaN or infinite values")
    return arr


def five_points_from_openpose_face(face70, min_confidence: float = 0.0) -> Optional[np.ndarray]:
    """The five insightface-order points ``(5, 2)`` of an OpenPose/DWPose face, or None.

    ``face70``: ``(K, 3)`` ``[x, y, confidence]`` (or the flat list), the 68 iBUG landmarks followed, in
    OpenPose's 70-point face, by the pupils (68: the subject's right, 69: the left). A point counts when its
    confidence is above ``min_confidence`` and it is finite.

    - kp0 (image-left eye for a frontal face) = the subject's **right** eye: pupil 68 when it counts, else the mean
      of the counted contour points 36–41 when at least 3 of the 6 count;
    - kp1 = the subject's left eye: pupil 69, else the mean of 42–47 (same rule);
    - kp2 = nose tip 30; kp3 = mouth corner 48 (subject's right); kp4 = mouth corner 54 (subject's left).

    The mapping is by anatomy, never by x: a frontal face has kp0 and kp3 at the smaller x, as insightface does.
    None when fewer than 68 landmarks are given or any of the five cannot be found — no point is guessed.
    """
    if face70 is None:
        return None
    pts = np.asarray(face70, dtype=np.float64)
    if pts.ndim == 1:
        if pts.size % 3:
            return None
        pts = pts.reshape(-1, 3)
    if pts.ndim != 2 or pts.shape[1] < 3 or pts.shape[0] < 68:
        return None
    ok = (pts[:, 2] > min_confidence) & np.isfinite(pts[:, :3]).all(axis=1)

    def eye(pupil: int, contour: tuple[int, ...]) -> Optional[np.ndarray]:
        if pts.shape[0] >= 70 and ok[pupil]:
            return pts[pupil, :2]
        seen = [i for i in contour if ok[i]]
        return pts[seen, :2].mean(axis=0) if len(seen) >= EYE_CONTOUR_MIN else None

    five = [eye(RIGHT_PUPIL, RIGHT_EYE_CONTOUR), eye(LEFT_PUPIL, LEFT_EYE_CONTOUR)]
    five += [pts[i, :2] if ok[i] else None for i in (NOSE_TIP, MOUTH_RIGHT_CORNER, MOUTH_LEFT_CORNER)]
    if any(p is None for p in five):
        return None
    return np.stack(five).astype(np.float64)


def five_points_from_body(body18) -> None:
    """Always None: a person without face points gets no keypoints.

    The 18 body points hold eyes and nose but no mouth, and IdentityNet reads the mouth corners as part of the face
    geometry; inventing them from the eyes would hand it a face shape nobody detected. A slot whose person has only
    body points therefore draws nothing on the keypoint image (its identity still acts through its mask). Use a pose
    with face landmarks, or pass the face detector's five points to :func:`kps_for_slots`."""
    if body18 is not None:
        b = np.asarray(body18, dtype=np.float64)
        if b.ndim != 2 or b.shape[0] != 18:
            raise PoseError(f"body: expected 18 [x, y, confidence] points, got shape {tuple(b.shape)}")
    return None


def kps_for_slots(slots: SlotAssignment, detected: Optional[Sequence] = None) -> list[Optional[np.ndarray]]:
    """Per identity slot, in slot order (= identity order), its five points ``(5, 2)`` in frame pixels, or None.

    - an empty slot (padding or a skipped identity, ``slots.is_empty(n)``) → None;
    - ``detected[n]`` given (not None) → those points: the face detector's five insightface points, for poses made
      by ``pose.pose_from_faces`` (whose people carry no face landmarks). ``detected`` has one entry per slot, in
      slot order and in the frame's pixel coordinates. Note that ``pose_from_faces`` orders its people left to
      right by box centre, so slot ``n``'s face is the detected face of person ``slots.person_of_slot[n]`` in that
      order;
    - otherwise the person's face landmarks (:func:`five_points_from_openpose_face`); a person without them gets
      None (:func:`five_points_from_body`).
    """
    n_slots = slots.num_slots
    if detected is not None:
        detected = list(detected)
        if len(detected) != n_slots:
            raise IdentityCountError(f"detected keypoints: {len(detected)} entries for {n_slots} identity slots; "
                                     "give one entry (five points or None) per slot")
    out: list[Optional[np.ndarray]] = []
    for n in range(n_slots):
        if slots.is_empty(n):
            out.append(None)
            continue
        if detected is not None and detected[n] is not None:
            out.append(_as_five(detected[n], f"detected keypoints of slot {n}"))
            continue
        person_index = slots.person_of_slot[n]
        if person_index is None:
            out.append(None)
            continue
        person = slots.frame.people[person_index]
        if person.kps5 is not None and (person.kps5[:, 2] > 0).all():
            out.append(person.kps5[:, :2].copy())  # the detector's own points (pose_from_faces, bundled templates)
        elif person.face is None:
            out.append(five_points_from_body(person.body))
        else:
            out.append(five_points_from_openpose_face(person.face))
    return out


def draw_kps_canvas(height: int, width: int, points_per_face: Sequence) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB: every face's five points drawn by the reference rule (module docstring) on one
    black canvas, sizes from :func:`kps_draw_sizes`. ``points_per_face``: five ``[x, y]`` points (pixels,
    insightface order) or None per face; None draws nothing. Limbs of all faces first, then all discs."""
    height, width = int(height), int(width)
    if height < 1 or width < 1:
        raise PoseError(f"keypoint image: size must be positive, got {width}×{height}")
    cv2 = _cv2()
    stick, radius = kps_draw_sizes(height, width)
    faces = [np.clip(_as_five(p, f"keypoints of face {i}"), -COORD_LIMIT, COORD_LIMIT)
             for i, p in enumerate(points_per_face) if p is not None]
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    # Limbs straight on the uint8 canvas in the shaded colour: a filled polygon overwrites, so this equals the
    # reference's float layer multiplied by 0.6 and truncated.
    for pts in faces:
        for a, b in KPS_LIMBS:
            (xa, ya), (xb, yb) = pts[a], pts[b]
            dx, dy = xa - xb, ya - yb
            length = math.sqrt(dx * dx + dy * dy)
            angle = int(math.degrees(math.atan2(dy, dx)))
            centre = (int((xa + xb) / 2), int((ya + yb) / 2))
            poly = cv2.ellipse2Poly(centre, (int(length / 2), stick), angle, 0, 360, 1)
            shade = tuple(int(c * KPS_LIMB_SHADE) for c in KPS_COLORS[a])
            cv2.fillConvexPoly(canvas, poly, shade)
    for pts in faces:
        for k in range(5):
            cv2.circle(canvas, (int(pts[k, 0]), int(pts[k, 1])), radius, KPS_COLORS[k], thickness=-1)
    return canvas


def draw_kps_image(slots: SlotAssignment, detected: Optional[Sequence] = None) -> np.ndarray:
    """The IdentityNet keypoint image of a slot assignment: :func:`draw_kps_canvas` at the frame's size with
    :func:`kps_for_slots` (faces in slot order)."""
    return draw_kps_canvas(slots.frame.height, slots.frame.width, kps_for_slots(slots, detected))
