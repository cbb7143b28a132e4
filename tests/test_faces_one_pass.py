"""One recognizer pass per face, through the REAL insightface FaceAnalysis (tiny generated ONNX packs).

Every ``onnxruntime.InferenceSession.run`` is counted (``tools.devkit.onnx_runs``): outside the detector's
``detect`` calls only the edited recognizer copy may run, once per image with all of its faces in one batch (one
crop at a time for a head fixed to batch 1), so each face goes through a recognizer exactly once. The embedding it
gives must be insightface's: the reference is insightface's own ``ArcFaceONNX`` (loaded here through
``insightface.model_zoo``, independent of the analyzer) run by ``ArcFaceONNX.get`` on the same image and keypoints.
"""

from __future__ import annotations

import os
import shutil
import stat

import numpy as np
import pytest

from instantfamily_core.faces import FaceAnalyzer, local_map_model_path
from tools.devkit.face_models import (BATCH1_REC_FILE, REC_FILE, draw_faces, make_pack_with_recognizer,
                                      session_tiny_root)
from tools.devkit.onnx_runs import onnx_runs, outside_detector

BLUE, GREEN, YELLOW = (0, 0, 255), (0, 255, 0), (255, 255, 0)
THREE = dict(canvas_hw=(640, 640), centers=[(160, 192), (480, 320), (320, 512)], identity_colors=[BLUE, GREEN, YELLOW])
TWO = dict(canvas_hw=(384, 512), centers=[(128, 192), (384, 192)], identity_colors=[BLUE, GREEN])


@pytest.fixture(scope="module")
def face_root(tmp_path_factory):
    return session_tiny_root(tmp_path_factory)


@pytest.fixture(scope="module")
def batch1_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch1")
    make_pack_with_recognizer(root, "batch1pack", "batch1")
    return root


def recognizer_batches(analyzer, runs) -> list[int]:
    """Batch sizes of the recognizer runs; fails on a run of any other session outside detection."""
    local = analyzer._local.session
    others = [r for r in runs if not r.in_detector and r.session is not local]
    assert not others, f"{len(others)} run(s) of another onnxruntime session (insightface's own recognizer?)"
    assert not any(r.session is local for r in runs if r.in_detector)
    return outside_detector(runs, local)


def insightface_reference(rec_file, img_rgb, kps) -> tuple[np.ndarray, np.ndarray]:
    """insightface's own (normed embedding, aligned RGB crop) for one face: ``ArcFaceONNX.get`` on the BGR image."""
    from insightface.app.common import Face
    from insightface.model_zoo import model_zoo
    from insightface.utils import face_align

    rec = model_zoo.get_model(str(rec_file), providers=["CPUExecutionProvider"])
    assert rec.taskname == "recognition"
    img_bgr = np.ascontiguousarray(img_rgb[:, :, ::-1])
    face = Face(bbox=np.zeros(4, np.float32), kps=np.asarray(kps), det_score=1.0)
    rec.get(img_bgr, face)
    crop = face_align.norm_crop(img_bgr, landmark=np.asarray(kps), image_size=rec.input_size[0])[:, :, ::-1]
    return np.asarray(face.normed_embedding, np.float32), crop


def assert_same_embedding(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 1e-6 * np.abs(ref).max(), np.abs(ours - ref).max()


def test_insightface_recognizer_is_released(face_root):
    analyzer = FaceAnalyzer(face_root, "tinypack", provider="CPU", det_size=640)
    assert set(analyzer.app.models) == {"detection"}
    assert analyzer.recognizer_file.name == REC_FILE and analyzer.crop_size == 112


def test_one_batched_recognizer_run_per_image(face_root):
    analyzer = FaceAnalyzer(face_root, "tinypack", provider="CPU", det_size=640)
    with onnx_runs(analyzer.app.det_model) as runs:
        faces = analyzer.detect(draw_faces(**THREE), "three")
    assert len(faces) == 3
    assert recognizer_batches(analyzer, runs) == [3]  # one run, the three crops in one batch: one pass per face
    assert sum(r.in_detector for r in runs) == 1  # and one detector run

    with onnx_runs(analyzer.app.det_model) as runs:  # a face found only at a retry size (576): the same one pass
        faces = analyzer.detect(draw_faces((640, 640), [(400, 400)], [(255, 0, 0)], size=104), "off-grid")
    assert len(faces) == 1 and faces[0].det_size == 576
    assert recognizer_batches(analyzer, runs) == [1]
    assert sum(r.in_detector for r in runs) == 2  # 640 (nothing), then 576

    with onnx_runs(analyzer.app.det_model) as runs:  # encode of a cached image: no run at all
        analyzer.encode(draw_faces(**THREE), "three again")
    assert runs == []


def test_embedding_is_insightfaces(face_root):
    analyzer = FaceAnalyzer(face_root, "tinypack", provider="CPU", det_size=640)
    for spec in (THREE, dict(THREE, identity_colors=[YELLOW, BLUE, BLUE])):
        img = draw_faces(**spec)
        faces = analyzer.detect(img, "three")
        assert len(faces) == 3
        for f in faces:
            ref, ref_crop = insightface_reference(analyzer.recognizer_file, img, f.kps)
            np.testing.assert_array_equal(f.crop, ref_crop)
            assert_same_embedding(f.global_embedding, ref)
    off_grid = draw_faces((640, 640), [(400, 400)], [(255, 0, 0)], size=104)
    f = analyzer.detect(off_grid, "off-grid")[0]
    assert_same_embedding(f.global_embedding, insightface_reference(analyzer.recognizer_file, off_grid, f.kps)[0])


def test_batch1_head_one_run_per_face_and_insightfaces_embedding(batch1_root):
    analyzer = FaceAnalyzer(batch1_root, "batch1pack", provider="CPU", det_size=512)
    assert analyzer._local.fixed_batch == 1 and analyzer.recognizer_file.name == BATCH1_REC_FILE
    img = draw_faces(**TWO)
    with onnx_runs(analyzer.app.det_model) as runs:
        faces = analyzer.detect(img, "two")
    assert len(faces) == 2
    assert recognizer_batches(analyzer, runs) == [1, 1]
    for f in faces:
        assert_same_embedding(f.global_embedding, insightface_reference(analyzer.recognizer_file, img, f.kps)[0])


def test_local_map_copy_written_atomically_with_normal_permissions(face_root, tmp_path):
    folder = tmp_path / "models" / "p"
    folder.mkdir(parents=True)
    shutil.copy(face_root / "models" / "tinypack" / REC_FILE, folder / REC_FILE)
    umask = os.umask(0o022)
    os.umask(umask)
    path = local_map_model_path(folder / REC_FILE)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp file left behind
