"""Evaluation formulas against hand-computed values; cases-file validation. Pure numpy, no models."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from training.evaluation import metrics as M
from training.evaluation.cases import find_generated, load_cases
from training.evaluation.errors import CasesFileError, ImageFileError
from training.evaluation.cases import load_rgb


def test_cosine_is_scale_invariant_and_zero_safe():
    assert M.cosine([3, 4], [6, 8]) == pytest.approx(1.0)
    assert M.cosine([1, 0], [0, 2]) == pytest.approx(0.0)
    assert M.cosine([1, 1], [1, 0]) == pytest.approx(1 / math.sqrt(2))
    assert M.cosine([0, 0], [1, 0]) == 0.0
    s = M.cosine_matrix(np.array([[1.0, 0], [0, 2]]), np.array([[2.0, 0], [1, 1], [0, -1]]))
    np.testing.assert_allclose(s, [[1, 1 / math.sqrt(2), 0], [0, 1 / math.sqrt(2), -1]], atol=1e-12)
    assert M.cosine_matrix(np.zeros((2, 3)), np.zeros((0, 3))).shape == (2, 0)


def test_multisim_pair_is_the_papers_eq_11():
    # (0.8 + 0.6) / 2 + (1 - 0.3) = 0.7 + 0.7
    assert M.multisim_pair(0.8, 0.6, 0.3) == pytest.approx(1.4)
    assert M.multisim_pair(1.0, 1.0, -1.0) == pytest.approx(3.0)  # upper end of the ≈[−1, 3] range
    assert M.multisim([0.8, 0.6], [0.3]) == pytest.approx(M.multisim_pair(0.8, 0.6, 0.3))


def test_multisim_n_identities():
    # mean own (0.9 + 0.6 + 0.3)/3 = 0.6; mean pairwise (0.2 + 0.4 + 0.0)/3 = 0.2 → 0.6 + 0.8 = 1.4
    assert M.multisim([0.9, 0.6, 0.3], [0.2, 0.4, 0.0]) == pytest.approx(1.4)
    assert math.isnan(M.multisim([0.9], []))


def test_hungarian_beats_greedy():
    # greedy would give identity 0 face 0 (0.9), leaving identity 1 with 0.1: total 1.0; optimum is 0.8 + 0.85
    sim = np.array([[0.9, 0.8], [0.85, 0.1]])
    assert M.hungarian_match(sim) == [1, 0]
    assert M.single_sims(sim, [1, 0]) == [0.8, 0.85]


def test_hungarian_fewer_faces_than_identities():
    sim = np.array([[0.2], [0.7], [0.5]])
    match = M.hungarian_match(sim)
    assert match == [None, 0, None]
    assert M.single_sims(sim, match) == [0.0, 0.7, 0.0]
    assert M.hungarian_match(np.zeros((2, 0))) == [None, None]


def test_hungarian_more_faces_than_identities():
    sim = np.array([[0.1, 0.3, 0.9], [0.8, 0.2, 0.85]])
    assert M.hungarian_match(sim) == [2, 0]  # 0.9 + 0.8 = 1.7 beats 0.3 + 0.85 and 0.85 + ... alternatives


def test_generated_pair_sims_missing_face_counts_as_one():
    face_sim = np.array([[1.0, 0.25], [0.25, 1.0]])
    assert M.generated_pair_sims(face_sim, [0, 1]) == [0.25]
    assert M.generated_pair_sims(face_sim, [1, None, 0]) == [1.0, 0.25, 1.0]  # pairs (0,1), (0,2), (1,2)
    # one of two faces missing: own = [0.8, 0], pair = 1 → MultiSim = 0.4 + 0
    assert M.multisim([0.8, 0.0], M.generated_pair_sims(face_sim, [0, None])) == pytest.approx(0.4)


def test_boxes_iou_centre_and_placement():
    assert M.iou([0, 0, 2, 2], [1, 1, 3, 3]) == pytest.approx(1 / 7)
    assert M.iou([0, 0, 1, 1], [2, 2, 3, 3]) == 0.0
    assert M.centre_inside([10, 10, 20, 20], [0, 0, 16, 16]) and not M.centre_inside([10, 10, 40, 40], [0, 0, 16, 16])
    faces = [[10, 10, 50, 50], [110, 10, 150, 50]]
    slots = [[0, 0, 100, 100], [100, 0, 200, 100]]
    assert M.placement([0, 1], faces, slots) == [True, True]
    assert M.placement([1, 0], faces, slots) == [False, False]
    assert M.placement([0, None], faces, slots) == [True, False]
    assert M.placement([0, 1], faces, [None, None]) == [None, None]
    assert M.face_slots(faces + [[300, 0, 340, 40]], slots) == [0, 1, None]
    # overlapping slots: the larger IoU wins
    assert M.face_slots([[40, 40, 60, 60]], [[0, 0, 100, 100], [30, 30, 70, 70]]) == [1]


def test_mixing_uses_slot_owner_then_match():
    sim = np.array([[0.9, 0.2, 0.5],
                    [0.3, 0.8, 0.6]])
    # face 0 sits in slot 1 (identity 1) but looks like identity 0 → mixed; face 1 in slot 0 → mixed;
    # face 2 has no slot and no match → not judged
    owners = M.face_owners([0, 1], [1, 0, None], [0, 1])
    assert owners == [1, 0, None]
    flags = M.mixing_flags(sim, owners)
    assert flags == [True, True, None] and M.rate(flags) == 1.0
    # without slots the Hungarian match is the owner → no mixing
    owners = M.face_owners([0, 1], [None, None, None], [0, 1])
    assert owners == [0, 1, None] and M.rate(M.mixing_flags(sim, owners)) == 0.0
    assert M.mixing_flags(np.array([[0.5]]), [0]) == [None]  # one identity: nothing to mix with
    assert math.isnan(M.rate([None, None]))


def test_aggregate_mean_std_skips_nan():
    s = M.aggregate([1.0, 2.0, 3.0, float("nan"), None])
    assert (s.mean, s.n) == (2.0, 3) and s.std == pytest.approx(math.sqrt(2 / 3))
    assert s.fmt() == "2.000 ± 0.816"
    assert M.aggregate([]).n == 0 and M.aggregate([]).fmt() == "–"


# ---------------------------------------------------------------- cases file

def _write(tmp_path, obj, name="cases.json"):
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(p)


GOOD = {"id": "c1", "prompt": "two people", "identities": [{"name": "a", "images": ["a.png"]},
                                                          {"name": "b", "images": "b.png"}],
        "slots": {"boxes": [[0, 0, 0.5, 1], [0.5, 0, 1, 1]], "units": "relative"}}


def test_cases_json_and_jsonl(tmp_path):
    c = load_cases(_write(tmp_path, {"cases": [GOOD]}))[0]
    assert c.id == "c1" and c.expected_faces == 2 and c.identities[1].images == [str(tmp_path / "b.png")]
    assert c.slots.boxes_for(200, 100, 2) == [(0, 0, 100, 100), (100, 0, 200, 100)]
    c2 = load_cases(_write(tmp_path, json.dumps(GOOD) + "\n\n" + json.dumps({**GOOD, "id": "c2"}), "c.jsonl"))
    assert [x.id for x in c2] == ["c1", "c2"]
    px = {**GOOD, "slots": {"boxes": [[0, 0, 256, 512], [256, 0, 512, 512]], "canvas": [512, 512]}}
    assert load_cases(_write(tmp_path, [px]))[0].slots.boxes_for(1024, 1024, 2)[1] == (512, 0, 1024, 1024)


@pytest.mark.parametrize("bad, case, field", [
    ({**GOOD, "identities": []}, "c1", "identities"),
    ({**GOOD, "identities": [{"name": "a"}]}, "c1", "identities[0].images"),
    ({**GOOD, "slots": {"boxes": [[0, 0, 1, 1]]}}, "c1", "slots.boxes"),
    ({**GOOD, "slots": {"boxes": [[5, 0, 1, 1], [0, 0, 1, 1]]}}, "c1", "slots.boxes"),
    ({**GOOD, "slots": {**GOOD["slots"], "units": "inch"}}, "c1", "slots.units"),
    ({**GOOD, "expected_faces": -1}, "c1", "expected_faces"),
    ({k: v for k, v in GOOD.items() if k != "id"}, "#0", "id"),
])
def test_malformed_case_names_case_and_field(tmp_path, bad, case, field):
    with pytest.raises(CasesFileError) as e:
        load_cases(_write(tmp_path, [bad]))
    assert f"case {case!r}" in str(e.value) and f"field {field!r}" in str(e.value)


def test_cases_file_level_errors(tmp_path):
    with pytest.raises(CasesFileError, match="not valid JSON"):
        load_cases(_write(tmp_path, "{nope"))
    with pytest.raises(CasesFileError, match="non-empty list"):
        load_cases(_write(tmp_path, {"cases": []}))
    with pytest.raises(CasesFileError, match="duplicate"):
        load_cases(_write(tmp_path, [GOOD, GOOD]))
    with pytest.raises(CasesFileError, match="cannot read"):
        load_cases(str(tmp_path / "missing.json"))


def test_find_generated_patterns(tmp_path):
    gen = tmp_path / "gen"
    (gen / "c1").mkdir(parents=True)
    for n in ("c1.png", "c1_0.jpg", "c1_x.png", "c10.png", "c1/seed3.webp", "c1.txt"):
        (gen / n).write_bytes(b"")
    case = load_cases(_write(tmp_path, [GOOD]))[0]
    found = [p.replace(str(gen) + "/", "") for p in find_generated(case, str(gen), str(tmp_path))]
    assert found == ["c1.png", "c1_0.jpg", "c1/seed3.webp"]
    with pytest.raises(CasesFileError, match="no generated image"):
        find_generated(case, str(tmp_path), str(tmp_path))


def test_load_rgb_errors(tmp_path):
    with pytest.raises(ImageFileError, match="not found"):
        load_rgb(str(tmp_path / "x.png"))
    (tmp_path / "x.png").write_bytes(b"not an image")
    with pytest.raises(ImageFileError, match="cannot decode"):
        load_rgb(str(tmp_path / "x.png"))


def test_textsim_skip_message_and_bad_folder(tmp_path):
    from training.evaluation.errors import RecognizerSpecError
    from training.evaluation.textsim import TextScorer, make_text_scorer

    scorer, msg = make_text_scorer(None)
    assert scorer is None and msg.startswith("TextSim skipped") and "--clip-model" in msg
    with pytest.raises(RecognizerSpecError, match="not a folder"):
        TextScorer(str(tmp_path / "nope"))


@pytest.mark.parametrize("spec, match", [("dlibx", "unknown recognizer"), ("facenet", "needs a weights file"),
                                         ("insightface:/models", "insightface:<root>:<pack>")])
def test_bad_recognizer_spec(spec, match):
    from training.evaluation.errors import RecognizerSpecError
    from training.evaluation.recognizers import parse_recognizer

    with pytest.raises(RecognizerSpecError, match=match):
        parse_recognizer(spec)
