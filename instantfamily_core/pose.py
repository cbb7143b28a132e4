"""OpenPose keypoints → people, face boxes, identity slots and masks.

Input is the JSON shape of ComfyUI's ``POSE_KEYPOINT`` type (comfyui_controlnet_aux): a list of frames
``{"canvas_width", "canvas_height", "people": [{"pose_keypoints_2d": [x, y, c]×18, "face_keypoints_2d": [x, y, c]×70
or ×68 or null, …}]}``. A single frame dict or a JSON string is accepted too. ``c <= 0`` marks a missing point,
and so does controlnet-aux's marker: its OpenPose writes a point it could not place as x (or y) = −1 before
normalising, i.e. −1/W (−1/H) in normalised frames, with confidence 1 — such a point is dropped, never used.
BODY_25 people (25 points) are mapped onto the 18-point COCO layout. A person may carry ``"face_box_2d": [x1, y1,
x2, y2]``, the face detector's box (written by Pose from Image's ``faces`` method and by the training shards).

Face boxes follow one rule whatever made the pose (:func:`face_box`): the box the face detector would give. The
mask is that box + margin (25 % by default), the paper's "detector box + 25 %".

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

from .errors import FaceKeypointsError, IdentityCountError, OptionError, PoseError
from .masks import boxes_to_masks

NOSE, NECK, R_EYE, L_EYE, R_EAR, L_EAR = 0, 1, 14, 15, 16, 17
NORMALISED_TOLERANCE = 2.0
DEFAULT_MARGIN = 0.25

# Face-box calibration (see face_box). Measured by tools/calibrate_face_box.py on 8 real faces (insightface's t1.jpg,
# skimage's astronaut, matplotlib's grace_hopper): detector boxes from MTCNN (trained on WIDER FACE like
# insightface's SCRFD), 68 landmarks from dlib; medians.
FACE_POINTS_MIN = 20          # a face-keypoint set with fewer valid points is partial: the body decides
FACE_POINTS_WIDTH = 0.965     # detector width / tight width of the 68/70 face points
FACE_POINTS_TOP = 0.29        # detector top = tight top − this × tight height (no forehead points)
FACE_POINTS_BOTTOM = -0.06    # detector bottom = tight bottom + this × tight height (just above the chin point)
BODY_EYES_NOSE = 1.6          # width = this × hypot(eye distance, BODY_EYE_NOSE_WEIGHT × eyes-to-nose distance)
BODY_EYE_NOSE_WEIGHT = 1.6
BODY_ONE_EYE_NOSE = 2.9       # width = this × |eye − nose| when only one eye is seen
BODY_EARS = 0.92              # width = this × |ear − ear|
BODY_NOSE_EAR = 1.27          # width = this × max |nose − ear| when only one ear is seen
BODY_EYES_ONLY = 2.3          # width = this × eye distance when there is no nose
BODY_NECK = 1.2               # fallback (uncalibrated): width = this × |nose − neck|
BOX_ASPECT = 1.27             # detector height / width
CENTRE_BELOW_EYES = 0.10      # box centre = eye height + this × width
CENTRE_ABOVE_NOSE = 0.15      # without eyes: box centre = nose height − this × width
_BODY25_TO_COCO18 = [0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]


@dataclass(frozen=True)
class Person:
    """One person in pixel coordinates of the frame's canvas. ``body``: (18, 3); ``face``: (K, 3) or None;
    ``box``: the face detector's box as two points ``[[x1, y1, 1], [x2, y2, 1]]`` or None; ``kps5``: the face
    detector's 5 keypoints (5, 3) in insightface order (image-left eye, image-right eye, nose, mouth corners) or
    None — read from this pack's ``face_kps_5`` key (faces detected in a photo, bundled templates)."""

    body: np.ndarray
    face: Optional[np.ndarray] = None
    box: Optional[np.ndarray] = None
    kps5: Optional[np.ndarray] = None


@dataclass(frozen=True)
class PoseFrame:
    width: int
    height: int
    people: tuple[Person, ...]

    def scaled(self, width: int, height: int) -> "PoseFrame":
        """The same people on a ``width×height`` canvas (each axis stretched independently)."""
        sx, sy = width / self.width, height / self.height
        return PoseFrame(width, height, tuple(Person(_scale(p.body, sx, sy), _scale(p.face, sx, sy),
                                                     _scale(p.box, sx, sy), _scale(p.kps5, sx, sy))
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


def count_frames(data) -> int:
    """How many frames a POSE_KEYPOINT value holds: 1 for a single frame dict, the list's length for a list, 0 when
    it is neither (:func:`parse_pose` says what is wrong)."""
    if isinstance(data, (str, bytes)):
        try:
            data = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return 0
    if isinstance(data, dict):
        return 1
    return len(data) if isinstance(data, (list, tuple)) else 0


def parse_pose(data, frame: int = 0, name: str = "pose_keypoint") -> PoseFrame:
    """Parse one frame of POSE_KEYPOINT data into a :class:`PoseFrame` in pixel coordinates."""
    if isinstance(data, (str, bytes)):
        try:
            data = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
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
    except (KeyError, TypeError, ValueError, OverflowError):
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
        box = None
        if p.get("face_box_2d") is not None:
            try:
                flat = np.asarray(p["face_box_2d"], dtype=np.float64).reshape(-1)
            except (TypeError, ValueError):
                raise PoseError(f"{who}: face_box_2d must be [x1, y1, x2, y2] numbers") from None
            if flat.size != 4 or not np.isfinite(flat).all():
                raise PoseError(f"{who}: face_box_2d must be four finite numbers [x1, y1, x2, y2], got "
                                f"{flat.tolist()}")
            if not (flat[2] > flat[0] and flat[3] > flat[1]):
                raise PoseError(f"{who}: face_box_2d {flat.tolist()} is empty (need x2 > x1 and y2 > y1)")
            box = np.array([[flat[0], flat[1], 1.0], [flat[2], flat[3], 1.0]])
        kps5 = _points(p.get("face_kps_5"), name, f"person {i} face_kps_5")
        if kps5 is not None and len(kps5) != 5:
            raise PoseError(f"{who}: face_kps_5 has {len(kps5)} points; expected 5 (eyes, nose, mouth corners)")
        people.append(Person(body, face, box, kps5))
    if not people:
        animals = f.get("animals")
        if isinstance(animals, (list, tuple)) and animals:
            raise PoseError(f"{name}: frame {frame} is an animal pose ({f.get('version') or 'AnimalPose'}, "
                            f"{len(animals)} animal(s)) with no people; InstantFamily places identities on people: "
                            "use an OpenPose or DWPose preprocessor (people), not AnimalPose")
        raise PoseError(f"{name}: frame {frame} has no people; expected at least one person with keypoints")

    people = [Person(_drop_markers(p.body, width, height), _drop_markers(p.face, width, height), p.box,
                     _drop_markers(p.kps5, width, height)) for p in people]
    valid = np.concatenate([a[a[:, 2] > 0, :2] for p in people for a in (p.body, p.face, p.box, p.kps5)
                            if a is not None] or [np.zeros((0, 2))])
    if valid.size == 0:
        raise PoseError(f"{name}: no keypoint has a confidence above 0; the pose is empty")
    if np.abs(valid).max() <= NORMALISED_TOLERANCE:
        people = [Person(_scale(p.body, width, height), _scale(p.face, width, height), _scale(p.box, width, height),
                         _scale(p.kps5, width, height)) for p in people]
    return PoseFrame(width, height, tuple(people))


def _drop_markers(a: Optional[np.ndarray], width: int, height: int) -> Optional[np.ndarray]:
    """A copy of ``a`` whose controlnet-aux "missing" markers (x or y = −1 in pixels, −1/W or −1/H normalised)
    have confidence 0."""
    if a is None:
        return None
    x, y = a[:, 0], a[:, 1]
    marker = (np.isclose(x, -1.0) | np.isclose(x, -1.0 / width, rtol=1e-4, atol=0)
              | np.isclose(y, -1.0) | np.isclose(y, -1.0 / height, rtol=1e-4, atol=0))
    if not marker.any():
        return a
    a = a.copy()
    a[marker] = 0.0
    return a


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

    One rule for every pose source: the box a face detector (insightface's SCRFD, the boxes stored in training
    shards) gives for this face, estimated from what the pose has, in this order:

    1. ``face_box_2d`` (a detector box carried with the pose): that box.
    2. ≥ ``FACE_POINTS_MIN`` valid 68/70 face points: their tight box ``(w, h)`` → width ``0.965·w`` about its
       centre, top ``0.29·h`` above the highest point (the forehead has no points), bottom ``0.06·h`` above the
       lowest (the chin point sits just under the detector's edge).
    3. Body points (nose 0, neck 1, eyes 14/15, ears 16/17; OpenPose eyes are pupils, the nose the tip): the width
       ``W`` is the mean of what the head shows — ``1.6·hypot(d_eyes, 1.6·d(eye midpoint, nose))`` (or
       ``2.9·d(eye, nose)`` with one eye, ``2.3·d_eyes`` without a nose) and ``0.92·d(ear, ear)`` (or
       ``1.27·max d(nose, ear)`` with one ear); ``1.2·d(nose, neck)`` when none of these exist. Height
       ``1.27·W``; centre horizontally at the ears' midpoint (both ears seen) or between the eye midpoint and the
       nose, vertically ``0.10·W`` below the eyes (``0.15·W`` above the nose without eyes).
    4. Fewer face points than rule 2 wants and no usable body: rule 2 on the points there are (≥ 3).

    Distances are Euclidean. The constants are medians measured on real faces (see the module constants); the
    rules agree with the detector box within ±15 % on those faces (tests/test_face_box_rule.py).
    """
    if person.box is not None:
        (x1, y1, _), (x2, y2, _) = person.box
        return float(x1), float(y1), float(x2), float(y2)
    pts = None
    if person.face is not None:
        pts = person.face[person.face[:, 2] > 0, :2]
        if len(pts) >= FACE_POINTS_MIN:
            box = _box_from_face_points(pts)
            if box is not None:
                return box
    box = _box_from_body(person.body)
    if box is None and pts is not None and len(pts) >= 3:
        box = _box_from_face_points(pts)
    return box


def _box_from_face_points(pts: np.ndarray) -> Optional[tuple[float, float, float, float]]:
    x1, y1 = pts.min(0)
    x2, y2 = pts.max(0)
    w, h = float(x2 - x1), float(y2 - y1)
    if w <= 0 or h <= 0:
        return None
    cx, half = (x1 + x2) / 2, FACE_POINTS_WIDTH * w / 2
    return float(cx - half), float(y1 - FACE_POINTS_TOP * h), float(cx + half), float(y2 + FACE_POINTS_BOTTOM * h)


def _box_from_body(b: np.ndarray) -> Optional[tuple[float, float, float, float]]:
    ok = b[:, 2] > 0
    eyes = [b[i, :2] for i in (R_EYE, L_EYE) if ok[i]]
    ears = [b[i, :2] for i in (R_EAR, L_EAR) if ok[i]]
    nose = b[NOSE, :2] if ok[NOSE] else None
    if nose is None and not eyes and not ears:
        return None
    dist = lambda a, c: float(np.hypot(*(np.asarray(a) - np.asarray(c))))  # noqa: E731
    widths = []
    if len(eyes) == 2:
        mid = (eyes[0] + eyes[1]) / 2
        if nose is not None:
            widths.append(BODY_EYES_NOSE * float(np.hypot(dist(*eyes), BODY_EYE_NOSE_WEIGHT * dist(mid, nose))))
        else:
            widths.append(BODY_EYES_ONLY * dist(*eyes))
    elif len(eyes) == 1 and nose is not None:
        widths.append(BODY_ONE_EYE_NOSE * dist(eyes[0], nose))
    if len(ears) == 2:
        widths.append(BODY_EARS * dist(*ears))
    elif len(ears) == 1 and nose is not None:
        widths.append(BODY_NOSE_EAR * dist(ears[0], nose))
    widths = [w for w in widths if w > 0]
    if widths:
        w = float(np.mean(widths))
    elif nose is not None and ok[NECK] and dist(nose, b[NECK, :2]) > 0:
        w = BODY_NECK * dist(nose, b[NECK, :2])
    else:
        return None
    if eyes:
        eye = np.mean(eyes, axis=0)
        cx = float((eye[0] + nose[0]) / 2) if nose is not None else float(eye[0])
        cy = float(eye[1]) + CENTRE_BELOW_EYES * w
        if len(ears) == 2:  # the ears' midpoint stays on the head's axis when the face turns; eyes and nose do not
            cx = float((ears[0][0] + ears[1][0]) / 2)
    elif nose is not None:
        cx, cy = float(nose[0]), float(nose[1]) - CENTRE_ABOVE_NOSE * w
    else:
        cx, cy = (float(v) for v in np.mean(ears, axis=0))
    h = BOX_ASPECT * w
    return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2


def _on_canvas(box) -> bool:
    x1, y1, x2, y2 = box
    return x2 > x1 and y2 > y1


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
        raise OptionError(f"margin: expected a fraction between 0 and 10 (0.25 = 25 %), got {margin}")
    empty = {int(n) for n in empty}
    if any(not 0 <= n < num_identities for n in empty):
        raise IdentityCountError(f"empty slots {sorted(empty)}: out of range for {num_identities} identities")
    boxes = [face_box(p) for p in frame.people]
    off_canvas = [i for i, b in enumerate(boxes) if b is not None and not _on_canvas(
        expand_box(b, margin, frame.width, frame.height))]
    if off_canvas and order:
        bad = [i for i in order if i is not None and i in off_canvas]
        if bad:
            raise FaceKeypointsError(f"{name}: the face of person {bad[0]} lies outside the {frame.width}×"
                                     f"{frame.height} canvas; it cannot hold an identity (its mask would be empty)")
    for i in off_canvas:  # a face that is not on the canvas cannot hold an identity
        boxes[i] = None
    located = [i for i, b in enumerate(boxes) if b is not None]
    if order is None or len(order) == 0:
        if num_identities > len(frame.people):
            raise IdentityCountError(f"{name}: {num_identities} identities but the pose has only "
                                     f"{len(frame.people)} people; add people to the pose or remove identities")
        if num_identities > len(located):
            missing = [i for i, b in enumerate(boxes) if b is None and i not in off_canvas]
            outside = f"; persons {off_canvas} have their face outside the canvas" if off_canvas else ""
            raise FaceKeypointsError(f"{name}: {num_identities} identities but only {len(located)} of "
                                     f"{len(frame.people)} people have usable face keypoints (persons {missing} "
                                     f"have no nose, eyes, ears or face points{outside})")
        by_x = sorted(located, key=lambda i: ((boxes[i][0] + boxes[i][2]) / 2, (boxes[i][1] + boxes[i][3]) / 2))
        chosen: list[Optional[int]] = list(by_x[:num_identities])
    else:
        chosen = [None if i is None else int(i) for i in order]
        if len(chosen) != num_identities:
            raise IdentityCountError(f"identity order: {len(chosen)} entries for {num_identities} identities; "
                                     "give one person index per identity")
        people = [i for i in chosen if i is not None]
        if len(set(people)) != len(people):
            raise OptionError(f"identity order: person indices repeat in {chosen}")
        for i in people:
            if not 0 <= i < len(frame.people):
                raise OptionError(f"identity order: person {i} does not exist; the pose has "
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
        raise OptionError(f"{name}: expected comma-separated person indices like '1,0,2' or 'auto', "
                          f"got {text!r}") from None


def pose_from_faces(faces, width: int, height: int) -> dict:
    """A POSE_KEYPOINT frame from detected faces alone (no body detector needed).

    ``faces``: sequence of ``(bbox (x1, y1, x2, y2), kps (5, 2))`` in pixels, kps in insightface order (image-left
    eye, image-right eye, nose, mouth corners). Each person carries the detector box (``face_box_2d``, so the mask
    is exactly detector box + margin) and its 5 keypoints (``face_kps_5``, for InstantID's keypoint image), and gets nose, eyes, ears and a neck below the chin — a head-and-neck
    skeleton for the control image. The ears sit at eye height, ``|ear − ear| = width / 0.92``, so a consumer that
    ignores ``face_box_2d`` still finds about the same box by the body rule. People are ordered left to right.
    """
    people = []
    for bbox, kps in sorted(faces, key=lambda f: (f[0][0] + f[0][2]) / 2):
        x1, y1, x2, y2 = (float(v) for v in bbox)
        k = np.asarray(kps, dtype=np.float64).reshape(5, 2)
        body = np.zeros((18, 3))
        eye_y = (k[0, 1] + k[1, 1]) / 2
        cx, half_ears = (x1 + x2) / 2, (x2 - x1) / BODY_EARS / 2
        body[NOSE] = (k[2, 0], k[2, 1], 1)
        body[R_EYE] = (k[0, 0], k[0, 1], 1)  # the person's right eye appears on the image's left
        body[L_EYE] = (k[1, 0], k[1, 1], 1)
        body[R_EAR] = (cx - half_ears, eye_y, 1)
        body[L_EAR] = (cx + half_ears, eye_y, 1)
        body[NECK] = (cx, y2 + 0.35 * (y2 - y1), 1)
        people.append({"pose_keypoints_2d": body.reshape(-1).tolist(), "face_keypoints_2d": None,
                       "face_box_2d": [x1, y1, x2, y2],
                       "face_kps_5": np.concatenate([k, np.ones((5, 1))], axis=1).reshape(-1).tolist()})
    return {"people": people, "canvas_width": int(width), "canvas_height": int(height)}


def person_for_box(box, margin: float = 0.0) -> dict:
    """A POSE_KEYPOINT person (head and neck) whose :func:`face_box` is ``box`` shrunk by ``1 + margin`` about its
    centre — so ``expand_box(face_box(p), margin)`` gives ``box`` back. For callers that lay out faces by boxes."""
    x1, y1, x2, y2 = (float(v) for v in box)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    hw, hh = (x2 - x1) / (2 * (1 + margin)), (y2 - y1) / (2 * (1 + margin))
    w = 2 * hw
    eye_y = cy - CENTRE_BELOW_EYES * w
    body = np.zeros((18, 3))
    body[NOSE] = (cx, eye_y + 0.27 * w, 1)
    body[R_EYE] = (cx - 0.215 * w, eye_y, 1)
    body[L_EYE] = (cx + 0.215 * w, eye_y, 1)
    body[R_EAR] = (cx - w / BODY_EARS / 2, eye_y, 1)
    body[L_EAR] = (cx + w / BODY_EARS / 2, eye_y, 1)
    body[NECK] = (cx, cy + 2.2 * hh, 1)
    return {"pose_keypoints_2d": body.reshape(-1).tolist(), "face_keypoints_2d": None,
            "face_box_2d": [cx - hw, cy - hh, cx + hw, cy + hh]}


def poses_from_controlnet_aux(poses, width: int, height: int) -> dict:
    """One POSE_KEYPOINT frame (normalised coordinates) from controlnet-aux's ``OpenposeDetector.detect_poses``.

    ``poses``: its ``PoseResult`` list — ``.body.keypoints`` (18 ``Keypoint(x, y, score)`` normalised, or None) and
    ``.face`` (``Keypoint`` list or None). Missing points (None, or its −1 marker, which it writes as x = −1/W or
    y = −1/H with score 1) become ``[0, 0, 0]``. Its face list has one peak per heatmap that fired (up to 71 with
    the background map), so only the first 70 are kept.
    """
    def flat(points, count=None):
        out = []
        for kp in list(points)[:count] if count else points:
            x = None if kp is None else float(kp.x)
            y = None if kp is None else float(kp.y)
            missing = (kp is None or x < 0 or y < 0 or np.isclose(x, -1.0 / width, rtol=1e-4, atol=0)
                       or np.isclose(y, -1.0 / height, rtol=1e-4, atol=0))
            score = None if kp is None else getattr(kp, "score", 1.0)
            out += [0.0, 0.0, 0.0] if missing else [x, y, float(1.0 if score is None else score)]
        return out

    people = []
    for p in poses:
        body = flat(p.body.keypoints)
        if len(body) != 18 * 3:
            raise PoseError(f"controlnet-aux pose: expected 18 body keypoints, got {len(body) // 3}")
        face = getattr(p, "face", None)
        people.append({"pose_keypoints_2d": body, "face_keypoints_2d": flat(face, 70) if face else None})
    return {"people": people, "canvas_width": int(width), "canvas_height": int(height)}
