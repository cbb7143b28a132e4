#!/usr/bin/env python
"""Prepare InstantFamily training shards from images + captions + OpenPose keypoints.

    python training/prepare.py --input data/images --output data/shards \
        --face-root models/insightface --face-pack antelopev2 [--resolution 512] [--shard-size 1000]

Input: a folder (recursive) of images with sidecars ``<name>.txt`` (caption) and ``<name>.pose.json`` (OpenPose
keypoints in ComfyUI's POSE_KEYPOINT shape; ``<name>.json`` is accepted too), or a JSONL manifest with lines
``{"image": path, "caption": text, "pose": path-or-object}`` (paths relative to the manifest). Without pose
sidecars, ``--pose-detector controlnet_aux --pose-model <Annotators folder>`` runs the optional detector.

Per image: resize (shorter side R) + centre crop R×R, faces detected on the original and matched to the pose's
people, global + local features from the face pack, the pose moved into the crop, a preview control image with
slot circles. Output: shards + ``manifest.json`` (see ``training/data.py`` and ``docs/training.md``).

Resumable: shard k always covers inputs [k·S, (k+1)·S) of the sorted input list, and finished shards are kept.
A bad input is skipped with its reason (never fatal); ``manifest.json`` lists every skip. Several machines can
split the work with ``--rank``/``--world-size`` (shard k goes to rank k mod W).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

if not __package__:  # run as a file, not as python -m training.prepare
    import _bootstrap  # noqa: F401  (training/_bootstrap.py: the repository root first on sys.path)

import numpy as np  # noqa: E402

from instantfamily_core.errors import ImageFileError, InstantFamilyError, OptionError  # noqa: E402
from instantfamily_core.faces.images import load_rgb  # noqa: E402
from instantfamily_core.fileio import write_text_atomic  # noqa: E402
from instantfamily_core.pose import (DEFAULT_MARGIN, PoseFrame, assign_slots, expand_box, face_box,  # noqa: E402
                                     parse_pose, poses_from_controlnet_aux)
from training.data import (FORMAT_VERSION, MANIFEST, MANIFEST_FORMAT, DatasetError, PreparedSample,  # noqa: E402
                           read_shard_metadata, shard_name, with_detector_boxes, write_shard)
from training.evaluation.metrics import hungarian_match  # noqa: E402

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class SkipItem(Exception):
    """This input cannot be used; the message is the reason reported in the manifest."""


@dataclass(frozen=True)
class InputItem:
    key: str  # the name reported in the manifest (relative path)
    image: Path
    caption: Optional[str] = None
    caption_file: Optional[Path] = None
    pose: object = None  # a path, a parsed POSE_KEYPOINT object, or None


# ---------------------------------------------------------------------------------------------------------------
# inputs

def list_folder(folder: Path) -> list[InputItem]:
    items = []
    for p in sorted(folder.rglob("*")):
        if p.suffix.lower() not in IMAGE_SUFFIXES or not p.is_file():
            continue
        pose = next((c for c in (p.with_suffix(".pose.json"), p.with_suffix(".json")) if c.is_file()), None)
        items.append(InputItem(p.relative_to(folder).as_posix(), p, caption_file=p.with_suffix(".txt"), pose=pose))
    return items


def list_jsonl(path: Path) -> list[InputItem]:
    items = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                image = row["image"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DatasetError(f"{path.name} line {n}: expected a JSON object with 'image' ({e})") from None
            pose = row.get("pose")
            if isinstance(pose, str) and not pose.lstrip().startswith(("{", "[")):
                pose = (path.parent / pose)
            items.append(InputItem(f"{path.name}:{n}:{image}", path.parent / image, caption=row.get("caption"),
                                   pose=pose))
    return items


def list_inputs(source: str) -> list[InputItem]:
    p = Path(source)
    if p.is_dir():
        items = list_folder(p)
    elif p.is_file() and p.suffix in (".jsonl", ".json"):
        items = list_jsonl(p)
    else:
        raise DatasetError(f"--input: {source} is neither a folder of images nor a .jsonl manifest")
    if not items:
        raise DatasetError(f"--input: no images ({', '.join(IMAGE_SUFFIXES)}) found in {source}")
    return items


def fingerprint(items: list[InputItem]) -> str:
    h = hashlib.sha256()
    for it in items:
        h.update(it.key.encode("utf-8") + b"\0")
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------
# one item

def load_image(path: Path) -> np.ndarray:
    """The input image as RGB, EXIF orientation applied (the one loader training data and evaluation use too)."""
    if not Path(path).is_file():
        raise SkipItem("image file not found")
    try:
        return load_rgb(path, name=Path(path).name)
    except ImageFileError as e:
        raise SkipItem(f"unreadable image ({e})") from None


def read_caption(item: InputItem) -> str:
    if item.caption is not None:
        text = str(item.caption)
    elif item.caption_file is not None and item.caption_file.is_file():
        text = item.caption_file.read_text(encoding="utf-8")
    else:
        raise SkipItem("no caption (.txt sidecar or 'caption' field)")
    text = text.strip()
    if not text:
        raise SkipItem("empty caption")
    return text


class PoseDetector:
    """controlnet_aux's OpenPose (optional) → one POSE_KEYPOINT frame with body and face points."""

    def __init__(self, model_path: str):
        try:
            from controlnet_aux import OpenposeDetector
        except ImportError as e:
            raise DatasetError("--pose-detector controlnet_aux: the controlnet-aux package is not installed "
                               "(pip install controlnet-aux)") from e
        try:
            self.detector = OpenposeDetector.from_pretrained(model_path)
        except Exception as e:
            raise DatasetError(f"--pose-model: cannot load the OpenPose annotator from {model_path} ({e})") from e

    def __call__(self, image: np.ndarray) -> dict:
        """``image``: RGB uint8 (H, W, 3). ``detect_poses`` takes RGB and flips to BGR itself, so it gets the image
        as is (flipping here too would feed its networks RGB as BGR)."""
        h, w = image.shape[:2]
        poses = self.detector.detect_poses(np.ascontiguousarray(image), include_hand=False, include_face=True)
        return poses_from_controlnet_aux(poses, w, h)


def read_pose(item: InputItem, image: np.ndarray, detector: Optional[PoseDetector]) -> PoseFrame:
    data = item.pose
    if isinstance(data, Path):
        try:
            data = json.loads(data.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise SkipItem(f"unreadable pose file {data.name} ({e})") from None
    elif isinstance(data, str):
        data = json.loads(data)
    if data is None:
        if detector is None:
            raise SkipItem("no pose keypoints (.pose.json sidecar or 'pose' field) and no --pose-detector")
        data = detector(image)
    try:
        frame = parse_pose(data, name=f"{item.key} pose")
    except InstantFamilyError as e:
        raise SkipItem(str(e)) from None
    h, w = image.shape[:2]
    return frame if (frame.width, frame.height) == (w, h) else frame.scaled(w, h)


def match_faces(frame: PoseFrame, boxes: list[np.ndarray], margin: float) -> dict[int, int]:
    """person index → detected face index, one-to-one, by optimal assignment.

    A pair is allowed when the detection centre lies in the person's face box (+ margin); its cost is the distance
    between the detection centre and the face box centre. Of all one-to-one matchings of allowed pairs, the one
    with the most pairs and, among those, the smallest total distance is returned (``hungarian_match``, scipy's
    ``linear_sum_assignment``). Taking the closest pair first instead can take a person's only allowed face."""
    cost = np.full((len(frame.people), len(boxes)), np.inf)
    for p, person in enumerate(frame.people):
        fb = face_box(person)
        if fb is None:
            continue
        x1, y1, x2, y2 = expand_box(fb, margin, frame.width, frame.height)
        pc = ((fb[0] + fb[2]) / 2, (fb[1] + fb[3]) / 2)
        for d, b in enumerate(boxes):
            cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
            if x1 <= cx <= x2 and y1 <= cy <= y2:
                cost[p, d] = float(np.hypot(cx - pc[0], cy - pc[1]))
    allowed = np.isfinite(cost)
    if not allowed.any():
        return {}
    # A disallowed pair costs more than all allowed pairs together, so a matching with more allowed pairs always
    # wins; disallowed pairs the solver had to fill in are dropped.
    forbidden = float(cost[allowed].sum()) + 1.0
    match = hungarian_match(np.where(allowed, -cost, -forbidden))
    return {p: d for p, d in enumerate(match) if d is not None and allowed[p, d]}


def crop_geometry(w: int, h: int, r: int) -> tuple[float, float, float]:
    """Scale and offsets (x, y) of 'resize the shorter side to r, centre-crop r×r'."""
    s = r / min(w, h)
    return s, (w * s - r) / 2, (h * s - r) / 2


def move_points(a: Optional[np.ndarray], s: float, ox: float, oy: float) -> Optional[list]:
    if a is None:
        return None
    a = a.copy()
    a[:, 0] = a[:, 0] * s - ox
    a[:, 1] = a[:, 1] * s - oy
    a[a[:, 2] <= 0, :2] = 0.0
    return a.reshape(-1).round(3).tolist()


def encode(image: np.ndarray, fmt: str) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    if fmt == "jpeg":
        Image.fromarray(image).save(buf, format="JPEG", quality=95)
    else:
        Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def process_item(item: InputItem, analyzer, args, detector: Optional[PoseDetector]) -> PreparedSample:
    from PIL import Image
    from instantfamily_core.render import draw_control_image

    image = load_image(item.image)
    caption = read_caption(item)
    frame = read_pose(item, image, detector)
    faces = analyzer.detect(image, name=item.key)
    if not faces:
        raise SkipItem("no face detected")
    matches = match_faces(frame, [f.bbox for f in faces], args.margin)
    if not matches:
        raise SkipItem(f"{len(faces)} face(s) detected but none lies in a pose person's face box")

    r = args.resolution
    h, w = image.shape[:2]
    s, ox, oy = crop_geometry(w, h, r)
    people = [{"pose_keypoints_2d": move_points(p.body, s, ox, oy),
               **({"face_keypoints_2d": move_points(p.face, s, ox, oy)} if p.face is not None else {}),
               **({"face_box_2d": move_points(p.box, s, ox, oy)[:2] + move_points(p.box, s, ox, oy)[3:5]}
                  if p.box is not None else {})}
              for p in frame.people]
    pose = {"canvas_width": r, "canvas_height": r, "people": people}
    moved = parse_pose(pose, name=f"{item.key} pose")
    kept = []
    for person, d in sorted(matches.items()):
        x1, y1, x2, y2 = (float(v) for v in faces[d].bbox)
        box = [x1 * s - ox, y1 * s - oy, x2 * s - ox, y2 * s - oy]
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        if 0 <= cx < r and 0 <= cy < r and face_box(moved.people[person]) is not None:
            kept.append({"person": person, "bbox": [round(v, 2) for v in box],
                         "det_score": round(faces[d].det_score, 4), "_d": d})
    if not kept:
        raise SkipItem("every matched face falls outside the centre crop")
    resized = np.asarray(Image.fromarray(image).resize((round(w * s), round(h * s)), Image.BICUBIC))
    x0, y0 = int(round(ox)), int(round(oy))
    crop = np.ascontiguousarray(resized[y0:y0 + r, x0:x0 + r])
    if crop.shape[:2] != (r, r):
        raise SkipItem(f"image too small to crop {r}×{r}")
    record = {"key": item.key, "caption": caption, "size": r, "pose": pose, "source_size": [w, h],
              "faces": [{k: v for k, v in f.items() if k != "_d"} for f in kept]}
    preview = None
    if not args.no_pose_preview:  # drawn as training draws it: detector boxes, slots left to right
        order = [k["person"] for k in sorted(kept, key=lambda k: (k["bbox"][0] + k["bbox"][2]) / 2)][:args.num_slots]
        boxed = parse_pose(with_detector_boxes(record), name=f"{item.key} pose")
        preview = encode(draw_control_image(assign_slots(boxed, len(order), order=order, margin=args.margin)), "png")
    g = np.stack([faces[f["_d"]].global_embedding for f in kept])
    loc = np.stack([faces[f["_d"]].local_map for f in kept])
    return PreparedSample(record, encode(crop, args.image_format), g, loc, preview)


# ---------------------------------------------------------------------------------------------------------------
# shards and manifest

def build_manifest(out: Path, total_inputs: int, shard_size: int, fp: str, default_info: dict) -> dict:
    """Collect every finished shard into ``manifest.json`` (written atomically); checks that all shards with
    samples agree on resolution, face pack and feature sizes."""
    expected = (total_inputs + shard_size - 1) // shard_size
    shards, skipped, samples, info = [], [], 0, None
    for k in range(expected):
        path = out / shard_name(k)
        if not path.is_file():
            continue
        md = read_shard_metadata(path)
        if md["samples"]:
            if info is not None and md["info"] != info:
                raise DatasetError(f"{path.name}: made with {md['info']}, other shards with {info}; all shards of "
                                   "one folder need the same --resolution, --margin and face pack")
            info = md["info"]
        shards.append({"file": path.name, "num_samples": len(md["samples"])})
        skipped.extend(md["skipped"])
        samples += len(md["samples"])
    manifest = {"format": MANIFEST_FORMAT, "version": FORMAT_VERSION, "info": info or default_info, "input_fingerprint": fp,
                "total_inputs": total_inputs, "shard_size": shard_size, "num_samples": samples,
                "complete": len(shards) == expected, "shards": shards, "skipped_count": len(skipped),
                "skipped_by_reason": dict(Counter(s["reason"].split(" (")[0] for s in skipped).most_common()),
                "skipped": skipped}
    write_text_atomic(out / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="folder of images with .txt/.pose.json sidecars, or a .jsonl manifest")
    p.add_argument("--output", required=True, help="shard folder (created; re-running resumes)")
    p.add_argument("--face-root", required=True, help="insightface root holding models/<pack> (e.g. ComfyUI/models/insightface)")
    p.add_argument("--face-pack", default="antelopev2")
    p.add_argument("--provider", default="auto", help="onnxruntime provider: auto, CPU, CUDA, ROCM, CoreML")
    p.add_argument("--det-size", type=int, default=640)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--margin", type=float, default=DEFAULT_MARGIN, help="face mask margin (0.25 = 25 %%)")
    p.add_argument("--num-slots", type=int, default=4, help="slots drawn in the preview control image")
    p.add_argument("--image-format", choices=("jpeg", "png"), default="jpeg")
    p.add_argument("--no-pose-preview", action="store_true", help="do not store the preview control image")
    p.add_argument("--pose-detector", choices=("none", "controlnet_aux"), default="none")
    p.add_argument("--pose-model", default=None, help="controlnet_aux Annotators folder (with --pose-detector)")
    p.add_argument("--rank", type=int, default=0, help="this worker's index when several split the shards")
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from tqdm import tqdm
    try:
        if args.resolution < 64 or args.resolution % 8:
            raise OptionError(f"--resolution: expected a multiple of 8 ≥ 64, got {args.resolution}")
        if args.shard_size < 1 or not 0 <= args.rank < args.world_size:
            raise DatasetError("--shard-size must be ≥ 1 and 0 ≤ --rank < --world-size")
        items = list_inputs(args.input)
        fp = fingerprint(items)
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        n_shards = (len(items) + args.shard_size - 1) // args.shard_size
        mine = [k for k in range(args.rank, n_shards, args.world_size)]
        todo = []
        for k in mine:
            path = out / shard_name(k)
            if path.is_file():
                if read_shard_metadata(path)["inputs"].get("fingerprint") != fp:
                    raise DatasetError(f"{path}: written for a different input list; use a new --output folder "
                                       "(or delete the old shards)")
            else:
                todo.append(k)
        from instantfamily_core.faces import FaceAnalyzer
        analyzer = FaceAnalyzer(args.face_root, args.face_pack, args.provider, args.det_size)
        detector = PoseDetector(args.pose_model) if args.pose_detector == "controlnet_aux" else None
    except InstantFamilyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    print(f"{len(items)} inputs, {n_shards} shards; this worker: {len(mine)} shards, {len(mine) - len(todo)} "
          "already done", file=sys.stderr)
    bar = tqdm(total=sum(min(args.shard_size, len(items) - k * args.shard_size) for k in todo), unit="img",
               disable=args.no_progress, desc="prepare")
    for k in todo:
        start, stop = k * args.shard_size, min((k + 1) * args.shard_size, len(items))
        samples, skipped = [], []
        for item in items[start:stop]:
            try:
                samples.append(process_item(item, analyzer, args, detector))
            except SkipItem as e:
                skipped.append({"file": item.key, "reason": str(e)})
            except Exception as e:  # never fatal: one broken file must not stop a 2M-image run
                skipped.append({"file": item.key, "reason": f"{type(e).__name__}: {e}"})
            bar.update(1)
            bar.set_postfix(kept=len(samples), skipped=len(skipped))
        write_shard(out / shard_name(k), samples, skipped, {"start": start, "stop": stop, "fingerprint": fp},
                    shard_info(args, samples))
    bar.close()
    try:
        manifest = build_manifest(out, len(items), args.shard_size, fp, shard_info(args, []))
    except InstantFamilyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{manifest['num_samples']} samples in {len(manifest['shards'])}/{n_shards} shards; "
          f"{manifest['skipped_count']} skipped", file=sys.stderr)
    for reason, count in manifest["skipped_by_reason"].items():
        print(f"  skipped {count}: {reason}", file=sys.stderr)
    if not manifest["complete"]:
        print("manifest is incomplete: other workers (--rank) still have shards to write; re-run any worker "
              "afterwards to refresh manifest.json", file=sys.stderr)
    return 0


def shard_info(args, samples: list[PreparedSample]) -> dict:
    g = samples[0].global_embeddings.shape[-1] if samples else None
    loc = samples[0].local_maps.shape if samples else (None, None, None, None)
    return {"resolution": args.resolution, "face_pack": args.face_pack, "global_dim": g, "local_dim": loc[1],
            "grid": loc[2], "margin": args.margin}


if __name__ == "__main__":
    sys.exit(main())
