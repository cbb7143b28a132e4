"""Count onnxruntime runs: which session ran, on how many rows, and whether inside a face detector's ``detect``.

Used by the one-recognizer-pass test and ``benchmarks/bench_faces.py``. Every ``onnxruntime.InferenceSession.run``
is recorded (insightface's sessions subclass ``InferenceSession``). insightface 2.x's detector may keep one session
per input size, so detector runs are told apart by *when* they happen (inside ``detector.detect``), not by session.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class OnnxRun:
    session: object
    rows: int  # first dimension of the first input (the batch)
    in_detector: bool


@contextmanager
def onnx_runs(detector=None):
    """Record runs into the yielded list until the block ends. ``detector``: an object whose ``detect`` calls mark
    their runs ``in_detector`` (e.g. ``FaceAnalysis.det_model``); its ``detect`` is wrapped on the instance."""
    import onnxruntime

    runs: list[OnnxRun] = []
    depth = [0]
    cls = onnxruntime.InferenceSession
    own_run = cls.__dict__.get("run")  # None: inherited from onnxruntime's Session base class
    real_run = cls.run

    def run(sess, output_names, input_feed, *a, **k):
        first = next(iter(input_feed.values()), None)
        runs.append(OnnxRun(sess, len(first) if first is not None else 0, depth[0] > 0))
        return real_run(sess, output_names, input_feed, *a, **k)

    patched_detect = detector is not None and "detect" not in vars(detector)
    if detector is not None:
        real_detect = detector.detect

        def detect(*a, **k):
            depth[0] += 1
            try:
                return real_detect(*a, **k)
            finally:
                depth[0] -= 1

        detector.detect = detect
    cls.run = run
    try:
        yield runs
    finally:
        if own_run is None:
            del cls.run
        else:
            cls.run = own_run
        if detector is not None:
            if patched_detect:
                del detector.detect
            else:
                detector.detect = real_detect


def outside_detector(runs, session=None) -> list[int]:
    """Row counts of the runs outside the detector (of ``session`` only, when given)."""
    return [r.rows for r in runs if not r.in_detector and (session is None or r.session is session)]
