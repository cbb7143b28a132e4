"""One atomic writer, one image loader, typed errors in the errors modules.

* the files ``prepare.py`` (shards, manifest) and ``evaluate.py`` (reports) write get normal permissions
  (``0o666 & ~umask``), and a write that fails leaves neither half a file nor a temp file;
* a photo with an EXIF orientation gives the same upright array through preparation, the training shards and
  evaluation;
* error classes live in the errors modules and the old import paths still give the same classes;
* a bad option value on a CLI ends in one ``error:`` line, not a traceback.
"""

from __future__ import annotations

import ast
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from instantfamily_core import fileio
from instantfamily_core.errors import ImageFileError, InstantFamilyError, OptionError
from instantfamily_core.faces.images import load_rgb
from training import prepare
from training.data import PreparedSample, decode_image, read_shard_metadata, shard_name, write_shard
from training.evaluation import cases as eval_cases
from training.evaluation.pipeline import summarize
from training.evaluation.report import write_all

ROOT = Path(__file__).resolve().parents[1]
ORIENTATION = 0x0112


# ---------------------------------------------------------------------------------------------------------------
# writers


def _sample() -> PreparedSample:
    record = {"key": "a.png", "caption": "x", "size": 8, "pose": {}, "faces": [], "source_size": [8, 8]}
    return PreparedSample(record, b"not decoded here", np.zeros((1, 4)), np.zeros((1, 2, 2, 2)))


def _write_everything(folder: Path) -> list[Path]:
    """What prepare.py and evaluate.py write: a shard, the manifest, and the six report files."""
    shard = folder / "shards" / shard_name(0)
    write_shard(shard, [_sample()], [], {"start": 0, "stop": 1, "fingerprint": "f"}, {"resolution": 8})
    prepare.build_manifest(shard.parent, 1, 1, "f", {})
    meta = {"label": "t", "recognizer": "test", "recognizer_spec": "test", "cases": "c", "images": None,
            "textsim": "TextSim skipped", "similarity": "cosine"}
    paths = write_all(str(folder / "eval"), [], summarize([]), meta)
    return [shard, shard.parent / "manifest.json"] + [Path(p) for p in paths.values()]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_have_normal_permissions(tmp_path, umask):
    old = os.umask(umask)
    try:
        written = _write_everything(tmp_path)
    finally:
        os.umask(old)
    assert len(written) == 8
    for p in written:
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask, p.name
    leftovers = [p.name for p in tmp_path.rglob("*") if p.name.startswith(".tmp")]
    assert leftovers == []


def test_failing_writes_leave_no_temp_file_and_keep_the_old_file(tmp_path, monkeypatch):
    written = _write_everything(tmp_path)
    before = {p: p.read_bytes() for p in written}

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fileio.os, "fsync", broken_fsync)
    meta = {"label": "t2", "recognizer": "test", "recognizer_spec": "test", "cases": "c", "images": None,
            "textsim": "TextSim skipped", "similarity": "cosine"}
    with pytest.raises(OSError, match="No space"):
        write_all(str(tmp_path / "eval"), [], summarize([]), meta)
    monkeypatch.undo()

    import safetensors.torch

    def half_written(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 10)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", half_written)
    shard = tmp_path / "shards" / shard_name(0)
    with pytest.raises(OSError, match="No space"):
        write_shard(shard, [_sample(), _sample()], [], {"start": 0, "stop": 2, "fingerprint": "g"}, {})
    monkeypatch.undo()

    assert {p: p.read_bytes() for p in written} == before  # every old file whole, not replaced
    assert read_shard_metadata(shard)["inputs"]["fingerprint"] == "f"
    assert [p.name for p in tmp_path.rglob("*") if p.name.startswith(".tmp")] == []


def test_no_hand_rolled_atomic_writes_outside_fileio():
    """Every temp-file + rename write goes through instantfamily_core/fileio.py. Known exceptions: checkpoints.py
    renames a whole step folder, and localmap.py probes whether a folder is writable with a temp file."""
    allowed = {"os.replace(": {"instantfamily_core/fileio.py", "training/checkpoints.py"},
               "mkstemp(": {"instantfamily_core/fileio.py", "instantfamily_core/faces/localmap.py"}}
    found = []
    for folder in ("instantfamily_core", "nodes", "training", "tools", "benchmarks"):
        for p in sorted((ROOT / folder).rglob("*.py")):
            rel = p.relative_to(ROOT).as_posix()
            text = p.read_text(encoding="utf-8")
            found += [f"{rel}: {call}" for call, where in allowed.items() if call in text and rel not in where]
    assert found == []


# ---------------------------------------------------------------------------------------------------------------
# the one image loader


def _asymmetric(h: int = 24, w: int = 40) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 6, y * 10, (x + 2 * y) % 256], axis=-1).astype(np.uint8)


def _with_orientation(path: Path, pixels: np.ndarray, orientation: int | None) -> Path:
    exif = Image.Exif()
    if orientation is not None:
        exif[ORIENTATION] = orientation
    Image.fromarray(pixels).save(path, format="PNG", exif=exif)
    return path


# EXIF orientation 6: the camera was turned so the stored picture must be turned 90° clockwise to be upright;
# 8: 90° counter-clockwise; 1 / none: as stored
@pytest.mark.parametrize("orientation, upright", [(6, lambda a: np.rot90(a, -1)), (8, lambda a: np.rot90(a, 1)),
                                                  (1, lambda a: a), (None, lambda a: a)])
def test_exif_orientation_is_honoured_by_prepare_data_and_evaluation(tmp_path, orientation, upright):
    stored = _asymmetric()
    path = _with_orientation(tmp_path / "photo.png", stored, orientation)
    with Image.open(path) as im:  # the file really carries the tag and the stored pixels
        assert im.getexif().get(ORIENTATION) == orientation and np.array_equal(np.asarray(im.convert("RGB")), stored)
    expected = upright(stored)

    prepared = prepare.load_image(path)  # preparation
    evaluated = eval_cases.load_rgb(str(path))  # evaluation (references and generated images)
    in_shard = decode_image(prepare.encode(prepared, "png"))  # the training data: prepare's bytes, decoded
    raw_bytes = decode_image(path.read_bytes())  # stored bytes that still carry the tag

    for got in (prepared, evaluated, in_shard, raw_bytes):
        assert got.dtype == np.uint8 and got.shape == expected.shape
        assert np.array_equal(got, expected)


def test_one_loader_everywhere():
    from instantfamily_core.faces import images
    assert eval_cases.load_rgb is images.load_rgb
    for rel in ("training/prepare.py", "training/data.py", "training/evaluation/cases.py", "benchmarks/bench_faces.py"):
        text = (ROOT / rel).read_text(encoding="utf-8")
        assert "Image.open(" not in text, rel
        assert "load_rgb" in text, rel


def test_unreadable_images_raise_a_typed_error_naming_the_file(tmp_path):
    with pytest.raises(ImageFileError, match="not found: .*missing.png"):
        load_rgb(tmp_path / "missing.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ImageFileError, match="cannot decode image .*bad.png"):
        load_rgb(bad)
    with pytest.raises(ImageFileError, match="cannot decode image shard-00001.safetensors: k"):
        decode_image(np.frombuffer(b"garbage", np.uint8), name="shard-00001.safetensors: k")
    assert issubclass(ImageFileError, InstantFamilyError) and issubclass(ImageFileError, ValueError)
    with pytest.raises(prepare.SkipItem, match="unreadable image .*bad.png"):
        prepare.load_image(bad)
    with pytest.raises(prepare.SkipItem, match="^image file not found$"):
        prepare.load_image(tmp_path / "missing.png")
    buf = io.BytesIO()
    Image.fromarray(_asymmetric()).convert("L").save(buf, format="PNG")  # grey → RGB
    assert load_rgb(buf.getvalue()).shape == (24, 40, 3)


# ---------------------------------------------------------------------------------------------------------------
# errors


def test_error_classes_live_in_the_errors_modules_and_old_imports_still_work():
    import instantfamily_core.errors as core
    import training.errors as tr
    import training.evaluation.errors as ev
    from instantfamily_core.faceid.files import FaceIDFileError
    from instantfamily_core.faces import ImageInputError
    from training.data import DatasetError
    from training.evaluation.errors import ImageFileError as EvalImageFileError
    from training.generate import GenerateError
    from training.train import TrainingError
    assert FaceIDFileError is core.FaceIDFileError and issubclass(FaceIDFileError, core.ModelFileError)
    assert ImageInputError is core.ImageInputError and EvalImageFileError is core.ImageFileError
    assert (DatasetError, GenerateError, TrainingError) == (tr.DatasetError, tr.GenerateError, tr.TrainingError)
    for module in (core, tr, ev):
        for name in module.__all__ if hasattr(module, "__all__") else dir(module):
            obj = getattr(module, name)
            if isinstance(obj, type) and issubclass(obj, Exception):
                assert issubclass(obj, core.InstantFamilyError), name

    defined_elsewhere = []
    for folder in ("instantfamily_core", "nodes", "training", "tools"):
        for p in sorted((ROOT / folder).rglob("*.py")):
            if p.name == "errors.py":
                continue
            for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ClassDef) and any(
                        (b.id if isinstance(b, ast.Name) else getattr(b, "attr", "")).endswith("Error")
                        for b in node.bases):
                    defined_elsewhere.append(f"{p.relative_to(ROOT).as_posix()}:{node.name}")
    assert defined_elsewhere == []


def test_option_values_raise_option_error():
    import torch

    from instantfamily_core.attention import MaskedCrossAttention
    from instantfamily_core.pose import parse_order
    from training.checkpoints import EMA, check_ema_decay
    masks = torch.zeros(2, 4, 4)
    masks[0, :2], masks[1, 2:] = 1, 1
    with pytest.raises(OptionError, match="identity weights"):
        MaskedCrossAttention(masks, 5, weights=[1.0, float("nan")])
    with pytest.raises(OptionError, match="1,0,2"):
        parse_order("one, two")
    for bad in (0.0, 1.0, 2.0, -0.5):
        with pytest.raises(OptionError, match="--ema-decay"):
            check_ema_decay(bad)
        with pytest.raises(OptionError, match="--ema-decay"):
            EMA(torch.nn.Linear(2, 2), bad)
    assert check_ema_decay(0.999) == 0.999


def test_train_cli_bad_ema_decay_is_one_error_line_not_a_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "training" / "train.py"), "--base", str(tmp_path / "no-base"),
                           "--data", str(tmp_path / "no-data"), "--output", str(tmp_path / "out"),
                           "--ema", "--ema-decay", "2"],
                          cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--ema-decay" in errors[0] and "(0, 1)" in errors[0], proc.stderr[-3000:]
    assert not (tmp_path / "out").exists()  # refused before anything was loaded or written
