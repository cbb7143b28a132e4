"""Pose from Image inside the real ComfyUI host, in-process: the `openpose` method with controlnet-aux-shaped
results (its package and weights cannot be installed here), the `faces` method with the tiny face pack."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from instantfamily_core.pose import face_box, parse_pose
from tools.devkit.comfy_host import HOW_TO_PROVIDE, find_comfyui
from support.controlnet_aux_shapes import FakeOpenposeDetector, face_points, pose_result
from tools.devkit.face_models import draw_faces, session_tiny_root
from tools.devkit.identities import random_identities

pytestmark = pytest.mark.skipif(find_comfyui() is None, reason=HOW_TO_PROVIDE)


@pytest.fixture(scope="module")
def pose_nodes():
    from tools.devkit.comfy_host import import_host, load_pack
    import_host()
    pack = load_pack()
    return sys.modules[f"{pack.__name__}.nodes.pose_nodes"]


def test_openpose_method_hands_rgb_over_and_drops_missing_markers(pose_nodes, monkeypatch):
    w, h = 320, 256
    pts = face_points(160, 120, 60, 76)
    marked = [None if k in (0, 16, 30) else p for k, p in enumerate(pts)]  # three unplaced points: −1 markers
    body = {0: (160, 120), 1: (160, 190), 14: (148, 112), 15: (172, 112), 16: (130, 120), 17: (190, 120)}
    fake = FakeOpenposeDetector([pose_result(body, marked, w, h)])
    monkeypatch.setattr(pose_nodes, "_openpose_detector", lambda: fake)
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[..., 0] = 220  # a red image: detect_poses must receive it as RGB (it converts to BGR itself)
    (frames,) = pose_nodes.PoseFromImage().detect(torch.from_numpy(rgb).float().div(255)[None],
                                                  pose_nodes.OPENPOSE_METHOD, True)
    assert np.array_equal(fake.images[0], rgb)
    frame = parse_pose(frames)
    person = frame.people[0]
    assert (person.face[[0, 16, 30], 2] == 0).all() and (person.face[:, 2] > 0).sum() == 67
    x1, y1, x2, y2 = face_box(person)
    assert 120 < x1 < 160 < x2 < 200 and 60 < y1 < 120 < y2 < 170  # on the face, not stretched to (0, 0)
    (no_face,) = pose_nodes.PoseFromImage().detect(torch.from_numpy(rgb).float().div(255)[None],
                                                   pose_nodes.OPENPOSE_METHOD, False)
    assert no_face[0]["people"][0]["face_keypoints_2d"] is None


def test_faces_method_masks_are_the_detector_box_plus_25_percent(pose_nodes, tmp_path_factory):
    from instantfamily_core.faces import FaceAnalyzer
    fa = FaceAnalyzer(session_tiny_root(tmp_path_factory), "tinypack", provider="CPU", det_size=256)
    img = draw_faces((256, 256), [(64, 96), (192, 128)], [(0, 200, 0), (0, 0, 200)])
    (frames,) = pose_nodes.PoseFromImage().detect(torch.from_numpy(img).float().div(255)[None],
                                                  pose_nodes.FACES_METHOD, True, face_analysis=fa)
    boxes = [p["face_box_2d"] for p in frames[0]["people"]]
    np.testing.assert_allclose(boxes, [[16, 48, 112, 144], [144, 80, 240, 176]], atol=1.0)  # the 96-px faces
    _, masks, _ = pose_nodes.PoseToMasks().run(random_identities(2), "none (use pose_keypoint)", 256, 256, 0.25,
                                               "auto", pose_keypoint=frames)
    for m, (x1, y1, x2, y2) in zip(masks, boxes):
        ys, xs = torch.nonzero(m, as_tuple=True)
        assert xs.max() - xs.min() + 1 == pytest.approx(1.25 * (x2 - x1), abs=2)
        assert ys.max() - ys.min() + 1 == pytest.approx(1.25 * (y2 - y1), abs=2)
