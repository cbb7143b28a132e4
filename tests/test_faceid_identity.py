"""Public-weights mode, inputs: Encode Identity keeps what FaceID needs — each photo's normed embedding (Portrait
concatenates them) and the 224-px aligned RGB face crop (Plus feeds it to CLIP ViT-H) — through averaging."""

from __future__ import annotations

import numpy as np
import pytest

from instantfamily_core.faces import FaceAnalyzer
from instantfamily_core.identity import IdentityFeatures
from tools.devkit.face_models import draw_faces, session_tiny_root

BLUE, GREEN = (0, 0, 255), (0, 255, 0)


@pytest.fixture(scope="module")
def analyzer(tmp_path_factory):
    return FaceAnalyzer(session_tiny_root(tmp_path_factory), "tinypack", provider="CPU", det_size=640)


def test_each_photo_keeps_its_normed_embedding_and_224_aligned_rgb_crop(analyzer):
    photos = [draw_faces((640, 640), [(320, 320)], [BLUE]), draw_faces((512, 640), [(192, 256)], [GREEN])]
    ident = analyzer.encode(photos, name="ann")
    embs, crops = ident.extra["faceid_embeddings"], ident.extra["faceid_crops"]
    assert len(embs) == len(crops) == 2
    for photo, e, crop, color in zip(photos, embs, crops, (BLUE, GREEN)):
        face = analyzer.detect(photo)[0]
        np.testing.assert_allclose(e.numpy(), face.global_embedding)  # insightface's normed_embedding
        assert abs(float(np.linalg.norm(e.numpy())) - 1) < 1e-5
        assert crop.shape == (224, 224, 3) and crop.dtype == np.uint8
        assert tuple(crop[112, 112].astype(int)) == color  # face centre at the crop centre, RGB order
        assert tuple(crop[40, 112].astype(int)) == (255, 0, 0)  # the red "skin" above it
        small = crop.reshape(112, 2, 112, 2, 3).mean((1, 3))  # same alignment as the recognizer's 112 crop, ×2
        assert np.abs(small - face.crop.astype(float)).mean() < 8


def test_averaging_encodings_concatenates_the_per_photo_lists(analyzer):
    a = analyzer.encode(draw_faces((640, 640), [(320, 320)], [BLUE]), name="a")
    b = analyzer.encode([draw_faces((640, 640), [(320, 320)], [GREEN])] * 2, name="a")
    both = IdentityFeatures.average([a, b], name="a")
    assert len(both.extra["faceid_embeddings"]) == 3 and len(both.extra["faceid_crops"]) == 3
    np.testing.assert_array_equal(both.extra["faceid_crops"][0], a.extra["faceid_crops"][0])
    plain = IdentityFeatures(a.global_embedding, a.local_map, name="loaded")  # e.g. from Load Identities
    assert "faceid_crops" not in IdentityFeatures.average([plain, a]).extra
