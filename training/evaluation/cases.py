"""Cases file: what was asked for each generated image.

JSON (``{"cases": [...]}`` or a bare list) or JSONL (one case per line). Per case::

    {"id": "pair-01",                       # unique; names the generated images (see find_generated)
     "prompt": "a photo of two people at the beach",
     "identities": [{"name": "ada", "images": ["refs/ada1.jpg", "refs/ada2.jpg"]}, ...],
     "slots": {"boxes": [[x1, y1, x2, y2], ...],            # one per identity, in identity order
               "units": "px" | "relative",                  # default px
               "canvas": [W, H]},                           # px boxes refer to this size (default: the image)
     # or    {"pose": "poses/pair-01.json",                 # ComfyUI POSE_KEYPOINT json
     #        "identity_order": [1, 0],                     # person index of each identity (default left→right)
     #        "margin": 0.25},                              # face box + 25 % = the paper's mask
     "expected_faces": 2,                   # optional; default: people with a face in the pose, else identities
     "images": ["gen/pair-01.png"]}         # optional; default: found in --images

Relative paths resolve against the cases file's folder (generated images: against ``--images`` first).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from instantfamily_core.errors import InstantFamilyError
from instantfamily_core.faces.images import load_rgb  # noqa: F401 - the one image loader, used through this module

from .errors import CasesFileError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class Identity:
    name: str
    images: list[str]


@dataclass
class Slots:
    """Slot geometry; :meth:`boxes_for` gives one box per identity on a ``width×height`` image."""

    boxes: list[list[float]] | None = None
    relative: bool = False
    canvas: tuple[int, int] | None = None
    pose: Any = None                    # instantfamily_core.pose.PoseFrame
    identity_order: list[int] | None = None
    margin: float = 0.25
    source: str = ""

    def boxes_for(self, width: int, height: int, n_identities: int) -> list[tuple[float, ...]]:
        if self.pose is not None:
            from instantfamily_core.pose import assign_slots
            slots = assign_slots(self.pose.scaled(width, height), n_identities, self.identity_order,
                                 self.margin, name=self.source)
            return [tuple(b) for b in slots.mask_boxes]
        sx, sy = (width, height) if self.relative else (
            (width / self.canvas[0], height / self.canvas[1]) if self.canvas else (1.0, 1.0))
        boxes = [(b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy) for b in self.boxes]
        for k, (x1, y1, x2, y2) in enumerate(boxes):
            if x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height:
                raise CasesFileError(f"{self.source or 'slots'}: slots.boxes[{k}] {self.boxes[k]} lies outside the "
                                     f"{width}×{height} image; identity {k} would act nowhere")
        return boxes


@dataclass
class Case:
    id: str
    prompt: str
    identities: list[Identity]
    slots: Slots | None = None
    expected_faces: int = 0
    images: list[str] | None = None
    extra: dict = field(default_factory=dict)


def _err(case_id: str, fld: str, msg: str) -> CasesFileError:
    return CasesFileError(f"case {case_id!r}, field {fld!r}: {msg}")


def _resolve(path: str, base: str) -> str:
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base, path))


def _parse_slots(raw: dict, cid: str, n_ids: int, base: str) -> tuple[Slots, int | None]:
    if not isinstance(raw, dict):
        raise _err(cid, "slots", "expected an object with 'boxes' or 'pose'")
    if "pose" in raw:
        try:
            from instantfamily_core.pose import face_box, parse_pose
        except ImportError as e:  # optional dependency
            raise _err(cid, "slots.pose", f"pose support needs instantfamily_core.pose ({e}); give 'boxes'") from e
        if not isinstance(raw["pose"], str) or not raw["pose"]:
            raise _err(cid, "slots.pose", f"expected the path of a POSE_KEYPOINT .json file, got {raw['pose']!r}")
        path = _resolve(raw["pose"], base)
        frame_index = raw.get("frame", 0)
        if isinstance(frame_index, bool) or not isinstance(frame_index, int) or frame_index < 0:
            raise _err(cid, "slots.frame", f"expected a non-negative frame index, got {frame_index!r}")
        margin = raw.get("margin", 0.25)
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin <= 10:
            raise _err(cid, "slots.margin", f"expected a fraction between 0 and 10 (0.25 = 25 %), got {margin!r}")
        try:
            with open(path, encoding="utf-8") as f:
                frame = parse_pose(f.read(), frame_index, name=f"case {cid!r} pose {path}")
        except (OSError, UnicodeDecodeError) as e:
            raise _err(cid, "slots.pose", f"cannot read {path}: {e}") from None
        order = raw.get("identity_order")
        if order is not None and (not isinstance(order, list) or not all(isinstance(i, int) for i in order)):
            raise _err(cid, "slots.identity_order", "expected a list of person indices, e.g. [1, 0]")
        slots = Slots(pose=frame, identity_order=order, margin=float(margin), source=path)
        try:  # validate now: the pose must place every identity
            slots.boxes_for(frame.width, frame.height, n_ids)
        except InstantFamilyError as e:
            raise _err(cid, "slots", f"{type(e).__name__}: {e}") from None
        return slots, sum(face_box(p) is not None for p in frame.people)
    boxes = raw.get("boxes")
    if (not isinstance(boxes, list) or len(boxes) != n_ids
            or not all(isinstance(b, list) and len(b) == 4 and all(isinstance(v, (int, float)) for v in b)
                       for b in boxes)):
        raise _err(cid, "slots.boxes", f"expected {n_ids} boxes [x1, y1, x2, y2] (one per identity), got {boxes!r}")
    if not all(math.isfinite(v) for b in boxes for v in b):
        raise _err(cid, "slots.boxes", f"box coordinates must be finite numbers, got {boxes!r}")
    if any(b[2] <= b[0] or b[3] <= b[1] for b in boxes):
        raise _err(cid, "slots.boxes", f"every box needs x2 > x1 and y2 > y1, got {boxes!r}")
    units = raw.get("units", "px")
    if units not in ("px", "relative"):
        raise _err(cid, "slots.units", f"expected 'px' or 'relative', got {units!r}")
    canvas = raw.get("canvas")
    if canvas is not None and not (isinstance(canvas, list) and len(canvas) == 2 and all(
            isinstance(v, int) and v > 0 for v in canvas)):
        raise _err(cid, "slots.canvas", f"expected [width, height] in pixels, got {canvas!r}")
    return Slots(boxes=[[float(v) for v in b] for b in boxes], relative=units == "relative",
                 canvas=tuple(canvas) if canvas else None, source=f"case {cid!r}"), None


def parse_case(raw: Any, index: int, base: str) -> Case:
    cid = str(raw.get("id")) if isinstance(raw, dict) and raw.get("id") is not None else f"#{index}"
    if not isinstance(raw, dict):
        raise _err(cid, "<case>", f"expected an object, got {type(raw).__name__}")
    if "id" not in raw or not str(raw["id"]).strip():
        raise _err(cid, "id", "missing; every case needs a unique id")
    prompt = raw.get("prompt", "")
    if not isinstance(prompt, str):
        raise _err(cid, "prompt", "expected a string")
    ids_raw = raw.get("identities")
    if not isinstance(ids_raw, list) or not ids_raw:
        raise _err(cid, "identities", "expected a non-empty list of {name, images}")
    identities = []
    for k, ident in enumerate(ids_raw):
        if not isinstance(ident, dict) or not isinstance(ident.get("name"), str) or not ident["name"]:
            raise _err(cid, f"identities[{k}].name", "missing or not a string")
        imgs = ident.get("images")
        if isinstance(imgs, str):
            imgs = [imgs]
        if not isinstance(imgs, list) or not imgs or not all(isinstance(p, str) for p in imgs):
            raise _err(cid, f"identities[{k}].images", "expected a non-empty list of image paths")
        identities.append(Identity(ident["name"], [_resolve(p, base) for p in imgs]))
    names = [i.name for i in identities]
    if len(set(names)) != len(names):
        raise _err(cid, "identities", f"identity names repeat: {names}")
    slots, pose_faces = (None, None)
    if raw.get("slots") is not None:
        slots, pose_faces = _parse_slots(raw["slots"], cid, len(identities), base)
    expected = raw.get("expected_faces", pose_faces if pose_faces is not None else len(identities))
    if not isinstance(expected, int) or expected < 0:
        raise _err(cid, "expected_faces", f"expected a non-negative integer, got {expected!r}")
    images = raw.get("images")
    if images is not None and (not isinstance(images, list) or not all(isinstance(p, str) for p in images)):
        raise _err(cid, "images", "expected a list of generated image paths")
    known = {"id", "prompt", "identities", "slots", "expected_faces", "images"}
    return Case(str(raw["id"]), prompt, identities, slots, expected, images,
                {k: v for k, v in raw.items() if k not in known})


def load_cases(path: str) -> list[Case]:
    """Read and validate a JSON / JSONL cases file; raises :class:`CasesFileError` naming the case and field."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise CasesFileError(f"cannot read cases file {path!r}: {e}") from None
    base = os.path.dirname(os.path.abspath(path))
    try:
        if path.endswith(".jsonl"):
            raws = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            data = json.loads(text)
            raws = data.get("cases") if isinstance(data, dict) else data
    except json.JSONDecodeError as e:
        raise CasesFileError(f"cases file {path!r} is not valid JSON{'L' if path.endswith('.jsonl') else ''}: "
                             f"{e}") from None
    if not isinstance(raws, list) or not raws:
        raise CasesFileError(f"cases file {path!r}: expected a non-empty list of cases (or {{\"cases\": [...]}})")
    cases = [parse_case(r, i, base) for i, r in enumerate(raws)]
    seen = set()
    for c in cases:
        if c.id in seen:
            raise _err(c.id, "id", "duplicate case id")
        seen.add(c.id)
    return cases


def find_generated(case: Case, images_dir: str | None, cases_dir: str) -> list[str]:
    """Generated images of a case: its ``images`` list, else ``<id>.<ext>``, ``<id>_<n>.<ext>`` or ``<id>/*``."""
    if case.images:
        out = []
        for p in case.images:
            cands = [_resolve(p, d) for d in (images_dir, cases_dir) if d]
            out.append(next((c for c in cands if os.path.isfile(c)), cands[0]))
        return out
    if not images_dir:
        raise _err(case.id, "images", "no 'images' listed and no --images folder given")
    pat = re.compile(rf"^{re.escape(case.id)}(_\d+)?$")
    found = []
    if os.path.isdir(images_dir):
        for name in sorted(os.listdir(images_dir)):
            stem, ext = os.path.splitext(name)
            if ext.lower() in IMAGE_EXTS and pat.match(stem):
                found.append(os.path.join(images_dir, name))
        sub = os.path.join(images_dir, case.id)
        if os.path.isdir(sub):
            found += [os.path.join(sub, n) for n in sorted(os.listdir(sub)) if n.lower().endswith(IMAGE_EXTS)]
    if not found:
        raise _err(case.id, "images", f"no generated image found in {images_dir!r} (expected {case.id}.png, "
                                      f"{case.id}_<n>.png or {case.id}/*.png)")
    return found
