"""Expose an ArcFace recognizer's last spatial feature map (InstantFamily's 2-D "local" identity features).

insightface's ``ArcFaceONNX`` asserts a single output, so the unmodified file stays with ``FaceAnalysis`` and an
*edited copy* is run here with onnxruntime directly:

1. load the recognizer with ``onnx`` and run shape inference;
2. take the input of the first ``Flatten`` node (IResNet ``w600k_r50`` / ``glintr100``: the ``bn2`` output,
   ``N×512×7×7``); if that tensor is not spatial (MobileFaceNet: ``N×512×1×1`` after the depthwise GDC) walk back
   through its producers to the last 4-D tensor with ``H, W ≥ 2``; without a ``Flatten`` the first 4-D → 2-D
   ``Reshape`` is used;
3. append that tensor to the graph outputs and save the copy as
   ``<pack>/.instantfamily_cache/<stem>-<sha256[:16]>.localmap.onnx`` (atomic temp file + ``os.replace``; reused
   when present; a user cache folder when the pack folder is read-only).

:class:`LocalMapModel` runs the copy on aligned crops with the recognizer's own normalisation
(``(x - input_mean) / input_std``, RGB, NCHW — what ``ArcFaceONNX.get_feat`` does) and returns both outputs:
the raw embedding (identical to insightface's) and the ``(C, L, L)`` map.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
from pathlib import Path

import numpy as np

from ..errors import ModelFileError
from .packs import CACHE_DIRNAME

logger = logging.getLogger(__name__)

_HASHES: dict[tuple, str] = {}
_LOCK = threading.Lock()


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes (memoised by path, size and mtime)."""
    st = Path(path).stat()
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def user_cache_dir() -> Path:
    """Fallback cache folder: ``$INSTANTFAMILY_CACHE`` or ``$XDG_CACHE_HOME/instantfamily`` (``~/.cache/...``)."""
    env = os.environ.get("INSTANTFAMILY_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "instantfamily"


def _spatial(dims) -> bool:
    return (len(dims) == 4 and isinstance(dims[2], int) and isinstance(dims[3], int)
            and dims[2] >= 2 and dims[3] >= 2)


def find_local_map(model) -> tuple[str, tuple]:
    """``(tensor name, shape)`` of the spatial map feeding the recognizer's embedding head (see module docstring).

    ``model`` is an ``onnx.ModelProto``; shape inference is run on a copy. Raises :class:`ModelFileError`.
    """
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    shapes = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                for d in vi.type.tensor_type.shape.dim)
    producers = {out: node for node in g.node for out in node.output}
    initializers = {i.name for i in g.initializer}

    start = next((n for n in g.node if n.op_type == "Flatten"), None)
    if start is None:
        start = next((n for n in g.node if n.op_type == "Reshape" and len(shapes.get(n.input[0], ())) == 4
                      and len(shapes.get(n.output[0], ())) == 2), None)
    if start is None:
        raise ModelFileError("the recognizer has no Flatten/Reshape node before its embedding head; cannot find "
                             "its spatial feature map (is it an ArcFace IResNet / MobileFaceNet export?)")
    name = start.input[0]
    for _ in range(64):
        dims = shapes.get(name, ())
        if _spatial(dims):
            return name, dims
        node = producers.get(name)
        inputs = [i for i in (node.input if node is not None else []) if i and i not in initializers]
        if not inputs:
            break
        name = inputs[0]
    raise ModelFileError(f"the recognizer's feature map before '{start.name or start.op_type}' has no known spatial "
                         f"shape (got {shapes.get(start.input[0])}); cannot expose the local map")


def _writable_dir(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".probe-")
        os.close(fd)
        os.remove(probe)
        return True
    except OSError:
        return False


def local_map_model_path(recognizer: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the edited recognizer (created on first use, reused afterwards). ``cache_dir`` overrides the
    default ``<pack>/.instantfamily_cache`` (falls back to :func:`user_cache_dir` when not writable)."""
    src = Path(recognizer)
    try:
        digest = file_sha256(src)[:16]
    except OSError as e:
        raise ModelFileError(f"cannot read recognizer {src}: {e}") from e
    file_name = f"{src.stem}-{digest}.localmap.onnx"
    candidates = [Path(cache_dir)] if cache_dir is not None else [src.parent / CACHE_DIRNAME, user_cache_dir()]
    for folder in candidates:
        if (folder / file_name).is_file():
            return folder / file_name
    folder = next((c for c in candidates if _writable_dir(c)), None)
    if folder is None:
        raise ModelFileError(f"cannot write the local-map copy of {src}: none of {[str(c) for c in candidates]} "
                             "is writable; set INSTANTFAMILY_CACHE to a writable folder")
    with _LOCK:
        target = folder / file_name
        if not target.is_file():
            _write_edited(src, target)
    return target


def _write_edited(src: Path, target: Path) -> None:
    import onnx

    try:
        model = onnx.load(str(src))
    except Exception as e:
        raise ModelFileError(f"recognizer {src} is not a readable ONNX model ({type(e).__name__}: {e}); "
                             "download it again") from e
    try:
        name, _ = find_local_map(model)
    except ModelFileError as e:
        raise ModelFileError(f"{src}: {e}") from None
    if name not in {o.name for o in model.graph.output}:
        inferred = onnx.shape_inference.infer_shapes(model)
        vi = next(v for v in list(inferred.graph.value_info) + list(inferred.graph.input) if v.name == name)
        model.graph.output.append(vi)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        onnx.save(model, tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    logger.info("wrote local-map recognizer %s (extra output %s)", target, name)


class LocalMapModel:
    """onnxruntime session of the edited recognizer.

    ``input_mean`` / ``input_std`` / ``input_size`` must be those of insightface's recognizer object
    (``ArcFaceONNX``) so the embedding matches insightface's exactly.
    """

    def __init__(self, recognizer: str | os.PathLike, providers: list[str], input_mean: float, input_std: float,
                 input_size: int = 112, cache_dir: str | os.PathLike | None = None):
        import onnxruntime

        self.path = local_map_model_path(recognizer, cache_dir)
        self.input_mean, self.input_std, self.input_size = float(input_mean), float(input_std), int(input_size)
        try:
            self.session = onnxruntime.InferenceSession(str(self.path), providers=list(providers))
        except Exception as e:
            raise ModelFileError(f"cannot load the local-map copy {self.path} of {recognizer} "
                                 f"({type(e).__name__}: {e}); delete it to have it rebuilt") from e
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.input_dtype = np.float16 if "float16" in inp.type else np.float32
        self.fixed_batch = inp.shape[0] if isinstance(inp.shape[0], int) else None
        outs = self.session.get_outputs()
        if len(outs) != 2:
            raise ModelFileError(f"local-map copy {self.path} has {len(outs)} outputs, expected 2; delete it")
        self.output_names = [o.name for o in outs]

    def blob(self, crops_rgb: np.ndarray) -> np.ndarray:
        """``(N, S, S, 3)`` uint8 RGB crops → normalised ``(N, 3, S, S)`` input."""
        x = (crops_rgb.astype(np.float32) - np.float32(self.input_mean)) * np.float32(1.0 / self.input_std)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=self.input_dtype)

    def __call__(self, crops_rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw embeddings ``(N, D)`` and local maps ``(N, C, L, L)`` (float32) for aligned RGB crops."""
        crops_rgb = np.asarray(crops_rgb)
        if crops_rgb.ndim == 3:
            crops_rgb = crops_rgb[None]
        s = self.input_size
        if crops_rgb.shape[1:] != (s, s, 3):
            raise ModelFileError(f"local-map model expects {s}×{s} RGB crops, got {crops_rgb.shape[1:]}")
        x = self.blob(crops_rgb)
        if self.fixed_batch == 1 and len(x) > 1:
            parts = [self.session.run(self.output_names, {self.input_name: x[i:i + 1]}) for i in range(len(x))]
            emb, fmap = (np.concatenate([p[k] for p in parts]) for k in (0, 1))
        else:
            emb, fmap = self.session.run(self.output_names, {self.input_name: x})
        return emb.reshape(len(x), -1).astype(np.float32), fmap.astype(np.float32)
