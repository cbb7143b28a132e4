"""Evaluation CLI with the real dlib recognizer and a real detector on public-domain portraits (offline).

"Generated" images are composites built at test time from scikit-image's astronaut (NASA, public domain),
matplotlib's grace_hopper (US Navy, public domain) and scikit-image's camera (CC0): each portrait is flipped and
rescaled into a known slot, so the reference and the generated face are never the same pixels.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

HINTS = {
    "dlib": "pip install dlib-bin==20.0.1.post1 face-recognition-models==0.3.0",
    "face_recognition_models": "pip install dlib-bin==20.0.1.post1 face-recognition-models==0.3.0",
    "facenet_pytorch": "pip install --no-deps facenet-pytorch==2.6.0 (MTCNN detector)",
    "transformers": "pip install transformers",
    "insightface": "pip install insightface onnxruntime onnx",
    "onnxruntime": "pip install onnxruntime",
    "onnx": "pip install onnx",
}
DLIB = ("dlib", "face_recognition_models", "facenet_pytorch")


def need(*modules: str) -> None:
    """Skip (only) when an optional package is absent, saying how to enable the test."""
    for m in modules:
        if importlib.util.find_spec(m) is None:
            pytest.skip(f"{m} is not installed; enable with: {HINTS[m]}")


skimage_data = pytest.importorskip("skimage.data", reason="pip install scikit-image")
cbook = pytest.importorskip("matplotlib.cbook", reason="pip install matplotlib")

from training.evaluation import metrics as M  # noqa: E402
from training.evaluation.cases import load_cases  # noqa: E402
from training.evaluation.errors import CasesFileError, ImageFileError  # noqa: E402
from training.evaluation.pipeline import ReferenceCache, evaluate_cases, evaluate_image  # noqa: E402
from training.evaluation.recognizers import DlibRecognizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PANEL = 512
A, B = "astronaut", "hopper"


def portraits() -> dict[str, np.ndarray]:
    hopper = np.asarray(Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB"))[:PANEL]
    camera = np.stack([skimage_data.camera()] * 3, axis=-1)
    return {A: skimage_data.astronaut(), B: hopper, "camera": camera}


def panel(img: np.ndarray | None, scale: float = 0.85) -> np.ndarray:
    """A 512×512 grey panel with the portrait mirrored and shrunk into its centre (None → empty panel)."""
    out = np.full((PANEL, PANEL, 3), 127, np.uint8)
    if img is not None:
        s = int(PANEL * scale)
        small = np.asarray(Image.fromarray(img[:, ::-1]).resize((s, s), Image.BICUBIC))
        o = (PANEL - s) // 2
        out[o:o + s, o:o + s] = small
    return out


def slot_boxes(n: int) -> list[list[int]]:
    return [[k * PANEL, 0, (k + 1) * PANEL, PANEL] for k in range(n)]


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """Reference images, generated composites and a cases file in a temp folder."""
    root = tmp_path_factory.mktemp("eval")
    p = portraits()
    (root / "refs").mkdir()
    (root / "gen").mkdir()
    for name in (A, B):
        Image.fromarray(p[name]).save(root / "refs" / f"{name}.png")
    composites = {
        "correct": [p[A], p[B]],
        "swapped": [p[B], p[A]],
        "missing": [p[A], None],
        "extra": [p[A], p[B], p["camera"]],
    }
    for cid, panels in composites.items():
        Image.fromarray(np.concatenate([panel(x) for x in panels], axis=1)).save(root / "gen" / f"{cid}.png")
    ids = [{"name": A, "images": [f"refs/{A}.png"]}, {"name": B, "images": [f"refs/{B}.png"]}]
    cases = [{"id": cid, "prompt": "a photo of two people", "identities": ids,
              "slots": {"boxes": slot_boxes(2)}} for cid in composites]
    (root / "cases.json").write_text(json.dumps({"cases": cases}))
    return root


@pytest.fixture(scope="module")
def recognizer():
    need(*DLIB)
    return DlibRecognizer("mtcnn")


@pytest.fixture(scope="module")
def results(scene, recognizer):
    cases = load_cases(str(scene / "cases.json"))
    res = evaluate_cases(cases, recognizer, str(scene / "gen"), str(scene), progress=False)
    return {r.record["case_id"]: r.record for r in res}


def test_reference_faces_are_found_and_distinct(scene, recognizer):
    refs = ReferenceCache(recognizer)
    a = refs.get(A, [str(scene / "refs" / f"{A}.png")])
    b = refs.get(B, [str(scene / "refs" / f"{B}.png")])
    assert a.embedding.shape == (128,) and a.crop.shape == (112, 112, 3)
    assert M.cosine(a.embedding, b.embedding) < 0.9  # different people


def test_correct_placement_matches_and_places(results):
    r = results["correct"]
    assert r["detected_faces"] == 2 and r["count_ok"] and r["count_message"] == "ok"
    by = {i["name"]: i for i in r["identities"]}
    assert by[A]["matched_face"] == 0 and by[B]["matched_face"] == 1  # faces are sorted left to right
    assert by[A]["placed_in_slot"] is True and by[B]["placed_in_slot"] is True
    assert r["placement_rate"] == 1.0 and r["mixing_rate"] == 0.0
    for k, f in enumerate(r["faces"]):
        own = f["sims"][f["owner"]]
        other = f["sims"][B if f["owner"] == A else A]
        assert own > other + 0.05, f"face {k}: own {own} vs other {other}"
        assert own > 0.9  # same person after mirror + rescale (dlib: L2 < 0.6 ⇔ cos > ~0.9 here)
    sims = [by[A]["single_sim"], by[B]["single_sim"]]
    pair = r["faces"][0]["sims"]  # sanity of the MultiSim assembly: recompute Eq. 11 from the parts
    assert r["multisim"] > 1.0 and r["single_sim_mean"] == pytest.approx(np.mean(sims), abs=1e-5)
    assert pair[A] == pytest.approx(by[A]["single_sim"], abs=1e-6)


def test_swapped_placement_fails_and_mixing_is_detected(results):
    r = results["swapped"]
    assert r["detected_faces"] == 2 and r["count_ok"]
    by = {i["name"]: i for i in r["identities"]}
    # the similarity (Hungarian) match still finds each person ...
    assert by[A]["matched_face"] == 1 and by[B]["matched_face"] == 0
    assert by[A]["single_sim"] == pytest.approx(results["correct"]["identities"][0]["single_sim"], abs=0.05)
    # ... but in the other one's slot: placement fails and both slot faces look like the other identity
    assert by[A]["placed_in_slot"] is False and by[B]["placed_in_slot"] is False
    assert r["placement_rate"] == 0.0 and r["mixing_rate"] == 1.0
    assert [f["owner"] for f in r["faces"]] == [A, B] and [f["closest_identity"] for f in r["faces"]] == [B, A]
    assert by[A]["slot_face_sim"] < by[A]["single_sim"]


def test_missing_face_is_a_count_error_and_scores_zero(results):
    r = results["missing"]
    assert r["detected_faces"] == 1 and r["count_error"] == -1 and not r["count_ok"]
    assert r["count_message"] == "1 face(s) missing" and r["unmatched_identities"] == [B]
    by = {i["name"]: i for i in r["identities"]}
    assert by[B]["single_sim"] == 0.0 and by[B]["placed_in_slot"] is False
    assert r["multisim"] == pytest.approx(by[A]["single_sim"] / 2 + 0.0, abs=1e-5)  # pair sim counts as 1


def test_extra_face_is_a_count_error_and_stays_unmatched(results):
    r = results["extra"]
    assert r["detected_faces"] == 3 and r["count_error"] == 1 and r["count_message"] == "1 extra face(s)"
    by = {i["name"]: i for i in r["identities"]}
    assert by[A]["matched_face"] == 0 and by[B]["matched_face"] == 1
    assert r["faces"][2]["owner"] is None and r["faces"][2]["mixed"] is None  # no slot, no identity
    assert r["placement_rate"] == 1.0 and r["mixing_rate"] == 0.0


def test_pose_keypoint_slots(scene, recognizer):
    """Slots from a POSE_KEYPOINT file: nose/eyes at the detected face centres; identity order swaps them."""
    pytest.importorskip("instantfamily_core.pose", reason="instantfamily_core.pose is part of this repo")
    img = np.asarray(Image.open(scene / "gen" / "correct.png"))
    faces = recognizer.faces(img)
    people = []
    for f in faces:
        cx, cy = M.box_centre(f.bbox)
        body = np.zeros((18, 3))
        body[0] = [cx, cy, 1]
        body[14], body[15] = [cx - 25, cy - 15, 1], [cx + 25, cy - 15, 1]
        people.append({"pose_keypoints_2d": body.ravel().tolist()})
    pose = [{"canvas_width": img.shape[1], "canvas_height": img.shape[0], "people": people}]
    (scene / "pose.json").write_text(json.dumps(pose))
    ids = [{"name": A, "images": [f"refs/{A}.png"]}, {"name": B, "images": [f"refs/{B}.png"]}]
    cases = [{"id": "correct", "identities": ids, "slots": {"pose": "pose.json"}},
             {"id": "correct", "identities": ids, "slots": {"pose": "pose.json", "identity_order": [1, 0]}}]
    (scene / "pose_cases.jsonl").write_text("\n".join(json.dumps(c) for c in cases[:1]))
    (scene / "pose_cases_swapped.json").write_text(json.dumps(cases[1:]))
    ok = load_cases(str(scene / "pose_cases.jsonl"))[0]
    swapped = load_cases(str(scene / "pose_cases_swapped.json"))[0]
    refs = ReferenceCache(recognizer)
    ref_list = [refs.get(i.name, i.images) for i in ok.identities]
    assert evaluate_image(ok, "correct.png", img, ref_list, recognizer).record["placement_rate"] == 1.0
    bad = evaluate_image(swapped, "correct.png", img, ref_list, recognizer).record
    assert bad["placement_rate"] == 0.0 and bad["mixing_rate"] == 1.0


def test_missing_generated_image_is_a_typed_error(scene, recognizer):
    ids = [{"name": A, "images": [f"refs/{A}.png"]}]
    (scene / "bad.json").write_text(json.dumps([{"id": "x", "identities": ids, "images": ["gen/nope.png"]}]))
    with pytest.raises(ImageFileError, match="nope.png"):
        evaluate_cases(load_cases(str(scene / "bad.json")), recognizer, None, str(scene), progress=False)
    with pytest.raises(CasesFileError, match="'ghost'.*'images'"):
        (scene / "bad2.json").write_text(json.dumps([{"id": "ghost", "identities": ids}]))
        evaluate_cases(load_cases(str(scene / "bad2.json")), recognizer, str(scene / "gen"), str(scene),
                       progress=False)


def test_cli_end_to_end(scene, tmp_path):
    need(*DLIB)
    out = tmp_path / "report"
    cmd = [sys.executable, os.path.join(ROOT, "training", "evaluate.py"), "--cases", str(scene / "cases.json"),
           "--images", str(scene / "gen"), "--recognizer", "dlib", "--out", str(out), "--label", "test-ckpt"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "TextSim skipped" in proc.stderr and "--clip-model" in proc.stderr
    assert "1 face(s) missing" in proc.stdout and "1 extra face(s)" in proc.stdout
    names = ["summary.md", "summary.json", "summary.csv", "per_image.csv", "contact_sheet.png",
             "similarity_hist.png"]
    assert sorted(os.listdir(out)) == sorted(names)  # no temp files left behind
    md = (out / "summary.md").read_text()
    assert "| test-ckpt | 4 |" in md and "±" in md and "hopper not in its slot" in md
    data = json.loads((out / "summary.json").read_text())
    assert data["summary"]["n_images"] == 4 and len(data["images"]) == 4
    assert data["summary"]["metrics"]["CountOK"]["mean"] == 0.5
    assert data["summary"]["metrics"]["TextSim"]["n"] == 0
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert {r["metric"] for r in rows} >= {"SingleSim", "MultiSim", "MixingRate", "PlacementRate"}
    assert len(list(csv.DictReader((out / "per_image.csv").open()))) == 4
    for png in ("contact_sheet.png", "similarity_hist.png"):
        with Image.open(out / png) as im:
            im.verify()
        with Image.open(out / png) as im:
            assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100


def test_cli_reports_bad_input_with_exit_code_2(tmp_path):
    (tmp_path / "cases.json").write_text(json.dumps([{"id": "c1", "identities": [{"name": "a"}]}]))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "training", "evaluate.py"), "--cases",
                           str(tmp_path / "cases.json"), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "case 'c1'" in proc.stderr and "identities[0].images" in proc.stderr


def _tiny_clip(folder) -> str:
    """A randomly initialised, tiny transformers CLIP model + processor saved to ``folder`` (fully offline)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())  # byte-level vocab without merges: one token per character
    vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": len(chars) + i for i, c in enumerate(chars)}
    bos, eos = len(vocab), len(vocab) + 1
    vocab |= {"<|startoftext|>": bos, "<|endoftext|>": eos}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    small = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2)
    cfg = CLIPConfig(text_config=dict(vocab_size=len(vocab), max_position_embeddings=77, bos_token_id=bos,
                                      eos_token_id=eos, pad_token_id=eos, **small),
                     vision_config=dict(image_size=32, patch_size=8, **small), projection_dim=16)
    CLIPModel(cfg).save_pretrained(str(folder))
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                     crop_size={"height": 32, "width": 32}),
                  tokenizer=tok).save_pretrained(str(folder))
    return str(folder)


def test_textsim_with_a_local_clip_model(scene, tmp_path, capsys):
    need("transformers", *DLIB)
    from training.evaluate import main
    from training.evaluation.textsim import TextScorer

    clip_dir = _tiny_clip(tmp_path)
    scorer = TextScorer(clip_dir)
    img = np.asarray(Image.open(scene / "gen" / "correct.png"))
    s1 = scorer.score(img, "a photo of two people")
    assert -1.0 <= s1 <= 1.0 and s1 == pytest.approx(scorer.score(img, "a photo of two people"))
    assert -1.0 <= scorer.score(img, "two people " * 60) <= 1.0  # over-long prompts are truncated, not an error
    out = tmp_path / "out"
    rc = main(["--cases", str(scene / "cases.json"), "--images", str(scene / "gen"), "--out", str(out),
               "--clip-model", clip_dir, "--no-progress"])
    assert rc == 0
    data = json.loads((out / "summary.json").read_text())
    assert data["summary"]["metrics"]["TextSim"]["n"] == 4
    assert data["meta"]["textsim"].startswith("TextSim: CLIP")
    assert "TextSim skipped" not in capsys.readouterr().err


def test_facenet_recognizer_with_user_weights(scene, tmp_path):
    """The FaceNet path loads a user state dict (random here: no real weights offline) and embeds MTCNN crops."""
    need("facenet_pytorch")
    import torch
    from facenet_pytorch import InceptionResnetV1

    from training.evaluation.errors import RecognizerSpecError
    from training.evaluation.recognizers import parse_recognizer

    torch.manual_seed(0)
    weights = tmp_path / "facenet.pt"
    torch.save(InceptionResnetV1(pretrained=None, classify=False).state_dict(), weights)
    rec = parse_recognizer(f"facenet:{weights}")
    faces = rec.faces(np.asarray(Image.open(scene / "gen" / "correct.png")))
    assert len(faces) == 2 and faces[0].bbox[0] < faces[1].bbox[0]
    assert faces[0].embedding.shape == (512,) and np.isfinite(faces[0].embedding).all()
    assert faces[0].crop.shape == (112, 112, 3)
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "wrong.pt")
    with pytest.raises(RecognizerSpecError, match="not an InceptionResnetV1"):
        parse_recognizer(f"facenet:{tmp_path / 'wrong.pt'}")
    with pytest.raises(RecognizerSpecError, match="not found"):
        parse_recognizer(f"facenet:{tmp_path / 'none.pt'}")


def test_insightface_recognizer_via_core_analyzer(tmp_path_factory, tmp_path):
    """``insightface:<root>:<pack>`` through the core FaceAnalyzer, on the tiny test pack (no real weights exist
    offline): red squares are faces, the inner circle's colour is the identity."""
    need("insightface", "onnxruntime", "onnx")
    pytest.importorskip("instantfamily_core.faces", reason="the core faces package is part of this repo")
    from tools.devkit.face_models import draw_faces, session_tiny_root
    from training.evaluate import main

    root = session_tiny_root(tmp_path_factory)
    red, blue = (255, 255, 0), (0, 0, 255)
    (tmp_path / "gen").mkdir()
    Image.fromarray(draw_faces((640, 640), [(320, 320)], [red])).save(tmp_path / "ref_a.png")
    Image.fromarray(draw_faces((640, 640), [(320, 320)], [blue])).save(tmp_path / "ref_b.png")
    Image.fromarray(draw_faces((640, 640), [(160, 320), (480, 320)], [red, blue])).save(tmp_path / "gen/ok.png")
    Image.fromarray(draw_faces((640, 640), [(160, 320), (480, 320)], [blue, red])).save(tmp_path / "gen/sw.png")
    ids = [{"name": "a", "images": ["ref_a.png"]}, {"name": "b", "images": ["ref_b.png"]}]
    slots = {"boxes": [[0, 0, 320, 640], [320, 0, 640, 640]]}
    (tmp_path / "cases.json").write_text(json.dumps([{"id": c, "identities": ids, "slots": slots}
                                                     for c in ("ok", "sw")]))
    out = tmp_path / "out"
    rc = main(["--cases", str(tmp_path / "cases.json"), "--images", str(tmp_path / "gen"), "--out", str(out),
               "--recognizer", f"insightface:{root}:tinypack", "--no-progress"])
    assert rc == 0
    recs = {r["case_id"]: r for r in json.loads((out / "summary.json").read_text())["images"]}
    assert recs["ok"]["detected_faces"] == 2 and recs["ok"]["placement_rate"] == 1.0
    assert [i["single_sim"] for i in recs["ok"]["identities"]] == [pytest.approx(1.0, abs=1e-4)] * 2
    assert recs["sw"]["placement_rate"] == 0.0 and recs["sw"]["mixing_rate"] == 1.0
