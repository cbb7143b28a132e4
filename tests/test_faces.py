"""Face analysis through the REAL insightface FaceAnalysis, on tiny generated ONNX models (tests/support)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from instantfamily_core.errors import EmbeddingError, InstantFamilyError, NoFaceError
from instantfamily_core.faces import FaceAnalyzer, ImageInputError, clear_analyzer_cache, get_analyzer
from tools.devkit.face_models import KPS_OFFSETS, draw_faces, session_tiny_root, tiny_recognizer_module

BLUE, GREEN, YELLOW = (0, 0, 255), (0, 255, 0), (255, 255, 0)
CENTERS = [(160, 192), (480, 320), (320, 512)]


@pytest.fixture(scope="session")
def face_root(tmp_path_factory):
    return session_tiny_root(tmp_path_factory)


@pytest.fixture(scope="module")
def analyzer(face_root):
    return FaceAnalyzer(face_root, "tinypack", provider="CPU", det_size=640)


@pytest.fixture
def fresh(face_root):
    """A private analyzer for tests that spy on or patch insightface (its result cache starts empty)."""
    return FaceAnalyzer(face_root, "tinypack", provider="CPU", det_size=640)


def three_faces(colors=(BLUE, GREEN, BLUE)):
    return draw_faces((640, 640), CENTERS, colors)


def cos(a, b):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_three_faces_exact_boxes_and_kps(analyzer):
    faces = analyzer.detect(three_faces(), "group")
    assert len(faces) == 3
    boxes = sorted(tuple(f.bbox.tolist()) for f in faces)
    assert boxes == sorted((cx - 48.0, cy - 48.0, cx + 48.0, cy + 48.0) for cx, cy in CENTERS)
    for f in faces:
        c = (f.bbox[:2] + f.bbox[2:]) / 2
        np.testing.assert_allclose(f.kps, c + KPS_OFFSETS, atol=0.02)
        assert f.det_score > 0.9 and f.det_size == 640
        assert f.crop.shape == (112, 112, 3) and f.crop.dtype == np.uint8


def test_crop_is_rgb_and_aligned(analyzer):
    f = analyzer.detect(draw_faces((640, 640), [(320, 320)], [BLUE]), "one")[0]
    center = f.crop[56, 56].astype(int)  # the identity circle lands at the crop centre
    assert tuple(center) == BLUE
    assert tuple(f.crop[20, 56].astype(int)) == (255, 0, 0)  # red "skin" above it, in RGB order


def test_embeddings_unit_norm_and_local_map_shape(analyzer):
    for f in analyzer.detect(three_faces(), "group"):
        assert f.global_embedding.shape == (512,) and f.global_embedding.dtype == np.float32
        assert abs(float(np.linalg.norm(f.global_embedding)) - 1.0) < 1e-5
        assert f.local_map.shape == (512, 7, 7) and f.local_map.dtype == np.float32
        assert np.isfinite(f.local_map).all() and np.abs(f.local_map).max() > 0


def test_local_map_is_the_recognizer_feature_map(analyzer):
    """The map run through the recognizer's remaining layers reproduces insightface's embedding, and the map is
    the recognizer body's output on the crop with ArcFace normalisation."""
    net = tiny_recognizer_module()
    f = analyzer.detect(three_faces(), "group")[0]
    with torch.no_grad():
        emb = net.head(torch.from_numpy(f.local_map.copy())[None])[0].numpy()
        x = (torch.from_numpy(f.crop.astype(np.float32)) - 127.5) / 127.5
        body = net.body(x.permute(2, 0, 1)[None])[0].numpy()
    np.testing.assert_allclose(emb / np.linalg.norm(emb), f.global_embedding, atol=1e-5)
    np.testing.assert_allclose(body, f.local_map, atol=1e-4)


def test_same_identity_cos_one_different_less(analyzer):
    faces = analyzer.detect(three_faces((BLUE, GREEN, BLUE)), "group")
    by_center = {tuple(((f.bbox[:2] + f.bbox[2:]) / 2).astype(int)): f for f in faces}
    a, b, c = (by_center[cxy] for cxy in CENTERS)  # blue, green, blue
    assert cos(a.global_embedding, c.global_embedding) > 0.9999
    assert cos(a.global_embedding, b.global_embedding) < 0.995
    # same pattern elsewhere in the image: equal up to warpAffine's sub-pixel rounding at colour edges
    assert np.abs(a.local_map - c.local_map).max() < 1e-3
    assert np.abs(a.local_map - b.local_map).max() > 2e-2


def test_encode_returns_identity_features(analyzer):
    ident = analyzer.encode(draw_faces((640, 640), [(320, 320)], [GREEN]), name="bob")
    assert ident.name == "bob" and ident.num_images == 1 and ident.face_pack == "tinypack"
    assert ident.global_embedding.shape == (512,) and ident.local_map.shape == (512, 7, 7)
    assert abs(float(ident.global_embedding.norm()) - 1) < 1e-5


def test_encode_averages_several_images(analyzer):
    img_b = draw_faces((640, 640), [(320, 320)], [BLUE])
    img_y = draw_faces((512, 640), [(256, 224)], [YELLOW])
    fb, fy = analyzer.detect(img_b)[0], analyzer.detect(img_y)[0]
    ident = analyzer.encode([img_b, img_y], name="carol")
    assert ident.num_images == 2
    mean = (fb.global_embedding + fy.global_embedding) / 2
    np.testing.assert_allclose(ident.global_embedding.numpy(), mean / np.linalg.norm(mean), atol=1e-6)
    np.testing.assert_allclose(ident.local_map.numpy(), (fb.local_map + fy.local_map) / 2, atol=1e-5)
    batch = analyzer.encode(np.stack([img_b, img_b]), name="carol")  # B×H×W×3 batch = same person twice
    np.testing.assert_allclose(batch.global_embedding.numpy(), fb.global_embedding, atol=1e-6)


def test_largest_face_first_and_used_by_encode(fresh, monkeypatch):
    real_get = fresh.app.get

    def get_with_one_big_face(img, *a, **k):  # insightface's real faces, with the green one's box enlarged
        faces = real_get(img, *a, **k)
        for f in faces:
            if f.bbox[0] == 432:
                f.bbox = f.bbox + np.array([-30, -30, 30, 30], np.float32)
        return faces

    monkeypatch.setattr(fresh.app, "get", get_with_one_big_face)
    img = three_faces((BLUE, GREEN, BLUE))
    faces = fresh.detect(img)
    assert [f.area for f in faces] == sorted((f.area for f in faces), reverse=True)
    assert faces[0].bbox[0] == 402
    ident = fresh.encode(img, name="dave")
    np.testing.assert_allclose(ident.global_embedding.numpy(), faces[0].global_embedding, atol=1e-6)


def spy_detector_sizes(analyzer, monkeypatch) -> list:
    """Record the detector input size of every detection (the prepared size for FaceAnalysis.get's call)."""
    sizes = []
    det = analyzer.app.det_model
    real_detect = det.detect

    def detect(img, *a, **k):
        sizes.append(k.get("input_size") or (analyzer.det_size, analyzer.det_size))
        return real_detect(img, *a, **k)

    monkeypatch.setattr(det, "detect", detect)
    return sizes


def test_retry_at_smaller_det_size(fresh, monkeypatch):
    sizes = spy_detector_sizes(fresh, monkeypatch)
    # a 104-px face off the 32-px grid: missed at 640, found at 576 (scale 0.9 puts it on the grid)
    img = draw_faces((640, 640), [(400, 400)], [(255, 0, 0)], size=104)
    faces = fresh.detect(img, "off-grid")
    assert len(faces) == 1 and faces[0].det_size == 576
    assert [s[0] for s in sizes] == [640, 576]
    assert abs(float(faces[0].bbox[0]) - 304 / 0.9) < 1.0  # found at (352, 352) ± 48 in the 576 input
    assert abs(float(np.linalg.norm(faces[0].global_embedding)) - 1) < 1e-5 and faces[0].local_map.shape == (512, 7, 7)
    fresh.detect(three_faces(), "normal")  # the next image starts again at the full size
    assert [s[0] for s in sizes] == [640, 576, 640]
    assert fresh.det_sizes() == [640, 576, 512, 448, 384, 320, 256, 192]


def test_no_face_tries_every_size_and_names_the_image(fresh, monkeypatch):
    sizes = spy_detector_sizes(fresh, monkeypatch)
    good, blank = draw_faces((640, 640), [(320, 320)], [BLUE]), np.full((480, 640, 3), 128, np.uint8)
    with pytest.raises(NoFaceError) as e:
        fresh.encode([good, blank], name="erin")
    msg = str(e.value)
    assert "erin" in msg and "image 1" in msg and "640×480" in msg
    assert [s[0] for s in sizes] == [640, 640, 576, 512, 448, 384, 320, 256, 192]


def test_no_face_skip(analyzer, caplog):
    good, blank = draw_faces((640, 640), [(320, 320)], [GREEN]), np.full((256, 256, 3), 128, np.uint8)
    with caplog.at_level("WARNING"):
        ident = analyzer.encode([blank, good], name="fay", on_no_face="skip")
    assert ident is not None and ident.num_images == 1
    assert "fay" in caplog.text and "image 0" in caplog.text
    assert analyzer.encode([blank, blank], name="fay", on_no_face="skip") is None
    with pytest.raises(InstantFamilyError, match="on_no_face"):
        analyzer.encode(good, name="fay", on_no_face="ignore")


def test_second_encode_hits_cache(fresh, monkeypatch):
    calls = []
    real_get = fresh.app.get
    monkeypatch.setattr(fresh.app, "get", lambda img, *a, **k: (calls.append(1), real_get(img, *a, **k))[1])
    imgs = [draw_faces((640, 640), [(320, 320)], [BLUE]), three_faces()]
    first = fresh.encode(imgs, name="gus")
    n = len(calls)
    assert n == 2 and fresh.cache_misses == 2
    second = fresh.encode([im.copy() for im in imgs], name="gus")  # equal pixels, other arrays
    assert len(calls) == n and fresh.cache_hits == 2
    assert torch.equal(first.global_embedding, second.global_embedding)
    assert torch.equal(first.local_map, second.local_map)
    other = imgs[0].copy()
    other[0, 0] = 0  # one pixel changed -> a miss
    fresh.detect(other)
    assert len(calls) == n + 1


def test_cached_results_are_read_only(analyzer):
    f = analyzer.detect(three_faces())[0]
    with pytest.raises(ValueError):
        f.global_embedding[0] = 5.0


@pytest.mark.parametrize("bad, fragment", [
    (np.zeros((64, 64, 3), np.float32), "dtype uint8"),
    (np.zeros((64, 64), np.uint8), "(H, W, 3)"),
    (np.zeros((64, 64, 4), np.uint8), "(H, W, 3)"),
    (np.zeros((8, 8, 3), np.uint8), "too small"),
    ([[0, 0, 0]], "numpy"),
])
def test_bad_image_inputs(analyzer, bad, fragment):
    with pytest.raises(ImageInputError) as e:
        analyzer.detect(bad, name="ref photo")
    assert "ref photo" in str(e.value) and fragment in str(e.value)


def test_bad_image_in_a_list_is_named(analyzer):
    good = draw_faces((640, 640), [(320, 320)], [BLUE])
    with pytest.raises(ImageInputError, match=r"hana image 1: expected dtype uint8"):
        analyzer.encode([good, good.astype(np.float32) / 255], name="hana")
    with pytest.raises(ImageInputError, match="no reference images"):
        analyzer.encode([], name="hana")
    with pytest.raises(ImageInputError, match="hana"):
        analyzer.encode("photo.png", name="hana")


@pytest.mark.parametrize("det_size", [0, 100, 650, True, "640"])
def test_bad_det_size(face_root, det_size):
    with pytest.raises(InstantFamilyError, match="det_size"):
        FaceAnalyzer(face_root, "tinypack", provider="CPU", det_size=det_size)


def test_nan_embedding_is_a_typed_error(fresh, monkeypatch):
    real_local = fresh._local  # the one recognizer pass (insightface's own recognizer is not run)

    def nan_local(crops):
        emb, fmap = real_local(crops)
        return np.full_like(emb, np.nan), fmap

    monkeypatch.setattr(fresh, "_local", nan_local)
    with pytest.raises(EmbeddingError, match="ivy"):
        fresh.encode(three_faces(), name="ivy")


def test_get_analyzer_is_cached(face_root):
    clear_analyzer_cache()
    a = get_analyzer(face_root, "tinypack", "CPU", 640)
    assert get_analyzer(face_root, "tinypack", "cpu", 640) is a
    b = get_analyzer(face_root, "tinypack", "CPU", 512)
    assert b is not a and b.det_size == 512
    clear_analyzer_cache()
    assert get_analyzer(face_root, "tinypack", "CPU", 640) is not a
