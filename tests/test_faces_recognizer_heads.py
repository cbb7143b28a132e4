"""Recognizers with other embedding heads, through the REAL insightface FaceAnalysis (tiny generated ONNX packs):

* MobileFaceNet-shaped (buffalo_s ``w600k_mbf``): GDC depthwise conv, then ``x.view(b, -1)`` — a Reshape, no
  Flatten — with a contrib op before it, so ONNX infers no shape there. The local-map finder must still find the
  512×7×7 map (it measures the shapes by running the model once).
* A head whose Reshape is fixed to batch 1: two faces in one image must not raise onnxruntime's error; crops go
  through one at a time.

References are independent of the code under test: the torch modules the ONNX files were exported from, and
insightface's own embedding.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
import torch

from instantfamily_core.errors import ModelFileError
from instantfamily_core.faces import FaceAnalyzer
from instantfamily_core.faces.localmap import LocalMapModel, find_local_map
from tools.devkit.face_models import (BATCH1_REC_FILE, MBF_REC_FILE, batch1_recognizer_module, draw_faces,
                                 make_pack_with_recognizer, mobilefacenet_recognizer_module,
                                 write_mobilefacenet_recognizer)

BLUE, GREEN = (0, 0, 255), (0, 255, 0)
TWO_FACES = dict(canvas_hw=(384, 512), centers=[(128, 192), (384, 192)], identity_colors=[BLUE, GREEN])


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("heads")
    make_pack_with_recognizer(r, "mbfpack", "mobilefacenet")
    make_pack_with_recognizer(r, "batch1pack", "batch1")
    return r


def _normalised(crop: np.ndarray) -> torch.Tensor:
    return ((torch.from_numpy(crop.astype(np.float32)) - 127.5) / 127.5).permute(2, 0, 1)[None]


def _quick_gelu_body(net, x):
    """The MobileFaceNet body with the PReLU replaced by QuickGelu, as the uninferable export stores it."""
    conv1, _, conv2 = net.body
    h = conv1(x)
    return conv2(h * torch.sigmoid(1.702 * h))


def test_mobilefacenet_reshape_without_inferable_shape_is_found(root):
    model = onnx.load(str(root / "models" / "mbfpack" / MBF_REC_FILE))
    assert not any(n.op_type == "Flatten" for n in model.graph.node)
    inferred = onnx.shape_inference.infer_shapes(model)
    reshape = next(n for n in model.graph.node if n.op_type == "Reshape")
    known = {v.name for v in inferred.graph.value_info if v.type.tensor_type.HasField("shape")}
    assert reshape.output[0] not in known and reshape.input[0] not in known  # the case that used to fail
    name, dims = find_local_map(model)
    assert tuple(dims[1:]) == (512, 7, 7)
    assert name == "/body/body.2/Conv_output_0"  # the last spatial map, before the 7×7 depthwise GDC


def test_mobilefacenet_with_inferable_shapes_too(tmp_path):
    path = write_mobilefacenet_recognizer(tmp_path / "mbf_plain.onnx", uninferable=False)
    _, dims = find_local_map(onnx.load(str(path)))
    assert tuple(dims[1:]) == (512, 7, 7)


def test_mobilefacenet_pack_encodes_two_faces(root):
    analyzer = FaceAnalyzer(root, "mbfpack", provider="CPU", det_size=512)
    faces = analyzer.detect(draw_faces(**TWO_FACES), "two people")
    assert len(faces) == 2
    net = mobilefacenet_recognizer_module()
    for f in faces:
        assert f.local_map.shape == (512, 7, 7)
        with torch.no_grad():
            ref = _quick_gelu_body(net, _normalised(f.crop))[0].numpy()
        np.testing.assert_allclose(f.local_map, ref, atol=1e-4)


def test_batch1_reshape_runs_one_crop_at_a_time(root, caplog):
    caplog.set_level(logging.INFO)
    analyzer = FaceAnalyzer(root, "batch1pack", provider="CPU", det_size=512)
    assert analyzer._local.fixed_batch == 1
    assert "fixed to batch 1" in caplog.text
    faces = analyzer.detect(draw_faces(**TWO_FACES), "two people")
    assert len(faces) == 2
    net = batch1_recognizer_module()
    for f in faces:
        with torch.no_grad():
            x = _normalised(f.crop)
            body = net.body(x)[0].numpy()
            emb = net(x)[0].numpy()
        np.testing.assert_allclose(f.local_map, body, atol=1e-4)
        np.testing.assert_allclose(f.global_embedding, emb / np.linalg.norm(emb), atol=1e-5)
    assert abs(float(faces[0].global_embedding @ faces[1].global_embedding)) < 0.9999


def test_batched_failure_falls_back_to_one_at_a_time(root, caplog):
    """Without the static hint (a Reshape whose batch-1 shape is computed), the failing batched run is retried one
    crop at a time — never onnxruntime's raw error."""
    rec = root / "models" / "batch1pack" / BATCH1_REC_FILE
    model = LocalMapModel(rec, ["CPUExecutionProvider"], 127.5, 127.5)
    model.fixed_batch = None  # forget the static detection
    crops = np.random.default_rng(0).integers(0, 256, (2, 112, 112, 3), dtype=np.uint8)
    emb, fmap = model(crops)
    assert emb.shape == (2, 512) and fmap.shape == (2, 512, 7, 7)
    assert model.fixed_batch == 1 and "one crop at a time" in caplog.text
    one = [model(crops[i:i + 1]) for i in range(2)]
    np.testing.assert_allclose(emb, np.concatenate([o[0] for o in one]))


def test_a_recognizer_without_head_is_a_typed_error(tmp_path):
    from onnx import TensorProto, helper
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 112, 112])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 112, 112])])
    with pytest.raises(ModelFileError, match="no Flatten/Reshape"):
        find_local_map(helper.make_model(g))
