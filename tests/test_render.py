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


def test_skeleton_widths_and_joints_grow_with_the_canvas_beyond_512_px():
    """At 512 px the classic OpenPose sizes (joint discs of radius 4); on SDXL canvases the pose scaled ×2 is drawn
    as the 512-px picture scaled ×2 (what the annotators do: draw at 512, resize), within a pixel's rounding."""
    import cv2

    from instantfamily_core.render import draw_openpose_image
    small = parse_pose(frame([person(200, 150, s=40)]))
    big = small.scaled(1024, 1024)
    assert (big.width, big.height) == (1024, 1024)
    a, b = draw_skeletons(small), draw_skeletons(big)
    up = cv2.resize(a, (1024, 1024), interpolation=cv2.INTER_NEAREST)
    drawn_a, drawn_b = (a.any(-1)).sum(), (b.any(-1)).sum()
    assert 3.6 < drawn_b / drawn_a < 4.4  # area ×4: widths and radii ×2, lengths ×2
    assert ((up.any(-1)) != (b.any(-1))).mean() < 0.01
    neck = np.argwhere((a == (255, 85, 0)).all(-1))  # the neck disc: radius 4 at 512 px
    assert 45 <= len(neck) <= 60
    face = [v for i in range(70) for v in (180 + (i % 10) * 4, 140 + (i // 10) * 4, 1.0)]
    dots = [draw_openpose_image(f).all(-1).sum() for f in (parse_pose(frame([person(200, 150, s=40, face=face)])),
                                                          parse_pose(frame([person(200, 150, s=40, face=face)]))
                                                          .scaled(1024, 1024))]
    assert 3.0 < dots[1] / dots[0] < 5.0  # white face dots: radius 3 → 6
    wide = parse_pose(frame([person(200, 150, s=40)], w=512, h=512)).scaled(1216, 832)
    assert draw_skeletons(wide).shape == (832, 1216, 3)


def test_far_off_keypoints_draw_without_overflowing_opencv():
    """Keypoints far outside the canvas (beyond OpenCV's int32) draw nothing there instead of raising; found by the
    POSE_KEYPOINT fuzz (a y of 4294966596)."""
    from instantfamily_core.render import draw_openpose_image
    p = person(30, 20, s=5)
    p["pose_keypoints_2d"][13 * 3 + 1] = 4294966596.0
    p["pose_keypoints_2d"][12 * 3] = -1e12
    f = parse_pose(frame([p], w=64, h=64))
    slots = assign_slots(f, 1)
    control = draw_control_image(slots)
    assert control.shape == (64, 64, 3) and control.any()
    assert draw_preview(control, slots).shape == (64, 64, 3) and draw_openpose_image(f).any()
