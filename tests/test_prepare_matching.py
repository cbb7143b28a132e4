"""prepare.py's face ↔ person matching: an optimal one-to-one assignment under the face-box rule.

A pair is allowed when the detection centre lies in the person's face box (+ margin); its cost is the distance from
that centre to the face box centre. The reference is a brute force over every one-to-one matching of allowed pairs:
most pairs first, then the smallest total distance.
"""

from __future__ import annotations

from itertools import permutations

import numpy as np
import pytest

from instantfamily_core.pose import parse_pose
from training.prepare import match_faces


NECK_ONLY = [0.0] * 3 + [200.0, 150.0, 1.0] + [0.0] * 48  # body-18 with only the neck: no face box


def pose_frame(face_boxes, width=400, height=200):
    """One person per face box (``None``: a person whose keypoints locate no face)."""
    people = [{"pose_keypoints_2d": [0] * 54, "face_box_2d": list(b)} if b is not None else
              {"pose_keypoints_2d": NECK_ONLY} for b in face_boxes]
    return parse_pose({"canvas_width": width, "canvas_height": height, "people": people})


def det(cx, cy, half=2.0):
    """A detection box centred on (cx, cy)."""
    return np.array([cx - half, cy - half, cx + half, cy + half], np.float32)


def closest_first(frame, boxes, margin):
    """The former greedy rule (closest allowed pair first), for comparison only."""
    cost = cost_matrix(frame, boxes, margin)
    out, pairs = {}, sorted((c, p, d) for (p, d), c in np.ndenumerate(cost) if np.isfinite(c))
    for _, p, d in pairs:
        if p not in out and d not in out.values():
            out[p] = d
    return out


def cost_matrix(frame, boxes, margin):
    """Distances of allowed pairs, ``inf`` elsewhere — computed here from the face boxes, not by prepare.py."""
    cost = np.full((len(frame.people), len(boxes)), np.inf)
    for p, person in enumerate(frame.people):
        if person.box is None:
            continue
        (x1, y1, _), (x2, y2, _) = person.box
        cx, cy, hw, hh = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) * (1 + margin) / 2, (y2 - y1) * (1 + margin) / 2
        lo_x, lo_y = max(0.0, cx - hw), max(0.0, cy - hh)
        hi_x, hi_y = min(float(frame.width), cx + hw), min(float(frame.height), cy + hh)
        for d, b in enumerate(boxes):
            dx, dy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
            if lo_x <= dx <= hi_x and lo_y <= dy <= hi_y:
                cost[p, d] = float(np.hypot(dx - cx, dy - cy))
    return cost


def brute_force(cost):
    """(number of pairs, total distance) of the best one-to-one matching of allowed pairs."""
    n_p, n_d = cost.shape
    best = (0, 0.0)
    for k in range(1, min(n_p, n_d) + 1):
        for people in permutations(range(n_p), k):
            for faces in permutations(range(n_d), k):
                c = [cost[p, d] for p, d in zip(people, faces)]
                if all(np.isfinite(c)) and (k, -sum(c)) > (best[0], -best[1]):
                    best = (k, sum(c))
    return best


def score(cost, match):
    assert len(set(match.values())) == len(match)  # one-to-one
    assert all(np.isfinite(cost[p, d]) for p, d in match.items())  # only allowed pairs
    return len(match), sum(cost[p, d] for p, d in match.items())


def test_closest_first_would_steal_the_only_allowed_face():
    # person 0's box x 0..100, person 1's x 60..160; face 0 (x 95) is in both boxes and closest to person 1
    # (15 px vs 45 px), face 1 (x 150) only in person 1's box.
    frame = pose_frame([(0, 0, 100, 100), (60, 0, 160, 100)])
    boxes = [det(95, 50), det(150, 50)]
    assert closest_first(frame, boxes, 0.0) == {1: 0}  # person 0 left without a face
    assert match_faces(frame, boxes, 0.0) == {0: 0, 1: 1}


def test_optimal_total_distance_beats_closest_first():
    # both faces lie in both (wide) boxes; box centres x 100 and 103, faces at x 101 and 97:
    # closest first takes (0, face 0) = 1 px, then (1, face 1) = 6 px: 7 px; optimal (0, 1) + (1, 0) = 3 + 2 = 5 px.
    frame = pose_frame([(80, 40, 120, 60), (83, 40, 123, 60)])
    boxes = [det(101, 50), det(97, 50)]
    cost = cost_matrix(frame, boxes, 0.0)
    assert score(cost, closest_first(frame, boxes, 0.0)) == (2, pytest.approx(7.0))
    match = match_faces(frame, boxes, 0.0)
    assert match == {0: 1, 1: 0} and score(cost, match) == (2, pytest.approx(5.0))


def test_the_face_box_rule_still_rejects_pairs():
    # person 2's box x 300..400; face 2 at x 250 lies outside it (and outside the others) with a 25 % margin
    frame = pose_frame([(0, 0, 100, 100), (120, 0, 220, 100), (300, 0, 400, 100), None])
    boxes = [det(50, 50), det(170, 50), det(250, 50)]
    assert match_faces(frame, boxes, 0.25) == {0: 0, 1: 1}  # face 2 and persons 2, 3 stay unmatched
    assert match_faces(frame, boxes, 1.5) == {0: 0, 1: 1, 2: 2}  # a margin that reaches x 250 allows the pair
    assert match_faces(frame, [det(250, 150)], 0.25) == {}  # nothing allowed: no match at all
    assert match_faces(frame, [], 0.25) == {}
    assert match_faces(pose_frame([None]), boxes, 0.25) == {}


def test_random_cases_match_the_brute_force_optimum():
    rng = np.random.default_rng(12)
    beaten = 0
    for _ in range(300):
        n_p, n_d = rng.integers(1, 5), rng.integers(0, 5)
        boxes_p = []
        for _ in range(n_p):
            x, y, s = rng.uniform(0, 300), rng.uniform(0, 150), rng.uniform(20, 80)
            boxes_p.append((x, y, x + s, y + s) if rng.random() > 0.1 else None)
        if all(b is None for b in boxes_p):
            boxes_p[0] = (10, 10, 60, 60)
        frame = pose_frame(boxes_p)
        boxes = [det(rng.uniform(0, 400), rng.uniform(0, 200)) for _ in range(n_d)]
        margin = float(rng.choice([0.0, 0.25, 1.0]))
        cost = cost_matrix(frame, boxes, margin)
        best = brute_force(cost)
        got = score(cost, match_faces(frame, boxes, margin))
        assert got[0] == best[0] and got[1] == pytest.approx(best[1], abs=1e-6)
        greedy = score(cost, closest_first(frame, boxes, margin))
        beaten += (greedy[0], -greedy[1]) < (best[0], -best[1] - 1e-9)
    assert beaten > 0  # the random cases include some where closest-first is worse
