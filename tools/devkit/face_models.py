"""Tiny, deterministic stand-ins for an insightface model pack, generated at test time.

No real face weights can be obtained offline, so tests that go through the *real* ``insightface.app.FaceAnalysis``
use two small ONNX models that satisfy insightface's routing and decoding contracts (0.7.3 and 2.x alike):

``det_tiny.onnx`` — a detector in the SCRFD ``_bnkps`` layout
    input ``input.1`` ``[1, 3, H, W]`` (H, W dynamic, multiples of 32, normalised ``(x - 127.5) / 128`` RGB);
    9 two-dimensional outputs ``score_{8,16,32}`` ``(N_s, 1)``, ``bbox_{8,16,32}`` ``(N_s, 4)``,
    ``kps_{8,16,32}`` ``(N_s, 10)`` with 2 anchors per location. It "detects" **pure-red squares of
    ``FACE_SIZE`` = 96 px whose centre lies on a multiple of 32 px** (in the detector's input image): per-pixel
    redness ``relu(r - max(g, b))``, averaged over a 96-px window at stride 32, sharp sigmoid. Only near-full
    overlap fires, so a detection's box is exactly ``centre ± 48`` px and its 5 keypoints sit at
    ``centre + KPS_OFFSETS``. Strides 8/16 and the second anchor always score 0.

``w600k_tiny.onnx`` — an ArcFace-style recognizer
    input ``input.1`` ``[N, 3, 112, 112]``, one output ``embedding`` ``[N, 512]`` (mean/std 127.5 in insightface).
    Body: conv 3→32 (stride 4) → ReLU → conv 32→512 (stride 4) = a ``512×7×7`` local map → ``Flatten`` →
    low-rank linear 25088→16→512. Weights are seeded, so :func:`tiny_recognizer_module` rebuilds the identical
    torch module (its ``head`` maps a local map to the raw embedding).

:func:`draw_faces` paints test images the detector finds: grey canvas, red squares, and an inner coloured circle
(the "identity": different colours give different embeddings, equal colours equal ones).

Requires torch (export only) and onnx. Never commit the generated files (``*.onnx`` is git-ignored).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

FACE_SIZE = 96
"""Side of a detectable face square, in pixels of the detector input."""

GRID = 32
"""Face centres must lie on multiples of this (the detector's only active stride)."""

DET_FILE = "det_tiny.onnx"
REC_FILE = "w600k_tiny.onnx"

# ArcFace 112×112 template, centred and scaled onto the 96-px square: the aligned crop shows the whole square.
_ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                              [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float32)
KPS_OFFSETS = np.round((_ARCFACE_TEMPLATE - 56.0) * (FACE_SIZE / 112.0), 2).astype(np.float32)
"""(5, 2) keypoint offsets from a face's centre, in pixels (left eye, right eye, nose, mouth left, mouth right)."""

REDNESS_THRESHOLD = 0.8
"""Fraction of the 96-px window that must be red for a detection (an identity circle of radius ≤ 18 px fits)."""

_SHARPNESS = 40.0


def _torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - the test venv has torch
        raise RuntimeError("tools.devkit.face_models needs torch to export the tiny ONNX models") from e
    return torch


def _build_detector():
    torch = _torch()
    nn, F = torch.nn, torch.nn.functional
    kps_off = [float(v) for v in KPS_OFFSETS.reshape(-1) / GRID]  # in stride-32 units
    half = FACE_SIZE / 2 / GRID

    class TinyDetector(nn.Module):
        def forward(self, x):  # x: [1, 3, H, W]
            r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
            red = F.relu(r - torch.maximum(g, b)) / (255.0 / 128.0)  # 1.0 for pure red, 0 for grey
            pooled = F.avg_pool2d(red, kernel_size=FACE_SIZE, stride=GRID, padding=FACE_SIZE // 2)
            # window j covers [32 j - 48, 32 j + 48): keep one per anchor centre 32 j
            pooled = pooled[:, :, : x.shape[2] // GRID, : x.shape[3] // GRID]
            score32 = torch.sigmoid(_SHARPNESS * (pooled - REDNESS_THRESHOLD))

            def per_anchor(t, zero_second):  # [1, C, h, w] -> [(h*w*2), C], location-major, 2 anchors
                t = t[0].permute(1, 2, 0)  # h, w, C
                second = t * 0.0 if zero_second else t
                return torch.stack([t, second], dim=2).reshape(-1, t.shape[-1])

            outs_score, outs_bbox, outs_kps = [], [], []
            for stride in (8, 16):
                z = F.avg_pool2d(red, kernel_size=stride, stride=stride) * 0.0
                outs_score.append(per_anchor(z, True))
                outs_bbox.append(per_anchor(torch.cat([z] * 4, 1), False))
                outs_kps.append(per_anchor(torch.cat([z] * 10, 1), False))
            ones = pooled * 0.0 + 1.0
            outs_score.append(per_anchor(score32, True))
            outs_bbox.append(per_anchor(torch.cat([ones * half] * 4, 1), False))
            outs_kps.append(per_anchor(torch.cat([ones * k for k in kps_off], 1), False))
            return tuple(outs_score + outs_bbox + outs_kps)

    return TinyDetector().eval()


def tiny_recognizer_module(seed: int = 0):
    """The torch module behind ``w600k_tiny.onnx`` (identical weights for the same ``seed``).

    ``module.body(x)`` gives the ``[N, 512, 7, 7]`` local map, ``module.head(map)`` the raw ``[N, 512]`` embedding.
    """
    torch = _torch()
    nn = torch.nn
    with torch.random.fork_rng(devices=[]):  # seeded weights; the caller's random state is left as it was
        torch.manual_seed(seed)

        class TinyRecognizer(nn.Module):
            def __init__(self):
                super().__init__()
                self.body = nn.Sequential(nn.Conv2d(3, 32, 4, stride=4), nn.ReLU(), nn.Conv2d(32, 512, 4, stride=4))
                self.head = nn.Sequential(nn.Flatten(1), nn.Linear(512 * 7 * 7, 16), nn.Linear(16, 512))

            def forward(self, x):
                return self.head(self.body(x))

        return TinyRecognizer().eval()


def _export(module, args, path: Path, input_names, output_names, dynamic_axes) -> None:
    torch = _torch()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # legacy exporter: needed without onnxscript
        torch.onnx.export(module, args, str(tmp), opset_version=17, dynamo=False, input_names=input_names,
                          output_names=output_names, dynamic_axes=dynamic_axes)
    tmp.replace(path)


def write_tiny_detector(path: Path) -> Path:
    """Export the tiny detector to ``path`` (see module docstring)."""
    torch = _torch()
    names = [f"{kind}_{s}" for kind in ("score", "bbox", "kps") for s in (8, 16, 32)]
    axes = {"input.1": {2: "H", 3: "W"}, **{n: {0: f"n_{n}"} for n in names}}
    _export(_build_detector(), (torch.zeros(1, 3, 128, 128),), Path(path), ["input.1"], names, axes)
    return Path(path)


def write_tiny_recognizer(path: Path, seed: int = 0) -> Path:
    """Export the tiny recognizer to ``path`` (see module docstring)."""
    torch = _torch()
    axes = {"input.1": {0: "N"}, "embedding": {0: "N"}}
    _export(tiny_recognizer_module(seed), (torch.zeros(1, 3, 112, 112),), Path(path), ["input.1"], ["embedding"],
            axes)
    return Path(path)


def make_tiny_pack(root: Path, pack: str = "tinypack") -> Path:
    """Write ``<root>/models/<pack>/det_tiny.onnx`` and ``w600k_tiny.onnx``; return the pack folder.

    ``root`` plays the part of ComfyUI's ``models/insightface`` (insightface's ``root`` argument).
    """
    folder = Path(root) / "models" / pack
    write_tiny_detector(folder / DET_FILE)
    write_tiny_recognizer(folder / REC_FILE)
    return folder


def draw_faces(canvas_hw: tuple[int, int], centers: Sequence[tuple[int, int]],
               identity_colors: Sequence[tuple[int, int, int]], *, background: int = 128,
               radius: int = 16, size: int = FACE_SIZE) -> np.ndarray:
    """Paint faces for the tiny detector: ``H×W×3`` uint8 RGB.

    ``centers``: ``(x, y)`` per face, multiples of :data:`GRID` (so the detector finds them at scale 1);
    ``identity_colors``: one RGB colour per face, painted as an inner circle of ``radius`` px — the identity.
    Faces are pure-red squares of ``size`` px (default 96; other sizes are for negative / rescaling tests).
    """
    h, w = canvas_hw
    if len(centers) != len(identity_colors):
        raise ValueError(f"draw_faces: {len(centers)} centres but {len(identity_colors)} identity colours")
    img = np.full((h, w, 3), background, dtype=np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    half = size // 2
    for (cx, cy), color in zip(centers, identity_colors):
        if size == FACE_SIZE and (cx % GRID or cy % GRID):
            raise ValueError(f"draw_faces: centre {(cx, cy)} is not on a multiple of {GRID} px")
        img[max(cy - half, 0):max(cy + size - half, 0), max(cx - half, 0):max(cx + size - half, 0)] = (255, 0, 0)
        img[(xx - cx) ** 2 + (yy - cy) ** 2 <= radius ** 2] = color
    return img


_SESSION_ROOTS: dict[int, Path] = {}


def session_tiny_root(tmp_path_factory, pack: str = "tinypack") -> Path:
    """For session-scoped fixtures: one insightface ``root`` holding ``models/<pack>`` per pytest session.

    Memoised on the ``tmp_path_factory`` object, so fixtures in several test modules share one generated pack::

        @pytest.fixture(scope="session")
        def face_root(tmp_path_factory):
            return session_tiny_root(tmp_path_factory)
    """
    key = id(tmp_path_factory)
    root = _SESSION_ROOTS.get(key)
    if root is None or not (root / "models" / pack / REC_FILE).is_file():
        root = root or tmp_path_factory.mktemp("insightface")
        make_tiny_pack(root, pack)
        _SESSION_ROOTS[key] = root
    return root


# -- recognizers with other embedding heads (local-map finder and batching) ------------------------------------

MBF_REC_FILE = "w600k_mbf_tiny.onnx"
BATCH1_REC_FILE = "w600k_batch1_tiny.onnx"


def mobilefacenet_recognizer_module(seed: int = 0):
    """A MobileFaceNet-shaped recognizer (arcface_torch ``mobilefacenet.py`` head, buffalo_s ``w600k_mbf``).

    conv 3→32 (stride 4) → PReLU → conv 32→512 (stride 4) = a ``512×7×7`` map → GDC: depthwise 7×7 conv + BN
    (``512×1×1``) → ``x.view(x.size(0), -1)`` (exported as Shape/Gather/Unsqueeze/Concat/Reshape, no Flatten) →
    Linear 512→512 → BatchNorm1d. ``module.body(x)`` gives the ``512×7×7`` map.
    """
    torch = _torch()
    nn = torch.nn
    with torch.random.fork_rng(devices=[]):  # seeded weights; the caller's random state is left as it was
        torch.manual_seed(seed)

        class TinyMobileFaceNet(nn.Module):
            def __init__(self):
                super().__init__()
                self.body = nn.Sequential(nn.Conv2d(3, 32, 4, stride=4), nn.PReLU(32),
                                          nn.Conv2d(32, 512, 4, stride=4))
                self.gdc = nn.Sequential(nn.Conv2d(512, 512, 7, groups=512, bias=False), nn.BatchNorm2d(512))
                self.linear = nn.Linear(512, 512, bias=False)
                self.bn = nn.BatchNorm1d(512)

            def forward(self, x):
                x = self.gdc(self.body(x))
                x = x.view(x.size(0), -1)
                return self.bn(self.linear(x))

        return TinyMobileFaceNet().eval()


def write_mobilefacenet_recognizer(path: Path, seed: int = 0, uninferable: bool = True) -> Path:
    """Export :func:`mobilefacenet_recognizer_module` to ``path``.

    ``uninferable=True`` stores the PReLU as onnxruntime's ``com.microsoft::QuickGelu`` (what an
    onnxruntime-optimised export contains): onnxruntime runs it, but ONNX shape inference knows no shape for its
    output or anything after it — so, as with the ``x.view(b, -1)`` Reshape of real MobileFaceNet exports, the
    Reshape feeding the head has no inferable shape. The numbers change (x·sigmoid(1.702·x) instead of PReLU);
    only the graph's structure matters here.
    """
    import onnx
    from onnx import helper

    torch = _torch()
    axes = {"input.1": {0: "N"}, "embedding": {0: "N"}}
    _export(mobilefacenet_recognizer_module(seed), (torch.zeros(1, 3, 112, 112),), Path(path), ["input.1"],
            ["embedding"], axes)
    if uninferable:
        model = onnx.load(str(path))
        slopes = set()
        for i, node in enumerate(model.graph.node):
            if node.op_type == "PRelu":
                slopes.add(node.input[1])
                model.graph.node[i].CopyFrom(helper.make_node("QuickGelu", [node.input[0]], list(node.output),
                                                              name=node.name, domain="com.microsoft"))
        kept = [t for t in model.graph.initializer if t.name not in slopes]
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        del model.graph.value_info[:]
        onnx.save(model, str(path))
    return Path(path)


def batch1_recognizer_module(seed: int = 0):
    """The tiny recognizer with a head that flattens with ``x.reshape(1, -1)`` — a Reshape fixed to batch 1 (an
    export traced with batch 1 and a constant shape). Run on one crop it equals :func:`tiny_recognizer_module`;
    two crops at once make onnxruntime fail inside the head."""
    torch = _torch()
    base = tiny_recognizer_module(seed)

    class Batch1(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.linear1, self.linear2 = base.body, base.head[1], base.head[2]

        def forward(self, x):
            return self.linear2(self.linear1(self.body(x).reshape(1, -1)))

    return Batch1().eval()


def write_batch1_recognizer(path: Path, seed: int = 0) -> Path:
    """Export :func:`batch1_recognizer_module` (input batch dynamic, the head's Reshape constant ``[1, -1]``)."""
    torch = _torch()
    axes = {"input.1": {0: "N"}, "embedding": {0: "N"}}
    _export(batch1_recognizer_module(seed), (torch.zeros(1, 3, 112, 112),), Path(path), ["input.1"],
            ["embedding"], axes)
    return Path(path)


def make_pack_with_recognizer(root: Path, pack: str, kind: str) -> Path:
    """``<root>/models/<pack>/`` with the tiny detector and a ``kind`` recognizer: ``"mobilefacenet"`` or
    ``"batch1"``."""
    folder = Path(root) / "models" / pack
    write_tiny_detector(folder / DET_FILE)
    if kind == "mobilefacenet":
        write_mobilefacenet_recognizer(folder / MBF_REC_FILE)
    elif kind == "batch1":
        write_batch1_recognizer(folder / BATCH1_REC_FILE)
    else:
        raise ValueError(f"make_pack_with_recognizer: unknown kind {kind!r}")
    return folder
