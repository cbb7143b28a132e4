"""Fuzz: the files and strings users hand the pack — identity files, identity_weights / identity_order strings,
checkpoint metadata, evaluate / generate cases files, training shard manifests and shard metadata.

Every case either succeeds with a valid result or raises one of the pack's typed errors (instantfamily_core.errors,
training/evaluation/errors.py, training.data.DatasetError) whose message names the input. Deterministic
(``derandomize``), bounded example counts; the per-input counts are printed in the terminal summary.
"""

from __future__ import annotations

import importlib.util
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file

from instantfamily_core.checkpoint import CheckpointMeta, _parse_meta
from instantfamily_core.errors import InstantFamilyError
from instantfamily_core.identity import (IDENTITY_FILE_FORMAT, IdentityFeatures, SkippedIdentity, load_identities,
                                         save_identities)
from instantfamily_core.pose import assign_slots, parse_order, parse_pose
from instantfamily_core.projector import IdentityProjector, ProjectorConfig
from support.fuzz import check_typed, fuzz_settings, register_report, tried
from tools.devkit.identities import random_identities
from training.data import DatasetError, ShardDataset, read_manifest, read_shard_metadata
from training.evaluation.cases import load_cases
from training.generate import case_layout

ROOT = Path(__file__).resolve().parents[1]


def _convert():
    """nodes/convert.py without importing the nodes package (which needs the ComfyUI host)."""
    spec = importlib.util.spec_from_file_location("instantfamily_nodes_convert", ROOT / "nodes" / "convert.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


CONVERT = _convert()


@pytest.fixture(scope="module", autouse=True)
def fuzz_report(request):
    register_report(request.config)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzzfiles")


_COUNTER = [0]


def fresh(work: Path, suffix: str) -> Path:
    _COUNTER[0] += 1
    return work / f"f{_COUNTER[0]}{suffix}"


# -- identity files -------------------------------------------------------------------------------------------------

def _safetensors_bytes(tensors: dict, metadata: dict | None) -> bytes:
    """A safetensors file written by the reference writer (safetensors' own save_file), as bytes."""
    import io
    import tempfile
    with tempfile.NamedTemporaryFile(suffix=".safetensors", delete=False) as f:
        path = f.name
    try:
        save_file(tensors, path, metadata=metadata)
        return Path(path).read_bytes()
    finally:
        os.unlink(path)


@st.composite
def identity_file(draw):
    """Bytes of an identities file: valid ones, truncated / corrupted ones, and ones with a wrong schema."""
    n = draw(st.integers(1, 3))
    ids = random_identities(n, seed=draw(st.integers(0, 5)))
    info = [{"name": i.name, "num_images": 1, "face_pack": "tinypack"} for i in ids]
    tensors = {}
    for k, i in enumerate(ids):
        tensors[f"identity.{k}.global"] = i.global_embedding.contiguous()
        tensors[f"identity.{k}.local"] = i.local_map.contiguous()
    md = {"format": IDENTITY_FILE_FORMAT}
    mutation = draw(st.sampled_from(["none", "truncate", "flip", "format", "info", "entry", "dims", "values",
                                     "missing_tensor", "extra_keys", "skipped"]))
    if mutation == "format":
        md["format"] = draw(st.sampled_from(["instantfamily", "", "instantfamily-identities-v2", "IDENTITIES"]))
    elif mutation == "info":
        md["identities"] = draw(st.sampled_from(["", "{", "null", "42", "{}", '"x"', json.dumps(info * 2),
                                                 json.dumps([]), "[[]]", json.dumps([None] * n)]))
    elif mutation == "entry":
        k = draw(st.integers(0, n - 1))
        key = draw(st.sampled_from(["name", "num_images", "face_pack"]))
        if draw(st.booleans()):
            del info[k][key]
        else:
            info[k][key] = draw(st.sampled_from([None, "x", -1, 1.5, [], {"a": 1}, 10 ** 30]))
    elif mutation == "dims":
        k = draw(st.integers(0, n - 1))
        shape_g = draw(st.sampled_from([(512,), (256,), (1, 512), (), (0,)]))
        shape_l = draw(st.sampled_from([(512, 7, 7), (512, 7, 6), (512, 49), (7, 7), (512, 1, 1), (0, 7, 7)]))
        tensors[f"identity.{k}.global"] = torch.rand(shape_g) + 0.1
        tensors[f"identity.{k}.local"] = torch.rand(shape_l) + 0.1
    elif mutation == "values":
        k = draw(st.integers(0, n - 1))
        which = draw(st.sampled_from(["global", "local"]))
        fill = draw(st.sampled_from([float("nan"), float("inf"), 0.0]))
        tensors[f"identity.{k}.{which}"] = torch.full_like(tensors[f"identity.{k}.{which}"], fill)
        if draw(st.booleans()):
            tensors[f"identity.{k}.{which}"] = tensors[f"identity.{k}.{which}"].to(torch.int32)
    elif mutation == "missing_tensor":
        del tensors[draw(st.sampled_from(sorted(tensors)))]
    elif mutation == "extra_keys":
        tensors["identity.9.global"] = torch.ones(3)
        md["extra"] = "x"
        for entry in info:
            entry["unknown_key"] = [1, 2]
    elif mutation == "skipped":
        info[0] = {"name": info[0]["name"], "skipped": True, "reason": "no face found"}
    md.setdefault("identities", json.dumps(info))
    data = _safetensors_bytes(tensors, md)
    mutation = f"{mutation} of a {n}-identity file"
    if mutation.startswith("truncate"):
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif mutation.startswith("flip"):
        pos = draw(st.integers(0, min(len(data) - 1, 8 + struct.unpack("<Q", data[:8])[0] + 64)))
        data = data[:pos] + bytes([data[pos] ^ draw(st.integers(1, 255))]) + data[pos + 1:]
    return FileBytes(data, mutation)


class FileBytes(bytes):
    """File contents whose repr is a short description (hypothesis prints failing examples)."""

    def __new__(cls, data: bytes, what: str):
        obj = super().__new__(cls, data)
        obj.what = what
        return obj

    def __repr__(self) -> str:
        return f"<{len(self)} bytes: {self.what}>"


@fuzz_settings(150)
@given(data=identity_file())
def test_identity_files(work, data):
    path = fresh(work, ".safetensors")
    path.write_bytes(data)
    try:
        loaded = load_identities(str(path))
    except Exception as e:  # noqa: BLE001
        tried("identity file (Load Identities)", check_typed(e, (InstantFamilyError,), (path.name,)))
        return
    assert loaded and all(isinstance(i, (IdentityFeatures, SkippedIdentity)) for i in loaded)
    real = [i for i in loaded if isinstance(i, IdentityFeatures)]
    for i in real:
        assert torch.isfinite(i.global_embedding).all() and torch.isfinite(i.local_map).all()
    # what Apply does with them: the projector takes them or names the identity that does not fit
    projector = _small_projector()
    try:
        tokens = projector.project(real)
    except Exception as e:  # noqa: BLE001
        tried("identity file (Load Identities)",
              check_typed(e, (InstantFamilyError,), tuple(i.name for i in real)) + " at projection")
        return
    assert tokens.shape == (len(real), 50, 8) and torch.isfinite(tokens).all()
    tried("identity file (Load Identities)", "ok")


_PROJ = {}


def _small_projector():
    if "p" not in _PROJ:
        torch.manual_seed(0)
        _PROJ["p"] = IdentityProjector(ProjectorConfig(512, 512, 7, 8, 8)).eval()
    return _PROJ["p"]


# -- identity_weights and identity_order strings --------------------------------------------------------------------

WEIGHT_TEXT = st.one_of(
    st.text(max_size=20),
    st.lists(st.floats(0, 5), min_size=1, max_size=4).map(lambda v: ", ".join(f"{x:g}" for x in v)),
    st.lists(st.floats(0, 5), min_size=1, max_size=4).map(lambda v: ",".join(str(x) for x in v)),
    st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 3)), max_size=5).map(
        lambda v: ", ".join(str(x) for x in v)),
    st.sampled_from(["", " ", "1,0.8", "1,,0.5", "nan", "inf,1", "-1,1", "1e400", "1;2", "0x1", "1_0", "½"]))


@fuzz_settings(300)
@given(text=WEIGHT_TEXT, count=st.integers(1, 4))
def test_identity_weights(text, count):
    try:
        weights = CONVERT.parse_weights(text, count)
    except Exception as e:  # noqa: BLE001
        tried("identity_weights string", check_typed(e, (InstantFamilyError,), ("identity_weights",)))
        return
    assert len(weights) == count and all(np.isfinite(w) and w >= 0 for w in weights)
    tried("identity_weights string", "ok")


def _pose_with(people: int) -> dict:
    ps = []
    for i in range(people):
        body = np.zeros((18, 3))
        cx = 60 + 120 * i
        body[0], body[14], body[15] = (cx, 80, 1), (cx - 10, 70, 1), (cx + 10, 70, 1)
        ps.append({"pose_keypoints_2d": body.reshape(-1).tolist()})
    return {"people": ps, "canvas_width": 512, "canvas_height": 256}


ORDER_TEXT = st.one_of(
    st.integers(1, 4).flatmap(lambda k: st.permutations(list(range(k)))).map(lambda v: ", ".join(map(str, v))),
    st.sampled_from(["auto", "", " AUTO ", "0", "1,0"]),st.text(alphabet="0123456789, -auto", max_size=12), st.text(max_size=8),
                       st.lists(st.integers(-2, 5), max_size=5).map(lambda v: ",".join(map(str, v))))


@fuzz_settings(300)
@given(text=ORDER_TEXT, n=st.integers(0, 4), people=st.integers(1, 4))
def test_identity_order(text, n, people):
    frame = parse_pose(_pose_with(people))
    try:
        slots = assign_slots(frame, n, parse_order(text))
    except Exception as e:  # noqa: BLE001
        tried("identity_order string", check_typed(e, (InstantFamilyError,), ("identity_order", "identity order",
                                                                               "identities", "pose_keypoint")))
        return
    masks = slots.masks()
    assert masks.shape == (n, 256, 512)
    assert all(masks[k].sum() > 0 for k in range(n))
    tried("identity_order string", "ok")


# -- checkpoint metadata ------------------------------------------------------------------------------------------

def _good_meta() -> dict:
    return CheckpointMeta(face_pack="tinypack", projector=ProjectorConfig(512, 512, 7, 8, 8)).to_strings()


META_VALUES = st.one_of(st.text(max_size=12), st.sampled_from(
    ["", "1", "2", "0", "-1", "sd15", "sdxl", "additive", "paper", "ldm", "diffusers", "{}", "[]", "null", "1e9",
     json.dumps({"global_dim": 512}), json.dumps({"global_dim": -1, "local_dim": 512, "grid": 7, "token_dim": 8,
                                                  "hidden_dim": 8}),
     json.dumps({"global_dim": "512", "local_dim": 512, "grid": 7, "token_dim": 8, "hidden_dim": 8}),
     json.dumps({"global_dim": 10 ** 12, "local_dim": 512, "grid": 7, "token_dim": 8, "hidden_dim": 8}),
     json.dumps({"global_dim": 512, "local_dim": 512, "grid": 7, "token_dim": 8, "hidden_dim": 8, "x": 1}),
     "[" * 5000]))
META_KEYS = st.sampled_from(["format", "schema_version", "base_model", "face_pack", "projector_config", "mask_mode",
                             "controlnet_layout", "controlnet_config", "max_identities", "slot_palette", "extra"])


@fuzz_settings(300)
@given(changes=st.lists(st.tuples(META_KEYS, st.one_of(st.none(), META_VALUES)), max_size=3))
def test_checkpoint_metadata(changes):
    md = _good_meta()
    for key, value in changes:
        if value is None:
            md.pop(key, None)
        else:
            md[key] = value
    try:
        meta = _parse_meta(md, "fuzz.safetensors")
    except Exception as e:  # noqa: BLE001
        tried("checkpoint metadata", check_typed(e, (InstantFamilyError,), ("fuzz.safetensors",)))
        return
    pc = meta.projector
    assert all(isinstance(getattr(pc, f), int) and getattr(pc, f) >= 1 for f in ProjectorConfig.__dataclass_fields__)
    assert meta.mask_mode in ("additive", "paper") and meta.max_identities >= 1
    if pc.global_dim * pc.hidden_dim + pc.local_dim * pc.hidden_dim < 2 ** 22:  # the projector it describes builds
        IdentityProjector(pc)
    tried("checkpoint metadata", "ok")


# -- cases files (evaluate / generate) ------------------------------------------------------------------------------

@st.composite
def cases_file(draw, work: Path):
    """A cases file (JSON, JSONL or junk) next to a pose file and a reference image path."""
    folder = work / f"cases{draw(st.integers(0, 3))}"
    folder.mkdir(exist_ok=True)
    pose = _pose_with(draw(st.integers(1, 3)))
    if draw(st.integers(0, 5)) == 0:
        pose = draw(st.sampled_from([{"people": []}, "not json", {"version": "ap10k", "animals": [[[1, 2, 1]]],
                                                                  "canvas_width": 64, "canvas_height": 64}]))
    (folder / "pose.json").write_text(pose if isinstance(pose, str) else json.dumps(pose))
    cases = []
    for c in range(draw(st.integers(0, 3))):
        clean = draw(st.integers(0, 2)) > 0  # two thirds: every field well-formed, only the geometry varies
        n = draw(st.integers(1, 3)) if clean else draw(st.integers(0, 3))
        pick = (lambda good, bad: good) if clean else (lambda good, bad: draw(st.sampled_from([good] + bad)))
        case = {"id": pick(f"c{c}", ["", None, 7, "dup"]), "prompt": pick("two people", [3, None, ""]),
                "identities": [{"name": f"p{k}", "images": pick(["a.png"], ["a.png", [], [3], None])}
                               for k in range(n)]}
        slots = draw(st.sampled_from(["none", "boxes", "pose"] + ([] if clean else ["junk"])))
        if slots == "boxes":
            units = pick(draw(st.sampled_from(["px", "relative"])), ["cm"])
            scale = 1.0 if units == "relative" else 256.0
            coord = st.floats(-0.5, 1.5) if clean else st.one_of(st.floats(-0.5, 1.5), st.just(float("nan")))
            boxes = [[draw(coord) * scale for _ in range(4)] for _ in range(n)]
            boxes = [[min(b[0], b[2]), min(b[1], b[3]), max(b[0], b[2]) + 1e-3 * scale,
                      max(b[1], b[3]) + 1e-3 * scale] if clean or draw(st.booleans()) else b for b in boxes]
            case["slots"] = {"boxes": boxes, "units": units}
            if draw(st.booleans()):
                case["slots"]["canvas"] = pick([256, 256], [[0, 5], "256", [256]])
        elif slots == "pose":
            case["slots"] = {"pose": pick("pose.json", ["missing.json", 5, ""]),
                             "identity_order": draw(st.sampled_from([None, [0, 1], [1, 0], [0]] + (
                                 [] if clean else [[0, 0], "0", [5]]))),
                             "margin": pick(0.25, ["x", -1, float("nan"), 0.0]),
                             "frame": pick(0, [1, -1, "0", 1.5])}
        elif slots == "junk":
            case["slots"] = draw(st.sampled_from([[], "x", {"boxes": "x"}, {}]))
        if draw(st.integers(0, 5)) == 0:
            case["expected_faces"] = pick(2, [-1, "2", 2.5])
        cases.append(case)
    fmt = draw(st.sampled_from(["json", "json", "json-list", "jsonl", "jsonl", "junk"]))
    if fmt == "json":
        text, name = json.dumps({"cases": cases}), "cases.json"
    elif fmt == "json-list":
        text, name = json.dumps(cases), "cases.json"
    elif fmt == "jsonl":
        text, name = "\n".join(json.dumps(c) for c in cases), "cases.jsonl"
    else:
        text, name = draw(st.sampled_from(["", "{", "[1,2]", "\xff\xfe", '{"cases": 3}', "null"])), "cases.json"
    path = folder / name
    path.write_bytes(text.encode("utf-8", errors="surrogateescape") if fmt != "junk" else text.encode("latin-1"))
    return path


@fuzz_settings(250)
@given(data=st.data())
def test_cases_files(work, data):
    path = data.draw(cases_file(work))
    try:
        cases = load_cases(str(path))
        layouts = [case_layout(c, 96, 64) for c in cases]
    except Exception as e:  # noqa: BLE001
        tried("cases file (evaluate / generate)",
              check_typed(e, (InstantFamilyError,), ("case ", "cases file", "pose.json", "missing.json",
                                                      "family_", "template")))
        return
    for c, lay in zip(cases, layouts):
        n = len(c.identities)
        assert lay.masks.shape == (n, 64, 96) and lay.control.shape == (64, 96, 3)
        assert torch.isfinite(lay.masks).all() and lay.masks.min() >= 0 and lay.masks.max() <= 1
        assert all(lay.masks[k].sum() > 0 for k in range(n)), f"case {c.id}: an identity got an empty mask"
    tried("cases file (evaluate / generate)", "ok")


# -- shard manifests and shard metadata -----------------------------------------------------------------------------

def _good_manifest() -> dict:
    return {"format": "instantfamily-shards", "version": 1, "info": {"resolution": 64, "face_pack": "tinypack",
                                                                     "global_dim": 512, "local_dim": 512, "grid": 7,
                                                                     "margin": 0.25},
            "input_fingerprint": "x", "shards": [{"file": "shard-00000.safetensors", "num_samples": 1}]}


MANIFEST_VALUES = st.sampled_from([None, 0, -1, 1, "1", 1.5, [], {}, "x", True, [{"file": "../etc"}], [{"file": 3}],
                                   [{"file": "shard-00000.safetensors"}], [{}], {"resolution": "64"}])


@fuzz_settings(200)
@given(changes=st.lists(st.tuples(st.sampled_from(["format", "version", "info", "shards", "info.resolution",
                                                   "info.grid", "info.global_dim"]),
                                  st.one_of(st.just("<delete>"), MANIFEST_VALUES)), max_size=3),
       shard=st.sampled_from(["none", "good", "junk", "bad_md"]),
       raw=st.sampled_from([None, None, None, "", "{", "[]", "null", "\xff"]))
def test_shard_manifests(work, changes, shard, raw):
    folder = fresh(work, "_ds")
    folder.mkdir()
    m = _good_manifest()
    for key, value in changes:
        target, k = (m["info"], key[5:]) if key.startswith("info.") and isinstance(m.get("info"), dict) else (m, key)
        if value == "<delete>":
            target.pop(k, None)
        else:
            target[k] = value
    text = raw if raw is not None else json.dumps(m)
    (folder / "manifest.json").write_bytes(text.encode("latin-1") if raw == "\xff" else text.encode())
    shard_path = folder / "shard-00000.safetensors"
    if shard == "good":
        save_file({"000000.image": torch.zeros(4, dtype=torch.uint8)}, str(shard_path),
                  metadata={"format": "instantfamily-shard", "version": "1", "samples": "[]", "skipped": "[]",
                            "inputs": "{}", "info": "{}"})
    elif shard == "junk":
        shard_path.write_bytes(b"\x00" * 7)
    elif shard == "bad_md":
        save_file({"x": torch.zeros(1)}, str(shard_path), metadata={"format": "instantfamily-shard", "version": "1",
                                                                      "samples": "{"})
    try:
        ShardDataset(folder)
    except Exception as e:  # noqa: BLE001
        tried("shard manifest + shards (train)", check_typed(e, (InstantFamilyError,), (
            "manifest", "shard-00000", "dataset", str(folder))))
        return
    raise AssertionError("a dataset with no samples must not load")  # every shard here holds zero samples
