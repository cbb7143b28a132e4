"""Face detection and identity encoding through insightface (0.7.3 and 2.x).

``FaceAnalyzer(root, pack, provider, det_size)`` validates the pack (:mod:`.packs`), builds
``insightface.app.FaceAnalysis`` with ``allowed_modules=['detection', 'recognition']`` on exactly that folder
(never a download) and ``prepare(ctx_id, det_size=(s, s))`` once, and loads the local-map copy of the recognizer
(:mod:`.localmap`). Only the insightface API shared by 0.7.3 and 2.x is used: ``FaceAnalysis(name, root,
providers, allowed_modules)``, ``prepare``, ``get``, ``Face(bbox, kps, det_score)``, its ``embedding`` and
``normed_embedding``, ``det_model.detect(img, input_size=...)``, the recognizer's ``model_file``, ``input_mean``,
``input_std`` and ``input_size``, and ``utils.face_align.norm_crop``.

One recognizer pass per face: insightface picks and loads the pack's recognizer (its routing, its normalisation
constants), then the analyzer takes it out of ``FaceAnalysis.models``, so ``FaceAnalysis.get`` only detects. Each
face's aligned crop goes once through the edited copy of that recognizer, whose two outputs are the local map and
the embedding insightface's own ``ArcFaceONNX.get`` computes (same crop, same normalisation, same graph plus one
output; identical on CPU, batching may at most change float rounding), L2-normalised by insightface's
``Face.normed_embedding``. The crops of one image go through in one batch.

* :meth:`FaceAnalyzer.detect` → faces largest first; when nothing is found at ``det_size`` it retries at
  ``det_size - 64``, ``- 128``, … down to 192 (small or huge faces).
* :meth:`FaceAnalyzer.encode` → the largest face of each reference image, averaged into one
  :class:`~instantfamily_core.identity.IdentityFeatures`.
* Per-image results are cached (LRU keyed by a hash of the pixels), analyzers by :func:`get_analyzer`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import EmbeddingError, InstantFamilyError, ModelFileError, NoFaceError
from .images import as_image_list, check_image
from .localmap import LocalMapModel
from .packs import FacePack, resolve_pack
from .providers import is_cpu_only, select_providers

logger = logging.getLogger(__name__)

MIN_RETRY_DET_SIZE = 192
FACEID_CROP_SIZE = 224
RETRY_STEP = 64


@dataclass(frozen=True, eq=False)
class DetectedFace:
    """One detected face (arrays are read-only; they may be shared with the result cache).

    ``bbox`` (4,) x1, y1, x2, y2 and ``kps`` (5, 2) in image pixels; ``crop`` the aligned 112×112×3 uint8 RGB
    crop the recognizer saw; ``global_embedding`` (D,) L2-normalised float32; ``local_map`` (C, L, L) float32;
    ``det_size`` the detector size at which the face was found; ``raw_embedding`` (D,) float32, the recognizer's
    un-normalised output (insightface's ``Face.embedding``, what InstantID reads; ``global_embedding`` is its
    ``normed_embedding``).
    """

    bbox: np.ndarray
    kps: np.ndarray
    det_score: float
    crop: np.ndarray
    global_embedding: np.ndarray
    local_map: np.ndarray
    det_size: int
    raw_embedding: np.ndarray | None = None

    @property
    def area(self) -> float:
        x1, y1, x2, y2 = (float(v) for v in self.bbox)
        return max(x2 - x1, 0.0) * max(y2 - y1, 0.0)


def _import_insightface():
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # 0.7.3: albumentations phones home at import
    try:
        from insightface.app import FaceAnalysis
        from insightface.app.common import Face
        from insightface.utils import face_align
    except ImportError as e:
        raise InstantFamilyError(
            f"insightface is not installed or failed to import ({e}); run `pip install insightface onnxruntime` "
            "(or insightface==0.7.3) in ComfyUI's Python environment") from e
    return FaceAnalysis, Face, face_align


def _check_det_size(det_size) -> int:
    if isinstance(det_size, bool) or not isinstance(det_size, (int, np.integer)) or det_size % 32 or not (
            64 <= det_size <= 4096):
        raise InstantFamilyError(f"det_size: expected a multiple of 32 between 64 and 4096, got {det_size!r}")
    return int(det_size)


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    a.setflags(write=False)
    return a


class FaceAnalyzer:
    """Detector + ArcFace recognizer of one pack. Expensive to build: use :func:`get_analyzer`."""

    def __init__(self, root: str | os.PathLike, pack: str = "antelopev2", provider: str = "auto",
                 det_size: int = 640, *, cache_size: int = 32, cache_dir: str | os.PathLike | None = None):
        self.det_size = _check_det_size(det_size)
        self.pack: FacePack = resolve_pack(root, pack)
        self.providers = select_providers(provider)
        self.ctx_id = -1 if is_cpu_only(self.providers) else 0
        FaceAnalysis, self._Face, self._face_align = _import_insightface()
        try:
            # An absolute folder as `name` makes 0.7.3 (os.path.join) and 2.x (direct dir) use exactly this
            # validated folder; insightface never downloads for an existing one.
            self.app = FaceAnalysis(name=str(self.pack.path.resolve()), root=str(self.pack.root),
                                    providers=self.providers, allowed_modules=["detection", "recognition"])
        except Exception as e:  # AssertionError (no detector), ORT load errors, ...
            raise ModelFileError(f"insightface could not load face-model pack '{self.pack.name}' from "
                                 f"{self.pack.path} ({type(e).__name__}: {e})") from e
        missing = [t for t in ("detection", "recognition") if t not in self.app.models]
        if missing:
            raise ModelFileError(f"insightface found no {' or '.join(missing)} model in {self.pack.path}")
        rec = self.app.models["recognition"]
        self.recognizer_file = Path(getattr(rec, "model_file", None) or self.pack.recognizer)
        self.crop_size = int(rec.input_size[0])
        self._local = LocalMapModel(self.recognizer_file, self.providers, rec.input_mean, rec.input_std,
                                    self.crop_size, cache_dir)
        # The edited copy computes the embedding too: release insightface's own recognizer (and its session), so
        # that FaceAnalysis.get only detects and each face goes through a recognizer once (module docstring).
        del self.app.models["recognition"]
        self._lock = threading.RLock()
        self.app.prepare(ctx_id=self.ctx_id, det_size=(self.det_size, self.det_size))
        self._cache: OrderedDict[tuple, tuple[DetectedFace, ...]] = OrderedDict()
        self.cache_size = int(cache_size)
        self.cache_hits = 0
        self.cache_misses = 0

    # -- detection ---------------------------------------------------------------------------------------------
    def det_sizes(self) -> list[int]:
        """Detector sizes tried in order: ``det_size``, then ``det_size - 64``, … ≥ 192."""
        return [self.det_size] + list(range(self.det_size - RETRY_STEP, MIN_RETRY_DET_SIZE - 1, -RETRY_STEP))

    def _get_faces(self, img_bgr: np.ndarray, size: int) -> list:
        """insightface ``Face`` objects (bbox, kps, det_score; no embedding yet) found at detector size ``size``.

        The prepared size goes through ``FaceAnalysis.get`` (detection only: the recognizer is not among its
        models). Other sizes call the detector with an explicit ``input_size`` (0.7.3 ignores a second
        ``prepare(det_size=...)``) — the same step ``FaceAnalysis.get`` takes, without changing the prepared state.
        """
        if size == self.det_size:
            return list(self.app.get(img_bgr))
        bboxes, kpss = self.app.det_model.detect(img_bgr, input_size=(size, size), max_num=0, metric="default")
        if kpss is None:
            raise ModelFileError(f"face detector of pack '{self.pack.name}' returned no keypoints")
        return [self._Face(bbox=bboxes[i, 0:4], kps=kpss[i], det_score=bboxes[i, 4]) for i in range(bboxes.shape[0])]

    def detect(self, image_rgb: np.ndarray, name: str = "image") -> list[DetectedFace]:
        """All faces in an ``H×W×3`` uint8 RGB image, largest box first (``[]`` if none at any size)."""
        image_rgb = check_image(image_rgb, name)
        key = (image_rgb.shape, hashlib.sha256(np.ascontiguousarray(image_rgb).data).hexdigest())
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                self.cache_hits += 1
                return list(self._cache[key])
            self.cache_misses += 1
            faces = tuple(self._detect_uncached(image_rgb, name))
            self._cache[key] = faces
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            return list(faces)

    def _detect_uncached(self, image_rgb: np.ndarray, name: str) -> list[DetectedFace]:
        img_bgr = np.ascontiguousarray(image_rgb[:, :, ::-1])
        raw, used = [], None
        for size in self.det_sizes():
            raw = self._get_faces(img_bgr, size)
            if raw:
                used = size
                break
        if not raw:
            return []
        if used != self.det_size:
            logger.info("%s: faces found only at det_size %d (not %d)", name, used, self.det_size)
        crops = [self._face_align.norm_crop(img_bgr, landmark=np.asarray(f.kps), image_size=self.crop_size)[:, :, ::-1]
                 for f in raw]
        embs, maps = self._local(np.stack(crops))  # the one recognizer pass: every face of the image in one batch
        out = []
        for f, crop, raw_emb, fmap in zip(raw, crops, embs, maps):
            f.embedding = raw_emb  # what ArcFaceONNX.get would set; normed_embedding is insightface's L2 norm
            emb = np.asarray(f.normed_embedding, dtype=np.float32).reshape(-1)
            if not np.isfinite(emb).all() or not np.isfinite(fmap).all():
                raise EmbeddingError(f"{name}: the face embedding contains NaN or infinite values; check the "
                                     "face-model pack and the onnxruntime provider")
            out.append(DetectedFace(bbox=_readonly(np.asarray(f.bbox, np.float32).reshape(4)),
                                    kps=_readonly(np.asarray(f.kps, np.float32).reshape(5, 2)),
                                    det_score=float(f.det_score), crop=_readonly(crop),
                                    global_embedding=_readonly(emb), local_map=_readonly(fmap), det_size=used,
                                    raw_embedding=_readonly(np.asarray(raw_emb, dtype=np.float32).reshape(-1))))
        out.sort(key=lambda d: (-d.area, -d.det_score))
        return out

    # -- identity ----------------------------------------------------------------------------------------------
    def encode(self, images, name: str = "identity", on_no_face: str = "error"):
        """Identity features of one person from one or more reference images.

        ``images``: an ``H×W×3`` uint8 RGB array, a ``B×H×W×3`` batch, or a list of arrays. The largest face of
        each image is used; encodings are averaged with ``IdentityFeatures.average``. An image without a face
        raises :class:`NoFaceError` naming ``name`` and the image index (``on_no_face="error"``) or is skipped with
        a warning (``"skip"``; returns ``None`` when every image is skipped).
        """
        if on_no_face not in ("error", "skip"):
            raise InstantFamilyError(f"on_no_face: expected 'error' or 'skip', got {on_no_face!r}")
        import torch

        from ..identity import IdentityFeatures

        imgs = as_image_list(images, name)
        items = []
        for k, img in enumerate(imgs):
            faces = self.detect(img, name=f"{name} image {k}")
            if not faces:
                msg = (f"{name}: no face found in reference image {k} (0-based, of {len(imgs)}; {img.shape[1]}×"
                       f"{img.shape[0]} px), also after retrying at detector sizes {self.det_sizes()[1:]}. Use a "
                       "photo where the face is clearly visible and not too small")
                if on_no_face == "error":
                    raise NoFaceError(msg)
                logger.warning("%s; skipping it", msg)
                continue
            f = faces[0]
            # public-weights (FaceID) mode: per-photo normed embeddings (Portrait) and the 224-px aligned RGB
            # crop (Plus, for CLIP ViT-H), as the reference makes it: norm_crop(image, kps, image_size=224);
            # InstantID: per-photo raw (un-normalised) embeddings, insightface's Face.embedding
            crop224 = self._face_align.norm_crop(np.ascontiguousarray(img), landmark=np.asarray(f.kps),
                                                 image_size=FACEID_CROP_SIZE)
            items.append(IdentityFeatures(torch.from_numpy(f.global_embedding.copy()),
                                          torch.from_numpy(f.local_map.copy()), name=name, num_images=1,
                                          face_pack=self.pack.name,
                                          extra={"faceid_embeddings": [torch.from_numpy(f.global_embedding.copy())],
                                                 "faceid_crops": [_readonly(crop224)],
                                                 "raw_embeddings": [torch.from_numpy(f.raw_embedding.copy())]}))
        if not items:
            logger.warning("%s: no face in any of the %d reference image(s); no identity encoded", name, len(imgs))
            return None
        return IdentityFeatures.average(items, name=name)


_ANALYZERS: dict[tuple, FaceAnalyzer] = {}
_ANALYZERS_LOCK = threading.Lock()


def get_analyzer(root: str | os.PathLike, pack: str = "antelopev2", provider: str = "auto",
                 det_size: int = 640) -> FaceAnalyzer:
    """A shared :class:`FaceAnalyzer`, cached by (root, pack, providers, det_size, the pack's files)."""
    face_pack = resolve_pack(root, pack)
    key = (str(face_pack.path.resolve()), tuple(select_providers(provider)), _check_det_size(det_size),
           face_pack.signature())
    with _ANALYZERS_LOCK:
        analyzer = _ANALYZERS.get(key)
        if analyzer is None:
            stale = [k for k in _ANALYZERS if k[:3] == key[:3]]
            for k in stale:  # same pack, files changed on disk
                del _ANALYZERS[k]
            analyzer = _ANALYZERS[key] = FaceAnalyzer(root, pack, provider, det_size)
        return analyzer


def clear_analyzer_cache() -> None:
    """Forget all shared analyzers (e.g. to free memory)."""
    with _ANALYZERS_LOCK:
        _ANALYZERS.clear()
