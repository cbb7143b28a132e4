"""Face-model packs, provider choice and the local-map graph edit: every bad-file case gives a typed error."""

from __future__ import annotations

import logging
import shutil
import socket
import warnings

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from instantfamily_core.errors import InstantFamilyError, ModelFileError, NestedPackError
from instantfamily_core.faces import (FaceAnalyzer, find_local_map, list_packs, local_map_model_path, resolve_pack,
                                      select_providers)
from instantfamily_core.faces import localmap as localmap_mod
from tools.devkit.face_models import DET_FILE, REC_FILE, session_tiny_root, write_tiny_recognizer


@pytest.fixture(scope="session")
def face_root(tmp_path_factory):
    return session_tiny_root(tmp_path_factory)


@pytest.fixture
def tiny_files(face_root):
    folder = face_root / "models" / "tinypack"
    return folder / DET_FILE, folder / REC_FILE


@pytest.fixture
def no_network(monkeypatch):
    """insightface downloads missing packs: make any connection attempt fail loudly."""
    def refuse(*a, **k):
        raise AssertionError("network access attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)


def make_pack(root, name, files):
    folder = root / "models" / name
    folder.mkdir(parents=True)
    for f in files:
        shutil.copy(f, folder / f.name)
    return folder


# -- packs -------------------------------------------------------------------------------------------------------

def test_resolve_and_list(face_root, tiny_files, tmp_path):
    pack = resolve_pack(face_root, "tinypack")
    assert pack.detector.name == DET_FILE and pack.recognizer.name == REC_FILE
    assert pack.roles == {DET_FILE: "detection", REC_FILE: "recognition"}
    make_pack(tmp_path, "b_pack", tiny_files)
    make_pack(tmp_path, "a_pack", tiny_files)
    (tmp_path / "models" / "empty").mkdir()
    assert list_packs(tmp_path) == ["a_pack", "b_pack"]
    assert list_packs(tmp_path / "nowhere") == []


def test_missing_folder_names_folder_and_expected_files(tmp_path, no_network):
    with pytest.raises(ModelFileError) as e:
        FaceAnalyzer(tmp_path, "antelopev2", provider="CPU")
    msg = str(e.value)
    assert str(tmp_path / "models" / "antelopev2") in msg
    for expected in ("det_10g.onnx", "scrfd_10g_bnkps.onnx", "w600k_r50.onnx", "glintr100.onnx"):
        assert expected in msg
    assert "unzip" in msg
    assert not (tmp_path / "models").exists()  # nothing was created or downloaded


def test_missing_folder_hints_at_misplaced_pack(tmp_path, tiny_files):
    (tmp_path / "antelopev2").mkdir()
    with pytest.raises(ModelFileError, match=r"move it into .*models/"):
        resolve_pack(tmp_path, "antelopev2")


def test_nested_pack_says_which_folder_to_move(tmp_path, tiny_files, no_network):
    inner = make_pack(tmp_path, "antelopev2/antelopev2", tiny_files)
    with pytest.raises(NestedPackError) as e:
        FaceAnalyzer(tmp_path, "antelopev2", provider="CPU")
    msg = str(e.value)
    assert f"Move the files from {inner} up into {inner.parent}" in msg


def test_empty_pack_folder(tmp_path):
    (tmp_path / "models" / "p").mkdir(parents=True)
    with pytest.raises(ModelFileError, match="contains no .onnx files"):
        resolve_pack(tmp_path, "p")


@pytest.mark.parametrize("content", [b"this is not an onnx model \x00\xff" * 50, b"", "truncated"])
def test_corrupt_onnx_names_the_file(tmp_path, tiny_files, content, no_network):
    det, rec = tiny_files
    folder = make_pack(tmp_path, "p", [det])
    bad = folder / "w600k_r50.onnx"
    bad.write_bytes(rec.read_bytes()[: len(rec.read_bytes()) // 2] if content == "truncated" else content)
    with pytest.raises(ModelFileError) as e:
        FaceAnalyzer(tmp_path, "p", provider="CPU")
    assert str(bad) in str(e.value) and "download it again" in str(e.value)


def test_pack_without_recognizer(tmp_path, tiny_files):
    make_pack(tmp_path, "p", tiny_files[:1])
    with pytest.raises(ModelFileError, match=r"no ArcFace recognizer.*det_tiny.onnx \(detection\)"):
        resolve_pack(tmp_path, "p")


def test_pack_without_detector(tmp_path, tiny_files, no_network):
    make_pack(tmp_path, "p", tiny_files[1:])
    with pytest.raises(ModelFileError, match="no face detector"):
        FaceAnalyzer(tmp_path, "p", provider="CPU")  # never reaches insightface's bare assert


def _identity_model(path, n_outputs, hw=None):
    dims = [1, 3, hw, hw] if hw else [1, 3, "H", "W"]
    x = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, dims)
    outs = [helper.make_tensor_value_info(f"o{i}", TensorProto.FLOAT, None) for i in range(n_outputs)]
    nodes = [helper.make_node("Identity", ["input.1"], [f"o{i}"]) for i in range(n_outputs)]
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x], outs)), str(path))


def test_detector_without_keypoints(tmp_path, tiny_files):
    folder = make_pack(tmp_path, "p", tiny_files[1:])
    _identity_model(folder / "a_det_nokps.onnx", 6)
    with pytest.raises(ModelFileError, match="gives no facial keypoints"):
        resolve_pack(tmp_path, "p")


def test_unrecognised_and_extra_models_are_tolerated(tmp_path, tiny_files):
    folder = make_pack(tmp_path, "p", tiny_files)
    _identity_model(folder / "2d106det.onnx", 1, hw=192)
    _identity_model(folder / "odd.onnx", 1, hw=50)
    pack = resolve_pack(tmp_path, "p")
    assert pack.roles["2d106det.onnx"] == "landmark" and pack.roles["odd.onnx"] is None
    assert pack.recognizer.name == REC_FILE


@pytest.mark.parametrize("pack", ["", "..", "a/b"])
def test_bad_pack_name(tmp_path, pack):
    with pytest.raises(ModelFileError, match="folder name"):
        resolve_pack(tmp_path, pack)


# -- providers ---------------------------------------------------------------------------------------------------

@pytest.fixture
def ort_reports(monkeypatch):
    import onnxruntime

    def set_available(*names):
        monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: list(names))
    return set_available


def test_provider_auto(ort_reports):
    ort_reports("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    assert select_providers("auto") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    ort_reports("CoreMLExecutionProvider", "CPUExecutionProvider")
    assert select_providers("auto") == ["CoreMLExecutionProvider", "CPUExecutionProvider"]
    ort_reports("AzureExecutionProvider", "CPUExecutionProvider")
    assert select_providers("auto") == ["CPUExecutionProvider"]


def test_provider_named(ort_reports, caplog):
    ort_reports("ROCMExecutionProvider", "CPUExecutionProvider")
    assert select_providers("ROCm") == ["ROCMExecutionProvider", "CPUExecutionProvider"]
    assert select_providers("cpu") == ["CPUExecutionProvider"]
    with caplog.at_level(logging.WARNING):
        assert select_providers("CUDA") == ["CPUExecutionProvider"]
    assert "CUDA" in caplog.text and "falling back to CPU" in caplog.text


def test_provider_unknown(ort_reports):
    ort_reports("CPUExecutionProvider")
    with pytest.raises(InstantFamilyError, match="unknown choice 'TPU'"):
        select_providers("TPU")


def test_analyzer_uses_cpu_ctx_when_cuda_missing(face_root, ort_reports):
    ort_reports("CPUExecutionProvider")
    a = FaceAnalyzer(face_root, "tinypack", provider="CUDA")
    assert a.providers == ["CPUExecutionProvider"] and a.ctx_id == -1


# -- local map graph edit ----------------------------------------------------------------------------------------

def test_local_map_copy_cached_and_reused(tmp_path, tiny_files):
    folder = make_pack(tmp_path, "p", tiny_files)
    path = local_map_model_path(folder / REC_FILE)
    assert path.parent == folder / ".instantfamily_cache" and path.name.startswith("w600k_tiny-")
    outs = [(o.name, [d.dim_value or d.dim_param for d in o.type.tensor_type.shape.dim])
            for o in onnx.load(str(path)).graph.output]
    assert outs[0] == ("embedding", ["N", 512]) and outs[1][1][1:] == [512, 7, 7]
    mtime = path.stat().st_mtime_ns
    assert local_map_model_path(folder / REC_FILE) == path and path.stat().st_mtime_ns == mtime
    assert list_packs(tmp_path) == ["p"] and resolve_pack(tmp_path, "p").roles.keys() == {DET_FILE, REC_FILE}


def test_local_map_falls_back_to_user_cache(tmp_path, tiny_files, monkeypatch):
    folder = make_pack(tmp_path, "p", tiny_files)
    monkeypatch.setenv("INSTANTFAMILY_CACHE", str(tmp_path / "usercache"))
    real = localmap_mod._writable_dir
    monkeypatch.setattr(localmap_mod, "_writable_dir", lambda d: False if d.parent == folder else real(d))
    path = local_map_model_path(folder / REC_FILE)
    assert path.parent == tmp_path / "usercache" and path.is_file()
    assert not (folder / ".instantfamily_cache").exists()


def test_local_map_walks_back_from_1x1(tmp_path):
    """MobileFaceNet-style head: 7×7 depthwise 'GDC' → 1×1 → BN → Flatten: the 7×7 tensor is the map."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 16, stride=16), torch.nn.Conv2d(64, 64, 7, groups=64),
                              torch.nn.BatchNorm2d(64), torch.nn.Flatten(1), torch.nn.Linear(64, 128)).eval()
    path = tmp_path / "mbf.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(net, (torch.zeros(1, 3, 112, 112),), str(path), opset_version=17, dynamo=False)
    name, dims = find_local_map(onnx.load(str(path)))
    assert dims == (1, 64, 7, 7)


def test_local_map_without_flatten_is_a_typed_error(tmp_path):
    path = tmp_path / "noflat.onnx"
    _identity_model(path, 1, hw=112)
    with pytest.raises(ModelFileError, match="no Flatten"):
        find_local_map(onnx.load(str(path)))


def test_rebuilt_recognizer_gets_new_copy(tmp_path, tiny_files):
    folder = make_pack(tmp_path, "p", tiny_files)
    first = local_map_model_path(folder / REC_FILE)
    write_tiny_recognizer(folder / REC_FILE, seed=1)  # different weights -> different hash
    second = local_map_model_path(folder / REC_FILE)
    assert first != second and second.is_file()
    assert second.name == f"w600k_tiny-{localmap_mod.file_sha256(folder / REC_FILE)[:16]}.localmap.onnx"
