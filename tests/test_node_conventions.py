"""Every node of the pack follows ComfyUI core's conventions (V1 API), checked on the classes the real host
registered: a tooltip on every input, one OUTPUT_TOOLTIPS entry per output, CATEGORY and DESCRIPTION set, and
image sizes bounded by the host's own ``nodes.MAX_RESOLUTION``."""

from __future__ import annotations

import sys

import pytest

from tools.devkit.comfy_host import HOW_TO_PROVIDE, find_comfyui

pytestmark = pytest.mark.skipif(find_comfyui() is None, reason=HOW_TO_PROVIDE)


@pytest.fixture(scope="module")
def host():
    from tools.devkit.comfy_host import import_host, load_pack
    nodes = import_host()
    return nodes, load_pack()


def _inputs(cls):
    spec = cls.INPUT_TYPES()
    for section in ("required", "optional"):
        for name, entry in (spec.get(section) or {}).items():
            yield section, name, entry


def test_pack_registers_nodes(host):
    nodes, pack = host
    assert len(pack.NODE_CLASS_MAPPINGS) >= 12
    for key, cls in pack.NODE_CLASS_MAPPINGS.items():
        assert nodes.NODE_CLASS_MAPPINGS[key] is cls
        assert nodes.NODE_DISPLAY_NAME_MAPPINGS[key] == pack.NODE_DISPLAY_NAME_MAPPINGS[key]


def test_every_input_has_a_tooltip(host):
    _, pack = host
    missing = []
    for key, cls in pack.NODE_CLASS_MAPPINGS.items():
        for section, name, entry in _inputs(cls):
            opts = entry[1] if len(entry) > 1 else {}
            tip = opts.get("tooltip") if isinstance(opts, dict) else None
            if not (isinstance(tip, str) and tip.strip()):
                missing.append(f"{key}.{section}.{name}")
    assert not missing, f"inputs without a tooltip: {missing}"


def test_every_output_has_a_tooltip_and_nodes_are_described(host):
    _, pack = host
    for key, cls in pack.NODE_CLASS_MAPPINGS.items():
        tips = getattr(cls, "OUTPUT_TOOLTIPS", None)
        assert isinstance(tips, tuple), f"{key}: OUTPUT_TOOLTIPS must be a tuple, got {tips!r}"
        assert len(tips) == len(cls.RETURN_TYPES), \
            f"{key}: {len(tips)} output tooltips for {len(cls.RETURN_TYPES)} outputs"
        assert all(isinstance(t, str) and t.strip() for t in tips), f"{key}: empty output tooltip in {tips!r}"
        if hasattr(cls, "RETURN_NAMES"):
            assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES), key
        assert cls.CATEGORY == "InstantFamily", key
        assert isinstance(cls.DESCRIPTION, str) and len(cls.DESCRIPTION) > 20, key
        assert callable(getattr(cls, cls.FUNCTION)), key


def test_sizes_use_the_hosts_max_resolution(host):
    nodes, pack = host
    cls = pack.NODE_CLASS_MAPPINGS["InstantFamilyPoseToMasks"]
    required = cls.INPUT_TYPES()["required"]
    for name in ("width", "height"):
        assert required[name][1]["max"] == nodes.MAX_RESOLUTION, name
    assert sys.modules["nodes"] is nodes  # the module the pack imported MAX_RESOLUTION from is ComfyUI's


def test_pose_from_image_display_name_names_no_single_method(host):
    _, pack = host
    name = pack.NODE_DISPLAY_NAME_MAPPINGS["InstantFamilyPoseFromImage"]
    assert name == "InstantFamily Pose from Image"
    methods = pack.NODE_CLASS_MAPPINGS["InstantFamilyPoseFromImage"].INPUT_TYPES()["required"]["method"][0]
    assert any("openpose" in m for m in methods) and any("faces" in m for m in methods)


@pytest.fixture
def progress(host):
    """Records ComfyUI ProgressBar updates (value, total) through the host's global hook."""
    import comfy.utils
    seen = []
    old = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: seen.append((value, total)))
    yield seen
    comfy.utils.set_progress_bar_global_hook(old)


@pytest.fixture
def interrupted(host):
    import comfy.model_management as mm
    mm.interrupt_current_processing(True)
    yield mm.InterruptProcessingException
    mm.interrupt_current_processing(False)


def _pose_nodes(pack, monkeypatch, people=1):
    from support.controlnet_aux_shapes import FakeOpenposeDetector, pose_result
    pn = sys.modules[f"{pack.__name__}.nodes.pose_nodes"]
    fake = FakeOpenposeDetector([pose_result({0: (60, 50), 1: (60, 90), 14: (55, 45), 15: (65, 45)}, None, 128, 128)
                                 for _ in range(people)])
    monkeypatch.setattr(pn, "_openpose_detector", lambda: fake)
    return pn, fake


def test_pose_from_image_reports_progress_per_image(host, monkeypatch, progress):
    import torch
    _, pack = host
    pn, fake = _pose_nodes(pack, monkeypatch)
    (frames,) = pn.PoseFromImage().detect(torch.zeros(3, 128, 128, 3), pn.OPENPOSE_METHOD, False)
    assert len(frames) == len(fake.images) == 3
    assert progress == [(1, 3), (2, 3), (3, 3)]


def test_pose_from_image_stops_when_interrupted(host, monkeypatch, interrupted):
    import torch
    _, pack = host
    pn, fake = _pose_nodes(pack, monkeypatch)
    with pytest.raises(interrupted):
        pn.PoseFromImage().detect(torch.zeros(3, 128, 128, 3), pn.OPENPOSE_METHOD, False)
    assert fake.images == []  # checked before the first image


def test_encode_identity_reports_progress_and_stops_when_interrupted(host, tmp_path_factory, progress):
    import comfy.model_management as mm
    import torch
    from instantfamily_core.faces import FaceAnalyzer
    from tools.devkit.face_models import draw_faces, session_tiny_root
    _, pack = host
    fn = sys.modules[f"{pack.__name__}.nodes.face_nodes"]
    fa = FaceAnalyzer(session_tiny_root(tmp_path_factory), "tinypack", provider="CPU", det_size=256)
    img = torch.from_numpy(draw_faces((256, 256), [(128, 128)], [(0, 200, 0)])).float().div(255)
    (ids,) = fn.EncodeIdentity().encode(fa, torch.stack([img, img]), "a", "error")
    assert len(ids) == 1 and ids[0].num_images == 2
    assert progress == [(1, 2), (2, 2)]
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            fn.EncodeIdentity().encode(fa, torch.stack([img, img]), "a", "error")
    finally:
        mm.interrupt_current_processing(False)
    assert progress == [(1, 2), (2, 2)]  # no image was encoded after the interrupt


def test_apply_faceid_reports_progress_per_identity_and_stops_when_interrupted(host, tmp_path, progress):
    import comfy.model_management as mm
    import torch
    from support import faceid_files as ff
    from tools.devkit.identities import random_identities
    _, pack = host
    fn = sys.modules[f"{pack.__name__}.nodes.faceid_nodes"]
    path = tmp_path / "ip-adapter-faceid_sd15.bin"
    ff.write_bin(path, ff.faceid_parts("faceid"))
    faceid = fn.load_faceid_model(str(path), "auto (file name)", fn.EMBEDDED_LORA)
    model = ff.meta_sd15()
    masks = torch.zeros(2, 64, 64)
    masks[0, :, :32] = 1
    masks[1, :, 32:] = 1
    args = (model, faceid, random_identities(2, 0, face_pack="buffalo_l"), masks, 1.0, "", 0.0, 0.0, 1.0, 1.0)
    fn.ApplyFaceID().apply(*args)
    assert progress == [(1, 2), (2, 2)]
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            fn.ApplyFaceID().apply(*args)
    finally:
        mm.interrupt_current_processing(False)
    assert progress == [(1, 2), (2, 2)]
