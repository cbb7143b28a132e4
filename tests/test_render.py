"""Control image and preview drawing."""

import numpy as np

from instantfamily_core.pose import assign_slots, parse_pose
from instantfamily_core.render import SLOT_PALETTE, draw_control_image, draw_preview, draw_skeletons, slot_color
from support.poses import frame, person


def test_control_image_has_skeletons_and_slot_circles_in_palette_colours():
    f = parse_pose(frame([person(100, 150, s=30), person(300, 150, s=30), person(450, 150, s=30)]))
    slots = assign_slots(f, 2)
    img = draw_control_image(slots)
    assert img.shape == (512, 512, 3) and img.dtype == np.uint8
    for n, (cx, cy) in enumerate(slots.centres()):
        assert tuple(img[int(cy), int(cx)]) == slot_color(n)
    # the third person has a skeleton but no circle
    third = draw_skeletons(f)[150, 450]
    assert tuple(img[150, 450]) == tuple(third) and tuple(third) not in SLOT_PALETTE
    assert (img[400:] == 0).all()  # nothing drawn below the bodies


def test_skeleton_uses_standard_limb_colours():
    f = parse_pose(frame([person(200, 100, s=30)]))
    img = draw_skeletons(f)
    # the neck joint is drawn in OpenPose colour 1 (255, 85, 0)
    assert tuple(img[160, 200]) == (255, 85, 0)


def test_slot_colours_are_distinct_for_many_slots():
    cols = [slot_color(n) for n in range(32)]
    assert len(set(cols)) == 32


def test_preview_tints_masks():
    f = parse_pose(frame([person(100, 150, s=30), person(300, 150, s=30)]))
    slots = assign_slots(f, 2)
    ctrl = draw_control_image(slots)
    prev = draw_preview(ctrl, slots)
    assert prev.shape == ctrl.shape
    x1, y1, x2, y2 = (int(v) for v in slots.mask_boxes[0])
    assert (prev[y1 + 3, x1 + 3] != ctrl[y1 + 3, x1 + 3]).any()
    assert (prev[500, 500] == ctrl[500, 500]).all()
