"""Evaluation formulas (pure numpy + scipy), one function per number the report shows.

Conventions (documented in ``docs/evaluation.md``):

* every similarity is the **cosine** of two embeddings, whatever the recognizer (dlib's 128-d descriptors are
  not unit-norm, so they are normalised here); dlib scores are not numerically comparable to the paper's FaceNet;
* a reference identity whose face is missing from the generated image scores **0** own-similarity, and any pair
  with a missing generated face counts as generated-pair similarity **1** ("not shown to be separate"), so
  dropping faces is penalised instead of silently ignored;
* ``MultiSim`` for two identities is exactly the paper's Eq. 11; for N identities it is the mean own-similarity
  plus one minus the mean similarity over all pairs of generated faces (equal to Eq. 11 when N = 2).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations
from typing import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment


def normalize(v: np.ndarray) -> np.ndarray:
    """L2-normalise the last axis; a zero vector stays zero."""
    v = np.asarray(v, dtype=np.float64)
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return np.divide(v, n, out=np.zeros_like(v), where=n > 0)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two vectors (0 if either is zero)."""
    return float(np.dot(normalize(a), normalize(b)))


def cosine_matrix(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``S[i, j] = cos(rows[i], cols[j])``; shape ``(len(rows), len(cols))`` (empty-safe)."""
    if len(rows) == 0 or len(cols) == 0:
        return np.zeros((len(rows), len(cols)))
    rows = np.asarray(rows, dtype=np.float64).reshape(len(rows), -1)
    cols = np.asarray(cols, dtype=np.float64).reshape(len(cols), -1)
    return normalize(rows) @ normalize(cols).T


def hungarian_match(sim: np.ndarray) -> list[int | None]:
    """Optimal identity → face assignment maximising total similarity.

    ``sim``: ``(n_identities, n_faces)``. Returns, per identity, the matched face index or ``None`` when there are
    fewer faces than identities. Extra faces stay unmatched.
    """
    sim = np.asarray(sim, dtype=np.float64)
    match: list[int | None] = [None] * sim.shape[0]
    if sim.size == 0:
        return match
    rows, cols = linear_sum_assignment(-sim)
    for r, c in zip(rows, cols):
        match[int(r)] = int(c)
    return match


def single_sims(sim: np.ndarray, match: Sequence[int | None]) -> list[float]:
    """SingleSim per identity: cos(reference, matched generated face); 0 for a missing face."""
    return [float(sim[i, j]) if j is not None else 0.0 for i, j in enumerate(match)]


def multisim_pair(sim_aa: float, sim_bb: float, sim_ab_generated: float) -> float:
    """Paper Eq. 11: ``(Sim(A,A') + Sim(B,B'))/2 + (1 − Sim(A',B'))``."""
    return (sim_aa + sim_bb) / 2.0 + (1.0 - sim_ab_generated)


def multisim(own: Sequence[float], generated_pair_sims: Sequence[float]) -> float:
    """N-identity MultiSim: ``mean(own) + (1 − mean(pairwise Sim(A_i', A_j')))``, N ≥ 2 (NaN otherwise)."""
    if len(own) < 2 or len(generated_pair_sims) == 0:
        return float("nan")
    return float(np.mean(own)) + (1.0 - float(np.mean(generated_pair_sims)))


def generated_pair_sims(face_sim: np.ndarray, match: Sequence[int | None]) -> list[float]:
    """Similarity of each pair of identities' matched generated faces, ``(i, j)`` with i < j, in order.

    ``face_sim``: ``(n_faces, n_faces)`` cosines among generated faces. A pair with a missing face scores 1.
    """
    out = []
    for i, j in combinations(range(len(match)), 2):
        a, b = match[i], match[j]
        out.append(1.0 if a is None or b is None else float(face_sim[a, b]))
    return out


def box_centre(box: Sequence[float]) -> tuple[float, float]:
    x1, y1, x2, y2 = box
    return (x1 + x2) / 2.0, (y1 + y2) / 2.0


def centre_inside(face_box: Sequence[float], slot_box: Sequence[float]) -> bool:
    cx, cy = box_centre(face_box)
    x1, y1, x2, y2 = slot_box
    return bool(x1 <= cx <= x2 and y1 <= cy <= y2)


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def face_slots(face_boxes: Sequence[Sequence[float]], slot_boxes: Sequence[Sequence[float] | None]) -> list[int | None]:
    """Slot of each generated face: the slot whose box holds the face centre (largest IoU if several), or None."""
    out: list[int | None] = []
    for fb in face_boxes:
        best, best_iou = None, -1.0
        for k, sb in enumerate(slot_boxes):
            if sb is not None and centre_inside(fb, sb) and iou(fb, sb) > best_iou:
                best, best_iou = k, iou(fb, sb)
        out.append(best)
    return out


def placement(match: Sequence[int | None], face_boxes, slot_boxes) -> list[bool | None]:
    """Per identity: did its matched face land in its own slot (centre inside the slot box)?

    ``None`` when the identity has no slot box; ``False`` when its face is missing.
    """
    out: list[bool | None] = []
    for i, j in enumerate(match):
        sb = slot_boxes[i] if i < len(slot_boxes) else None
        out.append(None if sb is None else (j is not None and centre_inside(face_boxes[j], sb)))
    return out


def mixing_flags(sim: np.ndarray, owners: Sequence[int | None]) -> list[bool | None]:
    """Per generated face: is it more similar to another identity than to its own?

    ``sim``: ``(n_identities, n_faces)``. ``owners[j]``: the identity face j should show (its slot's identity,
    else its Hungarian match); ``None`` → not judged. Needs at least two identities.
    """
    out: list[bool | None] = []
    for j, own in enumerate(owners):
        if own is None or sim.shape[0] < 2:
            out.append(None)
            continue
        others = np.delete(sim[:, j], own)
        out.append(bool(others.max() > sim[own, j]))
    return out


def face_owners(match: Sequence[int | None], slots: Sequence[int | None],
                slot_identity: Sequence[int | None]) -> list[int | None]:
    """Identity each generated face should show: its slot's identity, else the identity it was matched to."""
    matched = {j: i for i, j in enumerate(match) if j is not None}
    owners = []
    for j, s in enumerate(slots):
        if s is not None and s < len(slot_identity) and slot_identity[s] is not None:
            owners.append(slot_identity[s])
        else:
            owners.append(matched.get(j))
    return owners


def rate(flags: Sequence[bool | None]) -> float:
    """Fraction of True among judged (non-None) flags; NaN when nothing was judged."""
    judged = [f for f in flags if f is not None]
    return float(np.mean(judged)) if judged else float("nan")


@dataclass
class Stat:
    mean: float
    std: float
    n: int
    values: list = field(default_factory=list, repr=False)

    def fmt(self, digits: int = 3) -> str:
        if self.n == 0:
            return "–"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


def aggregate(values: Sequence[float]) -> Stat:
    """Mean ± population std (ddof = 0) over finite values; NaNs (not applicable) are left out."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return Stat(float("nan"), float("nan"), 0, [])
    return Stat(float(v.mean()), float(v.std()), int(v.size), v.tolist())
