"""Public-weights mode, control image: Pose to Masks can draw the plain OpenPose rendering the public OpenPose
ControlNet was trained on — skeletons and face landmarks as white dots (radius 3), no identity slot circles."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from instantfamily_core.pose import parse_pose
from instantfamily_core.render import draw_openpose_image, draw_skeletons
from tools.devkit.comfy_host import HOW_TO_PROVIDE, find_comfyui
from tools.devkit.identities import random_identities
from support.poses import frame, person


def _face_points(cx, cy):
    pts = [(cx - 12 + 4 * i, cy + 6, 1.0) for i in range(7)] + [(cx - 6, cy - 4, 1.0), (cx + 6, cy - 4, 1.0)]
    pts += [(0.0, 0.0, 0.0)] * (70 - len(pts))  # missing points stay undrawn
    return [v for p in pts for v in p]


def test_openpose_rendering_is_skeleton_plus_white_face_dots_only():
    pose = frame([person(64, 60, s=20, face=_face_points(64, 60)), person(190, 60, s=20)], w=256, h=256)
    f = parse_pose(pose)
    img = draw_openpose_image(f)
    skel = draw_skeletons(f)
    yy, xx = np.mgrid[0:256, 0:256]
    dots = np.zeros((256, 256), bool)
    for x, y, c in f.people[0].face:
        if c > 0:
            dots |= (xx - int(x)) ** 2 + (yy - int(y)) ** 2 <= 3 ** 2
    assert (img[dots] == 255).all()
    np.testing.assert_array_equal(img[~dots], skel[~dots])  # nothing else: no slot circles
    assert dots.sum() > 9 * 20
    np.testing.assert_array_equal(draw_openpose_image(f, face_points=False), skel)


@pytest.mark.skipif(find_comfyui() is None, reason=HOW_TO_PROVIDE)
def test_pose_to_masks_offers_both_control_styles():
    from tools.devkit.comfy_host import load_pack
    pack = load_pack()
    pn = sys.modules[f"{pack.__name__}.nodes.pose_nodes"]
    ids = random_identities(2)
    pose = frame([person(64, 60, s=20, face=_face_points(64, 60)), person(190, 60, s=20)], w=256, h=256)
    node = pn.PoseToMasks()
    circles, masks, _ = node.run(ids, pn.NO_TEMPLATE, 256, 256, 0.25, "auto", pose_keypoint=pose)
    default, _, _ = node.run(ids, pn.NO_TEMPLATE, 256, 256, 0.25, "auto", pose_keypoint=pose,
                             control_image=pn.CONTROL_STYLES[0])
    plain, masks2, _ = node.run(ids, pn.NO_TEMPLATE, 256, 256, 0.25, "auto", pose_keypoint=pose,
                                control_image=pn.CONTROL_STYLES[1])
    assert (circles == default).all() and (masks == masks2).all()
    want = draw_openpose_image(parse_pose(pose).scaled(256, 256))
    np.testing.assert_array_equal((plain[0].numpy() * 255).round().astype(np.uint8), want)
    assert not (circles == plain).all()
    with pytest.raises(Exception, match="control_image"):
        node.run(ids, pn.NO_TEMPLATE, 256, 256, 0.25, "auto", pose_keypoint=pose, control_image="circles")
