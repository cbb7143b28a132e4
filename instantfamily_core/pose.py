"""OpenPose keypoints → people, face boxes, identity slots and masks.

Input is the JSON shape of ComfyUI's ``POSE_KEYPOINT`` type (comfyui_controlnet_aux): a list of frames
``{"canvas_width", "canvas_height", "people": [{"pose_keypoints_2d": [x, y, c]×18, "face_keypoints_2d": [x, y, c]×70
or ×68 or null, …}]}``. A single frame dict or a JSON string is accepted too. ``c <= 0`` marks a missing point.
BODY_25 people (25 points) are mapped onto the 18-point COCO layout.

Coordinates may be pixels or normalised to [0, 1]; a frame whose valid coordinates all lie within
``[-NORMALISED_TOLERANCE, NORMALISED_TOLERANCE]`` is taken as normalised (detectors put points slightly outside
the frame, e.g. x = 1.03, so a strict ``<= 1`` test would misread it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from .errors import FaceKeypointsError, IdentityCountError, PoseError
from .masks import boxes_to_masks

NOSE, NECK, R_EYE, L_EYE, R_EAR, L_EAR = 0, 1, 14, 15, 16, 17
NORMALISED_TOLERANCE = 2.0
DEFAULT_MARGIN = 0.25
FACE_POINTS_FOREHEAD = 0.35  # 68/70-point faces have no forehead: extend the box up by this share of its height
_BODY25_TO_COCO18 = [0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]


@dataclass(frozen=True)
class Person:
    """One person in pixel coordinates of the frame's canvas. ``body``: (18, 3); ``face``: (K, 3) or None."""

    body: np.ndarray
    face: Optional[np.ndarray] = None


@dataclass(frozen=True)
class PoseFrame:
    width: int
    height: int
    people: tuple[Person, ...]

    def scaled(self, width: int, height: int) -> "PoseFrame":
        """The same people on a ``width×height`` canvas (each axis stretched independently)."""
        sx, sy = width / self.width, height / self.height
        return PoseFrame(width, height, tuple(Person(_scale(p.body, sx, sy), _scale(p.face, sx, sy))
                                              for p in self.people))


def _points(raw, name: str, what: str) -> Optional[np.ndarray]:
    if raw is None:
        return None
    try:
        arr = np.asarray(raw, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise PoseError(f"{name}: {what} must be a flat list of numbers [x, y, confidence, …]") from None
    if arr.size == 0:
        return None
    if arr.size % 3:
        raise PoseError(f"{name}: {what} has {arr.size} numbers; expected triples [x, y, confidence]")
    pts = arr.reshape(-1, 3)
    if not np.isfinite(pts).all():
        raise PoseError(f"{name}: {what} contains NaN or infinite values")
    return pts


def parse_pose(data, frame: int = 0, name: str = "pose_keypoint") -> PoseFrame:
    """Parse one frame of POSE_KEYPOINT data into a :class:`PoseFrame` in pixel coordinates."""
    if isinstance(data, (str, bytes)):
        try:
            data = json.loads(data)
        except json.JSONDecodeError as e:
            raise PoseError(f"{name}: not valid JSON ({e})") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, (list, tuple)) or not data:
        raise PoseError(f"{name}: expected a non-empty list of frames with 'people', 'canvas_width' and "
                        f"'canvas_height'; got {type(data).__name__ if data is not None else None}"
                        + (" with no frames" if isinstance(data, (list, tuple)) else ""))
    if not 0 <= frame < len(data):
        raise PoseError(f"{name}: frame {frame} requested but the pose has {len(data)} frame(s)")
    f = data[frame]
    if not isinstance(f, dict):
        raise PoseError(f"{name}: frame {frame} must be a dict, got {type(f).__name__}")
    try:
        width, height = int(f["canvas_width"]), int(f["canvas_height"])
    except (KeyError, TypeError, ValueError):
        raise PoseError(f"{name}: frame {frame} needs integer 'canvas_width' and 'canvas_height'") from None
    if width < 1 or height < 1:
        raise PoseError(f"{name}: canvas size must be positive, got {width}×{height}")
    people_raw = f.get("people") or []
    if not isinstance(people_raw, (list, tuple)):
        raise PoseError(f"{name}: 'people' must be a list")

    people = []
    for i, p in enumerate(people_raw):
        who = f"{name}: person {i}"
        if not isinstance(p, dict):
            raise PoseError(f"{who} must be a dict with 'pose_keypoints_2d'")
        body = _points(p.get("pose_keypoints_2d"), name, f"person {i} pose_keypoints_2d")
        if body is None:
            body = np.zeros((18, 3))
        elif len(body) == 25:
            body = body[_BODY25_TO_COCO18]
        elif len(body) != 18:
            raise PoseError(f"{who}: pose_keypoints_2d has {len(body)} points; expected 18 (COCO) or 25 (BODY_25)")
        face = _points(p.get("face_keypoints_2d"), name, f"person {i} face_keypoints_2d")
        people.append(Person(body, face))
    if not people:
        raise PoseError(f"{name}: frame {frame} has no people; expected at least one person with keypoints")

    valid = np.concatenate([a[a[:, 2] > 0, :2] for p in people for a in (p.body, p.face) if a is not None]
                           or [np.zeros((0, 2))])
    if valid.size == 0:
        raise PoseError(f"{name}: no keypoint has a confidence above 0; the pose is empty")
    if np.abs(valid).max() <= NORMALISED_TOLERANCE:
        people = [Person(_scale(p.body, width, height), _scale(p.face, width, height)) for p in people]
    return PoseFrame(width, height, tuple(people))


def _scale(a: Optional[np.ndarray], sx: float, sy: float) -> Optional[np.ndarray]:
    """A copy of keypoints ``a`` (K, 3) with x multiplied by ``sx`` and y by ``sy``."""
    if a is None:
        return None
    a = a.copy()
    a[:, 0] *= sx
    a[:, 1] *= sy
    return a


def face_box(person: Person) -> Optional[tuple[float, float, float, float]]:
    """The face box (x1, y1, x2, y2) in pixels, before margin; None when the keypoints locate no face.

    With face points (≥ 3 valid): their tight box, extended upwards by 35 % of its height (no forehead points).
    Otherwise from the body: centre on the nose (or the mean of the visible eyes/ears), half-size
    ``max(3·d(nose, eye), 1.5·d(nose, ear))`` with ``d`` the L∞ distance, falling back to ``0.6·d(nose, neck)``.
    """
    if person.face is not None:
        pts = person.face[person.face[:, 2] > 0, :2]
        if len(pts) >= 3:
            x1, y1 = pts.min(0)
            x2, y2 = pts.max(0)
            if x2 > x1 and y2 > y1:
                return float(x1), float(y1 - FACE_POINTS_FOREHEAD * (y2 - y1)), float(x2), float(y2)
    b = person.body
    ok = b[:, 2] > 0
    head = [i for i in (R_EYE, L_EYE, R_EAR, L_EAR) if ok[i]]
    if ok[NOSE]:
        centre = b[NOSE, :2]
    elif head:
        centre = b[head, :2].mean(0)
    else:
        return None
    half = 0.0
    for idx, factor in ((R_EYE, 3.0), (L_EYE, 3.0), (R_EAR, 1.5), (L_EAR, 1.5)):
        if ok[idx]:
            half = max(half, factor * float(np.abs(b[idx, :2] - centre).max()))
    if half <= 0 and ok[NECK]:
        half = 0.6 * float(np.abs(b[NECK, :2] - centre).max())
    if half <= 0:
        return None
    cx, cy = float(centre[0]), float(centre[1])
    return cx - half, cy - half, cx + half, cy + half


def expand_box(box, margin: float, width: int, height: int) -> tuple[float, float, float, float]:
    """Scale a box about its centre by ``1 + margin`` (0.25 → 25 % larger per side length), clipped to the canvas."""
    x1, y1, x2, y2 = box
    cx, cy, hw, hh = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) * (1 + margin) / 2, (y2 - y1) * (1 + margin) / 2
    return max(0.0, cx - hw), max(0.0, cy - hh), min(float(width), cx + hw), min(float(height), cy + hh)


@dataclass(frozen=True)
class SlotAssignment:
    """Which person holds each identity slot, with the face geometry of each slot (pixels of the frame).

    A slot can be *empty*: ``face_boxes[n] is None`` (and ``mask_boxes[n] is None``). An empty slot keeps its place
    and colour index but draws no circle and gets an all-zero mask, so no identity acts there — a padding slot of a
    training sample (``person_of_slot[n] is None``) or a skipped identity whose person stays reserved
    (``person_of_slot[n]`` = that person)."""

    frame: PoseFrame
    person_of_slot: tuple[Optional[int], ...]
    face_boxes: tuple[Optional[tuple[float, float, float, float]], ...]
    mask_boxes: tuple[Optional[tuple[float, float, float, float]], ...]

    @property
    def num_slots(self) -> int:
        return len(self.person_of_slot)

    def is_empty(self, n: int) -> bool:
        return self.face_boxes[n] is None

    def centres(self) -> list[Optional[tuple[float, float]]]:
        return [None if b is None else ((b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for b in self.face_boxes]

    def masks(self) -> torch.Tensor:
        """``(N, H, W)`` float masks at the frame's canvas size, one per slot (all zero for an empty slot)."""
        masks = torch.zeros(self.num_slots, self.frame.height, self.frame.width)
        used = [n for n in range(self.num_slots) if self.mask_boxes[n] is not None]
        if used:
            masks[used] = boxes_to_masks([self.mask_boxes[n] for n in used], self.frame.height, self.frame.width)
        return masks


def assign_slots(frame: PoseFrame, num_identities: int, order: Optional[Sequence[Optional[int]]] = None,
                 margin: float = DEFAULT_MARGIN, name: str = "pose_keypoint",
                 empty: Sequence[int] = ()) -> SlotAssignment:
    """Give identity slots 0…N−1 to people: left to right by face centre, or ``order[n]`` = person index of slot n.

    ``order[n] = None`` leaves slot n without a person (a padding slot). ``empty``: slots that keep the person the
    order gives them (so later slots do not shift) but get no circle and no mask — identities that were skipped.
    People without a slot keep their skeleton but get no circle and no mask.
    """
    if num_identities < 0:
        raise IdentityCountError(f"identities: count must be ≥ 0, got {num_identities}")
    if not 0 <= margin <= 10:
        raise PoseError(f"margin: expected a fraction between 0 and 10 (0.25 = 25 %), got {margin}")
    empty = {int(n) for n in empty}
    if any(not 0 <= n < num_identities for n in empty):
        raise IdentityCountError(f"empty slots {sorted(empty)}: out of range for {num_identities} identities")
    boxes = [face_box(p) for p in frame.people]
    located = [i for i, b in enumerate(boxes) if b is not None]
    if order is None or len(order) == 0:
        if num_identities > len(frame.people):
            raise IdentityCountError(f"{name}: {num_identities} identities but the pose has only "
                                     f"{len(frame.people)} people; add people to the pose or remove identities")
        if num_identities > len(located):
            missing = [i for i, b in enumerate(boxes) if b is None]
            raise FaceKeypointsError(f"{name}: {num_identities} identities but only {len(located)} of "
                                     f"{len(frame.people)} people have usable face keypoints (persons {missing} "
                                     "have no nose, eyes, ears or face points)")
        by_x = sorted(located, key=lambda i: ((boxes[i][0] + boxes[i][2]) / 2, (boxes[i][1] + boxes[i][3]) / 2))
        chosen: list[Optional[int]] = list(by_x[:num_identities])
    else:
        chosen = [None if i is None else int(i) for i in order]
        if len(chosen) != num_identities:
            raise IdentityCountError(f"identity order: {len(chosen)} entries for {num_identities} identities; "
                                     "give one person index per identity")
        people = [i for i in chosen if i is not None]
        if len(set(people)) != len(people):
            raise IdentityCountError(f"identity order: person indices repeat in {chosen}")
        for i in people:
            if not 0 <= i < len(frame.people):
                raise IdentityCountError(f"identity order: person {i} does not exist; the pose has "
                                         f"{len(frame.people)} people (indices 0…{len(frame.people) - 1})")
            if boxes[i] is None:
                raise FaceKeypointsError(f"{name}: person {i} has no usable face keypoints (no nose, eyes, ears "
                                         "or face points) and cannot hold an identity")
    face = tuple(None if i is None or n in empty else boxes[i] for n, i in enumerate(chosen))
    masked = tuple(None if b is None else expand_box(b, margin, frame.width, frame.height) for b in face)
    return SlotAssignment(frame, tuple(chosen), face, masked)


def parse_order(text: str, name: str = "identity_order") -> Optional[list[int]]:
    """``"2,0,1"`` → ``[2, 0, 1]``; empty or ``"auto"`` → None (left to right)."""
    text = (text or "").strip()
    if text.lower() in ("", "auto"):
        return None
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise IdentityCountError(f"{name}: expected comma-separated person indices like '1,0,2' or 'auto', "
                                 f"got {text!r}") from None


def pose_from_faces(faces, width: int, height: int) -> dict:
    """A POSE_KEYPOINT frame from detected faces alone (no body detector needed).

    ``faces``: sequence of ``(bbox (x1, y1, x2, y2), kps (5, 2))`` in pixels, kps in insightface order (image-left
    eye, image-right eye, nose, mouth corners). Each person gets nose, eyes, ears (at the box sides, eye height)
    and a neck below the chin — enough for face boxes, slot circles and a head-and-neck skeleton. People are
    ordered left to right.
    """
    people = []
    for bbox, kps in sorted(faces, key=lambda f: (f[0][0] + f[0][2]) / 2):
        x1, y1, x2, y2 = (float(v) for v in bbox)
        k = np.asarray(kps, dtype=np.float64).reshape(5, 2)
        body = np.zeros((18, 3))
        eye_y = (k[0, 1] + k[1, 1]) / 2
        body[NOSE] = (k[2, 0], k[2, 1], 1)
        body[R_EYE] = (k[0, 0], k[0, 1], 1)  # the person's right eye appears on the image's left
        body[L_EYE] = (k[1, 0], k[1, 1], 1)
        body[R_EAR] = (x1, eye_y, 1)
        body[L_EAR] = (x2, eye_y, 1)
        body[NECK] = ((x1 + x2) / 2, y2 + 0.35 * (y2 - y1), 1)
        people.append({"pose_keypoints_2d": body.reshape(-1).tolist(), "face_keypoints_2d": None})
    return {"people": people, "canvas_width": int(width), "canvas_height": int(height)}
