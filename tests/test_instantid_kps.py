"""InstantID keypoint images (instantfamily_core/kps.py): the draw_kps rule, N faces on one canvas, the size rule,
the five points from OpenPose faces and their slot order."""

import math

import cv2
import numpy as np
import pytest

from instantfamily_core.errors import IdentityCountError, PoseError
from instantfamily_core.kps import (KPS_COLORS, draw_kps_canvas, draw_kps_image, five_points_from_body,
                                    five_points_from_openpose_face, kps_draw_sizes, kps_for_slots)
from instantfamily_core.pose import assign_slots, parse_pose, pose_from_faces
from support.poses import frame, person

RED, GREEN, BLUE, YELLOW, MAGENTA = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255)


def rule(height, width, kps, stickwidth=4, radius=10):
    """InstantID's draw_kps, written out from its description (notes/sdxl-weights.md §1.4): float layer of limbs
    (every point to the nose, colour of the first point), times 0.6 into uint8, then discs in full colour."""
    colors = [RED, GREEN, BLUE, YELLOW, MAGENTA]
    kps = np.asarray(kps, dtype=np.float64)
    layer = np.zeros([height, width, 3])
    for first, second in [[0, 2], [1, 2], [3, 2], [4, 2]]:
        x = kps[[first, second], 0]
        y = kps[[first, second], 1]
        length = ((x[0] - x[1]) ** 2 + (y[0] - y[1]) ** 2) ** 0.5
        angle = math.degrees(math.atan2(y[0] - y[1], x[0] - x[1]))
        polygon = cv2.ellipse2Poly((int(np.mean(x)), int(np.mean(y))), (int(length / 2), stickwidth), int(angle),
                                   0, 360, 1)
        layer = cv2.fillConvexPoly(layer.copy(), polygon, colors[first])
    out = (layer * 0.6).astype(np.uint8)
    for k, (x, y) in enumerate(kps):
        out = cv2.circle(out.copy(), (int(x), int(y)), radius, colors[k], -1)
    return out


# Frontal faces with fractional coordinates and tilts whose angles are not whole degrees (int() truncation and the
# direction of atan2 both matter for these).
FACE_A = [[400.7, 380.2], [620.3, 395.9], [515.5, 520.4], [430.1, 640.8], [600.6, 650.2]]
FACE_B = [[180.4, 210.9], [282.8, 171.3], [247.6, 260.2], [233.9, 333.7], [321.2, 301.5]]  # tilted, smaller


@pytest.mark.parametrize("kps", [FACE_A, FACE_B])
def test_one_face_at_reference_size_equals_draw_kps_rule(kps):
    got = draw_kps_canvas(1024, 1024, [kps])
    want = rule(1024, 1024, kps)
    assert got.dtype == np.uint8 and got.shape == (1024, 1024, 3)
    assert (want > 0).any(axis=2).sum() > 2000
    assert np.array_equal(got, want), f"{int((got != want).any(axis=2).sum())} pixels differ"


def test_disc_colours_and_limb_shading():
    img = draw_kps_canvas(1024, 1024, [FACE_A])
    for k, (x, y) in enumerate(FACE_A):
        assert tuple(img[int(y), int(x)]) == KPS_COLORS[k] == [RED, GREEN, BLUE, YELLOW, MAGENTA][k]
    # the middle of limb (a, nose) is 0.6 × the colour of a (255 → 153), well away from every disc
    for a, shade in [(0, (153, 0, 0)), (1, (0, 153, 0)), (3, (153, 153, 0)), (4, (153, 0, 153))]:
        mx, my = (FACE_A[a][0] + FACE_A[2][0]) / 2, (FACE_A[a][1] + FACE_A[2][1]) / 2
        assert tuple(img[int(my), int(mx)]) == shade, a
    assert (img[:300] == 0).all() and (img[750:] == 0).all()  # nothing away from the face


def test_two_faces_on_one_canvas_are_each_faces_drawing():
    far = (np.asarray(FACE_B) + [500, 500]).tolist()
    a, b = draw_kps_canvas(1024, 1024, [FACE_B]), draw_kps_canvas(1024, 1024, [far])
    both = draw_kps_canvas(1024, 1024, [FACE_B, None, far])
    in_a, in_b = a.any(axis=2), b.any(axis=2)
    assert in_a.any() and in_b.any() and not (in_a & in_b).any()
    assert np.array_equal(both[in_a], a[in_a]) and np.array_equal(both[in_b], b[in_b])
    assert (both[~(in_a | in_b)] == 0).all()
    assert np.array_equal(draw_kps_canvas(64, 64, [None, None]), np.zeros((64, 64, 3), np.uint8))


def test_discs_of_every_face_lie_over_the_limbs_of_every_face():
    # the other face's kp0 sits on the middle of FACE_A's limb (kp4, nose): all discs are drawn after all limbs,
    # so it shows in full colour whichever face comes first
    mid = [(FACE_A[4][0] + FACE_A[2][0]) / 2, (FACE_A[4][1] + FACE_A[2][1]) / 2]
    other = (np.asarray(FACE_A) + np.subtract(mid, FACE_A[0])).tolist()
    for faces in ([FACE_A, other], [other, FACE_A]):
        img = draw_kps_canvas(1024, 1024, faces)
        assert tuple(img[int(mid[1]), int(mid[0])]) == RED
    assert tuple(draw_kps_canvas(1024, 1024, [FACE_A])[int(mid[1]), int(mid[0])]) == (153, 0, 153)


@pytest.mark.parametrize("side,stick,radius", [(512, 2, 5), (1024, 4, 10), (2048, 8, 20)])
def test_size_rule_scales_with_the_canvas(side, stick, radius):
    assert kps_draw_sizes(side, side) == (stick, radius)
    kps = (np.asarray(FACE_A) * side / 1024).tolist()
    got, want = draw_kps_canvas(side, side, [kps]), rule(side, side, kps, stick, radius)
    assert np.array_equal(got, want), f"{int((got != want).any(axis=2).sum())} pixels differ"
    # the disc really has that radius: a pixel just inside is red, one just outside is not
    x, y = int(kps[0][0]), int(kps[0][1])
    assert tuple(got[y, x - radius]) == RED and tuple(got[y, x - radius - 1]) != RED


def test_size_rule_keeps_reference_sizes_on_sdxl_resolutions_and_never_drops_below_one_pixel():
    for h, w in [(1024, 1024), (1152, 896), (1216, 832), (1344, 768), (1536, 640)]:
        assert kps_draw_sizes(h, w) == (4, 10) == kps_draw_sizes(w, h)
    assert kps_draw_sizes(768, 768) == (3, 8) and kps_draw_sizes(640, 640) == (3, 6)  # 7.5 → 8, 2.5 → 3: half up
    assert kps_draw_sizes(16, 16) == (1, 1) and kps_draw_sizes(1, 1) == (1, 1)
    assert draw_kps_canvas(8, 8, [[[1, 1], [6, 1], [4, 4], [2, 6], [6, 6]]]).any()


def synthetic_face(dx=0.0, dy=0.0, pupils=True, conf=1.0):
    """70 OpenPose face points (x, y, c) of a frontal face: the subject's right eye (36–41, pupil 68) on the
    image's left, nose tip 30, mouth corners 48 (image left) and 54; other landmarks spread over the face."""
    f = np.zeros((70, 3))
    for i in range(17):  # jaw
        t = math.pi * i / 16
        f[i] = (240 - 70 * math.cos(t), 300 + 90 * math.sin(t), conf)
    for i in range(17, 27):
        f[i] = (180 + 12 * (i - 17) + (12 if i >= 22 else 0), 270, conf)
    for i in range(27, 36):
        f[i] = (240 + 3 * (i - 31), 300 + 5 * (i - 27), conf)
    for c, start in [(205.0, 36), (275.0, 42)]:  # eye contours around (205, 300) and (275, 300)
        for j, (ox, oy) in enumerate([(-10, 0), (-4, -4), (4, -4), (10, 0), (4, 4), (-4, 4)]):
            f[start + j] = (c + ox, 300 + oy, conf)
    for i in range(48, 68):
        f[i] = (240 + 20 * math.cos(2 * math.pi * (i - 48) / 20 + math.pi), 380, conf)
    f[30] = (240, 345, conf)
    f[48] = (215, 381, conf)
    f[54] = (265, 379, conf)
    f[68] = (206, 301, conf if pupils else 0.0)
    f[69] = (274, 299, conf if pupils else 0.0)
    f[:, 0] += dx
    f[:, 1] += dy
    return f


def test_five_points_from_openpose_face_keep_left_and_right():
    five = five_points_from_openpose_face(synthetic_face())
    assert np.allclose(five, [[206, 301], [274, 299], [240, 345], [215, 381], [265, 379]])
    assert five[0, 0] < five[1, 0] and five[3, 0] < five[4, 0]  # kp0, kp3 at the smaller x, as insightface's
    # without pupils (unconfident, or a 68-point DWPose face): the eye contours' means
    no_pupils = five_points_from_openpose_face(synthetic_face(pupils=False))
    assert np.allclose(no_pupils[:2], [[205, 300], [275, 300]]) and np.allclose(no_pupils[2:], five[2:])
    assert np.allclose(five_points_from_openpose_face(synthetic_face()[:68]), no_pupils)
    assert np.allclose(five_points_from_openpose_face(synthetic_face().reshape(-1).tolist()), five)


@pytest.mark.parametrize("missing", [[30], [48], [54], [68, 36, 37, 38, 39], [69, 42, 43, 44, 45]])
def test_five_points_need_every_point(missing):
    f = synthetic_face()
    f[missing, 2] = 0.0
    assert five_points_from_openpose_face(f) is None
    assert five_points_from_openpose_face(synthetic_face()[:60]) is None
    assert five_points_from_openpose_face(None) is None


def test_eye_from_half_of_its_contour():
    f = synthetic_face(pupils=False)
    f[[36, 37, 38], 2] = 0.0  # 39, 40, 41 left: their mean
    assert np.allclose(five_points_from_openpose_face(f)[0], f[[39, 40, 41], :2].mean(axis=0))


def test_person_without_face_points_gets_none():
    f = parse_pose(frame([person(100, 200, s=40), person(300, 200, s=40)]))
    assert five_points_from_body(f.people[0].body) is None
    slots = assign_slots(f, 2)
    assert kps_for_slots(slots) == [None, None]
    assert not draw_kps_image(slots).any()


def test_slot_order_follows_identity_order():
    faces = [synthetic_face(dx=dx) for dx in (500.0, 0.0, 250.0)]  # person 0 right, 1 left, 2 middle
    people = [person(240 + dx, 330, s=40, face=fc.reshape(-1).tolist()) for dx, fc in zip((500, 0, 250), faces)]
    f = parse_pose(frame(people, w=1024, h=768))
    expect = [five_points_from_openpose_face(fc) for fc in faces]
    auto = kps_for_slots(assign_slots(f, 3))  # left to right: persons 1, 2, 0
    assert [round(float(k[0, 0])) for k in auto] == [206, 456, 706]
    for got, i in zip(auto, (1, 2, 0)):
        assert np.allclose(got, expect[i])
    ordered = kps_for_slots(assign_slots(f, 3, order=[2, 0, 1]))
    for got, i in zip(ordered, (2, 0, 1)):
        assert np.allclose(got, expect[i])
    skipped = kps_for_slots(assign_slots(f, 3, order=[2, 0, 1], empty=[1]))
    assert skipped[1] is None and np.allclose(skipped[0], expect[2]) and np.allclose(skipped[2], expect[1])
    img = draw_kps_image(assign_slots(f, 3, order=[2, 0, 1], empty=[1]))
    assert np.array_equal(img, draw_kps_canvas(768, 1024, [expect[2], None, expect[1]]))


def test_normalised_pose_and_controlnet_aux_markers():
    fc = synthetic_face()
    fc[68] = (-1.0, -1.0, 1.0)  # controlnet-aux "not found": dropped by parse_pose → the contour mean is used
    norm = fc.copy()
    norm[:, 0] /= 512
    norm[:, 1] /= 512
    norm[68] = (-1 / 512, -1 / 512, 1.0)
    p = person(240 / 512, 330 / 512, s=40 / 512, face=norm.reshape(-1).tolist())
    slots = assign_slots(parse_pose(frame([p])), 1)
    got = kps_for_slots(slots)[0]
    assert np.allclose(got[0], [205, 300]) and np.allclose(got[1], [274, 299]) and np.allclose(got[2], [240, 345])


def test_detected_points_for_poses_built_from_faces():
    det = [((600, 200, 760, 400), [[640, 280], [720, 282], [680, 330], [650, 360], [712, 362]]),
           ((100, 220, 260, 420), [[140, 300], [220, 298], [180, 350], [150, 380], [210, 378]])]
    f = parse_pose(pose_from_faces(det, 1024, 768))
    slots = assign_slots(f, 2, order=[1, 0])  # pose_from_faces puts people left to right: person 1 is det[0]
    per_slot = [det[0][1], det[1][1]]
    auto = kps_for_slots(slots)  # the pose carries each face's own 5 points (face_kps_5), in slot order
    assert all(np.allclose(a, b) for a, b in zip(auto, per_slot))
    got = kps_for_slots(slots, per_slot)
    assert np.allclose(got[0], det[0][1]) and np.allclose(got[1], det[1][1])
    # insightface's own eyes agree with the people's body eyes of the slot's person
    for n, k in enumerate(got):
        body = f.people[slots.person_of_slot[n]].body
        assert np.allclose(k[0], body[14, :2]) and np.allclose(k[1], body[15, :2])
    assert np.allclose(kps_for_slots(slots, [None, det[1][1]])[0], det[0][1])  # None: the person's own points
    with pytest.raises(IdentityCountError):
        kps_for_slots(slots, per_slot[:1])
    with pytest.raises(PoseError):
        kps_for_slots(slots, [[[1, 2]] * 4, None])
    with pytest.raises(PoseError):
        kps_for_slots(slots, [[[1, float("nan")]] * 5, None])
    assert kps_for_slots(assign_slots(f, 2, order=[1, 0], empty=[0]), per_slot)[0] is None


def test_points_far_off_the_canvas_do_not_break_drawing():
    kps = [[20, 20], [40, 20], [30, 30], [22, 40], [1e12, 40]]
    img = draw_kps_canvas(64, 64, [kps])
    assert tuple(img[20, 20]) == RED and tuple(img[40, 22]) == YELLOW
    with pytest.raises(PoseError):
        draw_kps_canvas(64, 64, [[[0, 0]] * 5 + [[1, 1]]])
