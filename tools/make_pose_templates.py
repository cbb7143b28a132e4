"""Writes the bundled pose templates (pose_templates/family_<n>.json, n = 1…8) in the POSE_KEYPOINT shape.

Standing people in a row, adults and children alternating so the templates read as a family; pixel coordinates.
Each person also carries five face keypoints (``face_kps_5``, insightface order: image-left eye, image-right eye,
nose, mouth corners) for InstantID's keypoint image: the body's eyes and nose, and mouth corners placed by the
proportions of insightface's ArcFace 5-point template (half-width 0.41 × the eye distance, 0.45 × the eye distance
below the nose).
Run from the repository root: ``python tools/make_pose_templates.py``.
"""

import json
import os

if not __package__:  # run as a file: python tools/make_pose_templates.py
    import _bootstrap  # noqa: F401  (tools/_bootstrap.py: the repository root first on sys.path)

from instantfamily_core.fileio import write_text_atomic  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(os.path.dirname(HERE), "pose_templates")

# (dx, dy) in units of the head-to-neck distance s, relative to the nose; OpenPose BODY-18 order
STANDING = {0: (0, 0), 1: (0, 1.0), 2: (-0.9, 1.05), 3: (-1.15, 2.0), 4: (-1.2, 2.9), 5: (0.9, 1.05),
            6: (1.15, 2.0), 7: (1.2, 2.9), 8: (-0.5, 3.3), 9: (-0.55, 4.7), 10: (-0.6, 6.0), 11: (0.5, 3.3),
            12: (0.55, 4.7), 13: (0.6, 6.0), 14: (-0.22, -0.15), 15: (0.22, -0.15), 16: (-0.45, -0.05),
            17: (0.45, -0.05)}


EYE_DISTANCE = STANDING[15][0] - STANDING[14][0]
KPS5 = (STANDING[14], STANDING[15], STANDING[0], (-0.41 * EYE_DISTANCE, 0.45 * EYE_DISTANCE),
        (0.41 * EYE_DISTANCE, 0.45 * EYE_DISTANCE))


def person(cx: float, nose_y: float, s: float) -> dict:
    pts = []
    for i in range(18):
        dx, dy = STANDING[i]
        pts += [round(cx + dx * s, 1), round(nose_y + dy * s, 1), 1.0]
    kps = [v for dx, dy in KPS5 for v in (round(cx + dx * s, 1), round(nose_y + dy * s, 1), 1.0)]
    return {"pose_keypoints_2d": pts, "face_keypoints_2d": None, "face_kps_5": kps}


def template(n: int) -> dict:
    height = 512
    width = max(512, 64 * round(150 * n / 64))
    people = []
    for i in range(n):
        child = n > 2 and i % 2 == 1
        s = (46 if child else 62) * min(1.0, 4 / max(n, 4) + 0.25)
        feet = height - 24
        nose_y = feet - 6.1 * s
        cx = (i + 0.5) * width / n
        people.append(person(cx, nose_y, s))
    return {"people": people, "canvas_width": width, "canvas_height": height}


def main() -> None:
    for n in range(1, 9):
        write_text_atomic(os.path.join(OUT, f"family_{n}.json"), json.dumps([template(n)], indent=1) + "\n")


if __name__ == "__main__":
    main()
