"""Expose an ArcFace recognizer's last spatial feature map (InstantFamily's 2-D "local" identity features).

insightface's ``ArcFaceONNX`` asserts a single output, so ``FaceAnalysis`` loads the unmodified file (the analyzer
reads its routing and normalisation from it, then releases it) and an *edited copy* is run here with onnxruntime
directly:

1. load the recognizer with ``onnx`` and run shape inference;
2. take the input of the first ``Flatten`` node (IResNet ``w600k_r50`` / ``glintr100``: the ``bn2`` output,
   ``N×512×7×7``); if that tensor is not spatial (MobileFaceNet: ``N×512×1×1`` after the depthwise GDC) walk back
   through its producers to the last 4-D tensor with ``H, W ≥ 2``; without a ``Flatten`` the first 4-D → 2-D
   ``Reshape`` is used — or one whose shapes ONNX cannot infer (MobileFaceNet's ``x.view(b, -1)``, onnxruntime
   contrib ops), whose tensors are then measured by running the model once on a zero input;
3. append that tensor to the graph outputs and save the copy as
   ``<pack>/.instantfamily_cache/<stem>-<sha256[:16]>.localmap.onnx`` (written atomically with normal file
   permissions by :func:`~instantfamily_core.fileio.atomic_path`; reused when present; a user cache folder when
   the pack folder is read-only).

:class:`LocalMapModel` runs the copy on aligned crops with the recognizer's own normalisation
(``(x - input_mean) / input_std``, RGB, NCHW — what ``ArcFaceONNX.get_feat`` does) and returns both outputs:
the raw embedding (identical to insightface's: :class:`~.analyzer.FaceAnalyzer` uses it instead of running
insightface's recognizer, so each face goes through a recognizer once) and the ``(C, L, L)`` map. Crops go through
in one batch, or one at a time when the graph has a Reshape fixed to batch 1 (or a batched run fails).
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
from ..fileio import atomic_path
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


def _head_reshapes(g, shapes) -> list:
    """Reshape nodes that may flatten the map for the head: 4-D (or unknown) input → 2-D (or unknown) output."""
    def rank(name):
        return len(shapes[name]) if shapes.get(name) else None
    return [n for n in g.node if n.op_type == "Reshape" and rank(n.input[0]) in (4, None)
            and rank(n.output[0]) in (2, None)]


def _probe_shapes(model, names: list[str]) -> dict[str, tuple]:
    """Shapes of the tensors ``names`` found by running the model once on a zero input (batch 1) with
    onnxruntime — for graphs whose shapes ONNX cannot infer (contrib ops, a Reshape with a computed shape)."""
    import onnx
    import onnxruntime

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    for name in names:
        if name not in have:
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    inp = probe.graph.input[0]
    tt = inp.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim]
    if len(dims) != 4:
        raise ModelFileError(f"the recognizer's input {inp.name!r} is not (N, 3, H, W)")
    dims = [1, dims[1] or 3, dims[2] or 112, dims[3] or dims[2] or 112]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type) if tt.elem_type else np.float32
    try:
        sess = onnxruntime.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
        outs = sess.run(list(names), {inp.name: np.zeros(dims, dtype=dtype)})
    except Exception as e:  # onnxruntime raises its own exception types
        raise ModelFileError(f"could not run the recognizer to find its feature-map shape ({type(e).__name__}: "
                             f"{e})") from None
    return {n: tuple(int(v) for v in o.shape) for n, o in zip(names, outs)}


def find_local_map(model) -> tuple[str, tuple]:
    """``(tensor name, shape)`` of the spatial map feeding the recognizer's embedding head (see module docstring).

    ``model`` is an ``onnx.ModelProto``; shape inference is run on a copy. Where ONNX cannot infer a shape
    (MobileFaceNet's ``x.view(b, -1)`` Reshape, onnxruntime contrib ops) the candidate tensors are measured by
    running the model once on a zero input. Raises :class:`ModelFileError`.
    """
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # a graph ONNX cannot infer at all: measure instead
        inferred = model
    g = inferred.graph
    shapes = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        if vi.type.tensor_type.HasField("shape"):
            shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                    for d in vi.type.tensor_type.shape.dim)
    producers = {out: node for node in g.node for out in node.output}
    initializers = {i.name for i in g.initializer}

    def chain(name):  # the tensor and its first non-constant producers' inputs, back to the graph input
        names = []
        for _ in range(64):
            names.append(name)
            node = producers.get(name)
            inputs = [i for i in (node.input if node is not None else []) if i and i not in initializers]
            if not inputs:
                break
            name = inputs[0]
        return names

    start = next((n for n in g.node if n.op_type == "Flatten"), None)
    if start is None:
        reshapes = _head_reshapes(g, shapes)
        start = reshapes[0] if reshapes else None
    if start is None:
        raise ModelFileError("the recognizer has no Flatten/Reshape node before its embedding head; cannot find "
                             "its spatial feature map (is it an ArcFace IResNet / MobileFaceNet export?)")
    names = chain(start.input[0])

    def known(dims):
        return bool(dims) and all(isinstance(d, int) for d in dims[1:])

    first = next((n for n in names if _spatial(shapes.get(n, ())) or not known(shapes.get(n))), None)
    if first is not None and not known(shapes.get(first)):  # an unknown tensor before any spatial one: measure
        measured = _probe_shapes(model, [n for n in names if n not in initializers and n != g.input[0].name])
        shapes.update({n: (None, *dims[1:]) for n, dims in measured.items()})  # batch stays symbolic
    for name in names:
        dims = shapes.get(name, ())
        if _spatial(dims):
            return name, dims
    raise ModelFileError(f"the recognizer's feature map before '{start.name or start.op_type}' has no known spatial "
                         f"shape (got {shapes.get(start.input[0])}); cannot expose the local map")


def batch_one_reshapes(model) -> list[str]:
    """Names of Reshape nodes whose constant target shape starts with 1 while the model's batch is dynamic — such a
    graph only works on one crop at a time."""
    from onnx import numpy_helper

    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    consts[node.output[0]] = numpy_helper.to_array(a.t)
    out = []
    for node in model.graph.node:
        if node.op_type == "Reshape" and len(node.input) > 1 and node.input[1] in consts:
            target = np.asarray(consts[node.input[1]]).reshape(-1)
            if target.size >= 2 and int(target[0]) == 1:
                out.append(node.name or node.output[0])
    return out


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
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
            vi = next((v for v in list(inferred.graph.value_info) + list(inferred.graph.input) if v.name == name),
                      None)
        except Exception:
            vi = None
        model.graph.output.append(vi if vi is not None and vi.type.tensor_type.HasField("shape")
                                  else onnx.helper.make_empty_tensor_value_info(name))
    with atomic_path(target, ".onnx") as tmp:
        onnx.save(model, tmp)
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
        if self.fixed_batch is None:
            try:
                import onnx
                fixed = batch_one_reshapes(onnx.load(str(self.path), load_external_data=False))
            except Exception:  # unreadable here: the batched run below still falls back
                fixed = []
            if fixed:
                logger.info("%s: Reshape %s is fixed to batch 1; running one face crop at a time", recognizer,
                            fixed[0])
                self.fixed_batch = 1
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
        if len(x) > 1 and self.fixed_batch != 1:
            try:
                emb, fmap = self.session.run(self.output_names, {self.input_name: x})
                if len(emb) == len(x) and len(fmap) == len(x):
                    return emb.reshape(len(x), -1).astype(np.float32), fmap.astype(np.float32)
                logger.warning("%s: a batch of %d crops gave %d embeddings; running one crop at a time", self.path,
                               len(x), len(emb))
            except Exception as e:  # onnxruntime's own exception types (a head fixed to batch 1, ...)
                logger.warning("%s: a batch of %d crops failed (%s); running one crop at a time", self.path, len(x),
                               type(e).__name__)
            self.fixed_batch = 1
        parts = [self._run_one(x[i:i + 1]) for i in range(len(x))]
        emb, fmap = (np.concatenate([p[k] for p in parts]) for k in (0, 1))
        return emb.reshape(len(x), -1).astype(np.float32), fmap.astype(np.float32)

    def _run_one(self, x: np.ndarray):
        try:
            emb, fmap = self.session.run(self.output_names, {self.input_name: x})
        except Exception as e:  # onnxruntime's own exception types
            raise ModelFileError(f"recognizer {self.path} failed on a {self.input_size}×{self.input_size} crop "
                                 f"({type(e).__name__}: {e})") from None
        return emb.reshape(1, -1), fmap.reshape(1, *fmap.shape[1:])
