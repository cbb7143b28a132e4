"""Pluggable face detector + recognizer back-ends.

``parse_recognizer(spec)`` builds one from the CLI spec:

* ``dlib`` (or ``dlib:mtcnn`` / ``dlib:hog``): dlib's 128-d ResNet descriptor (``face-recognition-models`` +
  ``dlib-bin``, fully offline). Detector: facenet-pytorch MTCNN when installed (``dlib`` picks it), else dlib HOG.
* ``insightface:<root>:<pack>``: the core ``FaceAnalyzer`` (e.g. ``models/insightface`` + ``antelopev2``).
* ``facenet:<weights.pt>``: facenet-pytorch ``InceptionResnetV1`` with a state dict the user supplies (the
  paper's choice, e.g. VGGFace2 weights), MTCNN detection.

Every back-end returns :class:`Face` objects; similarities are cosines in all cases (see ``metrics``).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from PIL import Image

from .errors import RecognizerSpecError

DLIB_HINT = "pip install dlib-bin==20.0.1.post1 face-recognition-models==0.3.0"
FACENET_HINT = "pip install --no-deps facenet-pytorch==2.6.0 (needs torch + torchvision)"


@dataclass
class Face:
    bbox: np.ndarray          # (4,) x1, y1, x2, y2 in image pixels
    score: float              # detector confidence
    embedding: np.ndarray     # (D,) raw recognizer output (not necessarily unit-norm)
    crop: np.ndarray | None = None  # small RGB uint8 thumbnail for the contact sheet


class Recognizer(Protocol):
    name: str

    def faces(self, image_rgb: np.ndarray) -> list[Face]:
        """Detect and embed every face of an ``H×W×3`` uint8 RGB image, sorted left to right."""


def _crop(img: np.ndarray, box, size: int = 112, margin: float = 0.2) -> np.ndarray:
    x1, y1, x2, y2 = box
    mx, my = (x2 - x1) * margin, (y2 - y1) * margin
    h, w = img.shape[:2]
    xa, ya = int(max(0, x1 - mx)), int(max(0, y1 - my))
    xb, yb = int(min(w, x2 + mx)), int(min(h, y2 + my))
    if xb <= xa or yb <= ya:
        return np.zeros((size, size, 3), np.uint8)
    return np.asarray(Image.fromarray(img[ya:yb, xa:xb]).resize((size, size), Image.BILINEAR))


class _MTCNNDetector:
    """facenet-pytorch MTCNN with the stricter thresholds that avoid false positives (see notes)."""

    def __init__(self, min_prob: float = 0.95, **kw):
        try:
            from facenet_pytorch import MTCNN
        except ImportError as e:
            raise RecognizerSpecError(f"facenet-pytorch is not installed ({e}); {FACENET_HINT}") from e
        self.mtcnn = MTCNN(keep_all=True, device="cpu", thresholds=[0.6, 0.7, 0.9], **kw)
        self.min_prob = min_prob

    def detect(self, img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Boxes ``(n, 4)`` and probabilities ``(n,)``, sorted left to right."""
        boxes, probs = self.mtcnn.detect(Image.fromarray(img))
        if boxes is None:
            return np.zeros((0, 4)), np.zeros(0)
        boxes, probs = np.asarray(boxes, dtype=float), np.asarray(probs, dtype=float)
        keep = probs >= self.min_prob
        boxes, probs = boxes[keep], probs[keep]
        order = np.argsort(boxes[:, 0])
        return boxes[order], probs[order]


def dlib_model_dir() -> str:
    """Folder of the ``face-recognition-models`` .dat files, found without importing the (broken) package."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise RecognizerSpecError(f"face-recognition-models is not installed; {DLIB_HINT}")
    return os.path.join(list(spec.submodule_search_locations)[0], "models")


class DlibRecognizer:
    """dlib 5-point alignment + 128-d ResNet descriptor; MTCNN boxes when available, else dlib HOG."""

    def __init__(self, detector: str = "auto"):
        try:
            import dlib
        except ImportError as e:
            raise RecognizerSpecError(f"dlib is not installed ({e}); {DLIB_HINT}") from e
        models = dlib_model_dir()
        self.dlib = dlib
        self.sp = dlib.shape_predictor(os.path.join(models, "shape_predictor_5_face_landmarks.dat"))
        self.rec = dlib.face_recognition_model_v1(os.path.join(models, "dlib_face_recognition_resnet_model_v1.dat"))
        if detector == "auto":
            detector = "mtcnn" if importlib.util.find_spec("facenet_pytorch") else "hog"
        if detector not in ("mtcnn", "hog"):
            raise RecognizerSpecError(f"dlib detector must be 'mtcnn' or 'hog', got {detector!r}")
        self.detector = detector
        self._mtcnn = _MTCNNDetector() if detector == "mtcnn" else None
        self._hog = dlib.get_frontal_face_detector() if detector == "hog" else None
        self.name = f"dlib-resnet128 ({detector})"

    def _boxes(self, img):
        if self._mtcnn is not None:
            return self._mtcnn.detect(img)
        rects, scores, _ = self._hog.run(img, 1, 0.0)
        boxes = np.array([[r.left(), r.top(), r.right(), r.bottom()] for r in rects], float).reshape(-1, 4)
        order = np.argsort(boxes[:, 0])
        return boxes[order], np.asarray(scores, float)[order]

    def faces(self, image_rgb: np.ndarray) -> list[Face]:
        img = np.ascontiguousarray(image_rgb, dtype=np.uint8)
        out = []
        for box, score in zip(*self._boxes(img)):
            rect = self.dlib.rectangle(*[int(round(v)) for v in box])
            shape = self.sp(img, rect)
            emb = np.asarray(self.rec.compute_face_descriptor(img, shape), dtype=np.float64)
            crop = np.asarray(self.dlib.get_face_chip(img, shape, size=112, padding=0.25))
            out.append(Face(np.asarray(box, float), float(score), emb, crop))
        return out


class FaceNetRecognizer:
    """facenet-pytorch ``InceptionResnetV1`` (512-d) with user-supplied weights; MTCNN detection + 160 px crops."""

    def __init__(self, weights: str):
        if not os.path.isfile(weights):
            raise RecognizerSpecError(f"FaceNet weights file not found: {weights!r} (pass facenet:<weights.pt>, "
                                      "a state dict of facenet_pytorch.InceptionResnetV1, e.g. the VGGFace2 one)")
        try:
            import torch
            from facenet_pytorch import InceptionResnetV1
        except ImportError as e:
            raise RecognizerSpecError(f"facenet-pytorch is not installed ({e}); {FACENET_HINT}") from e
        state = torch.load(weights, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        state = {k: v for k, v in state.items() if not k.startswith("logits.")}
        self.model = InceptionResnetV1(pretrained=None, classify=False).eval()
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("logits.")]
        if missing or unexpected:
            raise RecognizerSpecError(f"{weights!r} is not an InceptionResnetV1 state dict "
                                      f"(missing {missing[:3]}…, unexpected {list(unexpected)[:3]}…)")
        self.torch = torch
        self._det = _MTCNNDetector(image_size=160, margin=0)
        self.name = f"facenet ({os.path.basename(weights)})"

    def faces(self, image_rgb: np.ndarray) -> list[Face]:
        img = np.ascontiguousarray(image_rgb, dtype=np.uint8)
        boxes, probs = self._det.detect(img)
        if len(boxes) == 0:
            return []
        crops = self._det.mtcnn.extract(Image.fromarray(img), boxes, None)  # (n, 3, 160, 160), standardised
        with self.torch.no_grad():
            emb = self.model(crops).numpy().astype(np.float64)
        return [Face(b, float(p), e, _crop(img, b)) for b, p, e in zip(boxes, probs, emb)]


class InsightFaceRecognizer:
    """The core ``instantfamily_core.faces.FaceAnalyzer`` (SCRFD + ArcFace global embedding)."""

    def __init__(self, root: str, pack: str, provider: str = "auto", det_size: int = 640):
        try:
            from instantfamily_core.faces import FaceAnalyzer
        except ImportError as e:
            raise RecognizerSpecError(f"the insightface back-end is unavailable ({e}); "
                                      "pip install insightface onnxruntime") from e
        self.analyzer = FaceAnalyzer(root, pack, provider, det_size)
        self.name = f"insightface ({pack})"

    def faces(self, image_rgb: np.ndarray) -> list[Face]:
        found = self.analyzer.detect(np.ascontiguousarray(image_rgb, dtype=np.uint8), "generated")
        out = []
        for f in found:
            box = np.asarray(f.bbox, float)
            crop = getattr(f, "crop", None)
            crop = np.asarray(crop, np.uint8) if crop is not None and np.asarray(crop).ndim == 3 else _crop(image_rgb, box)
            out.append(Face(box, float(f.det_score), np.asarray(f.global_embedding, np.float64), crop))
        return sorted(out, key=lambda f: f.bbox[0])


def parse_recognizer(spec: str) -> Recognizer:
    """Build a recognizer from ``dlib[:mtcnn|:hog]``, ``insightface:<root>:<pack>`` or ``facenet:<weights.pt>``."""
    kind, _, rest = spec.partition(":")
    if kind == "dlib":
        return DlibRecognizer(rest or "auto")
    if kind == "facenet":
        if not rest:
            raise RecognizerSpecError("facenet needs a weights file: --recognizer facenet:<weights.pt>")
        return FaceNetRecognizer(rest)
    if kind == "insightface":
        root, sep, pack = rest.rpartition(":")
        if not sep or not root or not pack:
            raise RecognizerSpecError(f"insightface spec must be insightface:<root>:<pack>, got {spec!r}")
        return InsightFaceRecognizer(root, pack)
    raise RecognizerSpecError(f"unknown recognizer {spec!r}; use dlib, insightface:<root>:<pack> or "
                              "facenet:<weights.pt>")
