"""Evaluate generated images of a list of cases with one recognizer (the engine behind ``evaluate.py``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from . import metrics as M
from .cases import Case, find_generated, load_rgb
from .errors import ReferenceFaceError
from .recognizers import Recognizer


@dataclass
class Reference:
    name: str
    embedding: np.ndarray       # mean of the unit-normalised embeddings of the reference images
    crop: np.ndarray | None     # thumbnail of the first reference face


@dataclass
class ImageResult:
    record: dict                              # JSON-ready numbers of one generated image
    ref_crops: list = field(default_factory=list)
    gen_crops: list = field(default_factory=list)   # per identity: crop of its matched face or None
    own_sims: list = field(default_factory=list)
    cross_sims: list = field(default_factory=list)  # each face vs the other identities' references


class ReferenceCache:
    """Embeds each identity's reference images once, whichever cases share them."""

    def __init__(self, recognizer: Recognizer):
        self.rec, self._cache = recognizer, {}

    def get(self, name: str, paths: list[str]) -> Reference:
        key = tuple(paths)
        if key not in self._cache:
            embs, crop = [], None
            for p in paths:
                faces = self.rec.faces(load_rgb(p))
                if not faces:
                    raise ReferenceFaceError(f"identity {name!r}: no face found in reference image {p}")
                f = max(faces, key=lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]))
                embs.append(M.normalize(f.embedding))
                crop = crop if crop is not None else f.crop
            self._cache[key] = np.mean(embs, axis=0), crop
        emb, crop = self._cache[key]
        return Reference(name, emb, crop)


def _r(x):
    return None if x is None or (isinstance(x, float) and not np.isfinite(x)) else round(float(x), 6)


def evaluate_image(case: Case, path: str, image: np.ndarray, refs: list[Reference], recognizer: Recognizer,
                   text_scorer=None) -> ImageResult:
    h, w = image.shape[:2]
    faces = recognizer.faces(image)
    n = len(refs)
    sim = M.cosine_matrix(np.stack([r.embedding for r in refs]),
                          np.stack([f.embedding for f in faces]) if faces else np.zeros((0, 1)))
    face_sim = M.cosine_matrix(np.stack([f.embedding for f in faces]) if faces else np.zeros((0, 1)),
                               np.stack([f.embedding for f in faces]) if faces else np.zeros((0, 1)))
    match = M.hungarian_match(sim)
    own = M.single_sims(sim, match)
    pair_sims = M.generated_pair_sims(face_sim, match)
    boxes = [f.bbox for f in faces]
    slot_boxes = case.slots.boxes_for(w, h, n) if case.slots is not None else [None] * n
    placed = M.placement(match, boxes, slot_boxes)
    slots_of_face = M.face_slots(boxes, slot_boxes)
    owners = M.face_owners(match, slots_of_face, list(range(n)))
    mixed = M.mixing_flags(sim, owners)
    count_error = len(faces) - case.expected_faces
    text = text_scorer.score(image, case.prompt) if text_scorer is not None else None

    identities = []
    for i, ref in enumerate(refs):
        j = match[i]
        slot_face = next((k for k, s in enumerate(slots_of_face) if s == i), None)
        identities.append({
            "name": ref.name, "matched_face": j, "single_sim": _r(own[i]),
            "slot_box": [_r(v) for v in slot_boxes[i]] if slot_boxes[i] is not None else None,
            "placed_in_slot": placed[i],
            "iou_with_slot": _r(M.iou(boxes[j], slot_boxes[i])) if j is not None and slot_boxes[i] else None,
            "face_in_slot": slot_face,
            "slot_face_sim": _r(sim[i, slot_face]) if slot_face is not None else None,
        })
    face_recs = [{"bbox": [_r(v) for v in f.bbox], "det_score": _r(f.score), "slot": slots_of_face[j],
                  "owner": refs[owners[j]].name if owners[j] is not None else None, "mixed": mixed[j],
                  "closest_identity": refs[int(np.argmax(sim[:, j]))].name,
                  "sims": {r.name: _r(sim[i, j]) for i, r in enumerate(refs)}} for j, f in enumerate(faces)]
    record = {
        "case_id": case.id, "image": path, "prompt": case.prompt, "width": w, "height": h,
        "n_identities": n, "expected_faces": case.expected_faces, "detected_faces": len(faces),
        "count_error": count_error, "count_ok": count_error == 0,
        "count_message": ("ok" if count_error == 0 else
                          f"{-count_error} face(s) missing" if count_error < 0 else f"{count_error} extra face(s)"),
        "unmatched_identities": [refs[i].name for i, j in enumerate(match) if j is None],
        "single_sim_mean": _r(float(np.mean(own))),
        "multisim": _r(M.multisim(own, pair_sims)),
        "mixing_rate": _r(M.rate(mixed)), "placement_rate": _r(M.rate(placed)),
        "text_sim": _r(text), "identities": identities, "faces": face_recs,
    }
    cross = [float(sim[i, j]) for j in range(len(faces)) for i in range(n)
             if owners[j] is not None and i != owners[j]]
    return ImageResult(record, [r.crop for r in refs], [faces[j].crop if j is not None else None for j in match],
                       own, cross)


def summarize(results: list[ImageResult]) -> dict:
    """Mean ± std of each metric (paper format) plus count totals."""
    recs = [r.record for r in results]
    stats = {
        "SingleSim": M.aggregate([s for r in results for s in r.own_sims]),
        "MultiSim": M.aggregate([r["multisim"] for r in recs]),
        "TextSim": M.aggregate([r["text_sim"] for r in recs]),
        "MixingRate": M.aggregate([r["mixing_rate"] for r in recs]),
        "PlacementRate": M.aggregate([r["placement_rate"] for r in recs]),
        "CountOK": M.aggregate([float(r["count_ok"]) for r in recs]),
    }
    return {
        "n_images": len(recs),
        "metrics": {k: {"mean": _r(s.mean), "std": _r(s.std), "n": s.n, "text": s.fmt()} for k, s in stats.items()},
        "faces_expected": int(sum(r["expected_faces"] for r in recs)),
        "faces_detected": int(sum(r["detected_faces"] for r in recs)),
        "images_with_missing_faces": sum(r["count_error"] < 0 for r in recs),
        "images_with_extra_faces": sum(r["count_error"] > 0 for r in recs),
    }


def evaluate_cases(cases: list[Case], recognizer: Recognizer, images_dir: str | None, cases_dir: str,
                   text_scorer=None, progress: bool = True) -> list[ImageResult]:
    jobs = [(c, p) for c in cases for p in find_generated(c, images_dir, cases_dir)]
    refs = ReferenceCache(recognizer)
    for c in cases:  # fail early on bad reference images, before the long loop
        for ident in c.identities:
            for p in ident.images:
                if not os.path.isfile(p):
                    load_rgb(p)  # raises ImageFileError naming the file
    out = []
    for case, path in tqdm(jobs, desc="evaluate", unit="img", disable=not progress):
        case_refs = [refs.get(i.name, i.images) for i in case.identities]
        out.append(evaluate_image(case, path, load_rgb(path), case_refs, recognizer, text_scorer))
    return out
