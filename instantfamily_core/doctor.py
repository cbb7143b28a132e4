"""Installation doctor: checks what InstantFamily needs and says, per row, exactly what to fix.

Used by ``python tools/doctor.py`` (finds ComfyUI itself) and by the *InstantFamily Doctor* node (gets its folders
from ComfyUI's ``folder_paths``), so both print the same table. This module imports nothing heavy at import time
— not ComfyUI, not even torch — so it still reports when torch, numpy or onnxruntime are what is broken; each
check imports what it inspects and turns the failure into a row.

Rows have a status: ``ok``, ``warn`` (works, but worth knowing) or ``FAIL`` (something needed is missing or broken).
The exit code is 1 when any row failed, else 0. Mode rows at the end say which way of generating is ready:
*InstantFamily* (a checkpoint you trained + its face pack + an SD1.5 checkpoint) and *public weights* on SD1.5 and
on SDXL (an IP-Adapter-FaceID file of that base + buffalo_l + an OpenPose ControlNet of that base + a base
checkpoint, + CLIP ViT-H for Plus); at least one must be. Files are told apart by their keys and shapes: FaceID by
the text width its adapter reads (768 SD1.5, 2048 SDXL), ControlNets and checkpoints by their cross-attention width
(and SDXL's 2816-wide size/pooled-text embedding, second text encoder).
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

OK, WARN, FAIL = "ok", "warn", "FAIL"
TESTED_COMFYUI = "0.3.64"
KNOWN_CHANGES_HANDLED = (  # newer ComfyUI (0.38) changes this pack handles (docs/compatibility.md explains each)
    "clone() shares non-dict model_options objects (PR #12382): hooks isolated per clone by an ON_CLONE callback",
    "regions wrapper registered once per model",
    "extra_paths.yaml read before extra_model_paths.yaml",
    "templates in example_workflows/, the folder newest ComfyUI prefers ('workflows' is a legacy alias)",
    "ControlNet operations picked as ComfyUI's ControlNet loaders pick them (load device, no fast fp8)",
)
ORT_DISTS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino", "onnxruntime-silicon",
             "onnxruntime-rocm", "ort-nightly", "ort-nightly-gpu")
ORT_FIX_CPU = "pip uninstall -y {dists} && pip install onnxruntime"
ORT_FIX_GPU = "pip uninstall -y {dists} && pip install onnxruntime-gpu"
NUMPY_ABI_MARKERS = ("numpy.dtype size changed", "compiled using NumPy 1.x", "_ARRAY_API not found",
                     "numpy.core.multiarray failed to import", "binary incompatibility", "numpy.core._multiarray_umath")
WEIGHT_EXTS = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")
FACEID_DOWNLOAD = "https://huggingface.co/h94/IP-Adapter-FaceID"
OPENPOSE_DOWNLOAD = ("control_v11p_sd15_openpose (e.g. control_v11p_sd15_openpose_fp16.safetensors from "
                     "https://huggingface.co/comfyanonymous/ControlNet-v1-1_fp16_safetensors)")
OPENPOSE_SDXL_DOWNLOAD = ("an SDXL OpenPose ControlNet: OpenPoseXL2.safetensors (https://huggingface.co/thibaud/"
                          "controlnet-openpose-sdxl-1.0) or diffusion_pytorch_model.safetensors + config.json of "
                          "https://huggingface.co/xinsir/controlnet-openpose-sdxl-1.0 (in a folder of its own)")
SDXL_BASE_DOWNLOAD = "an SDXL base checkpoint (sd_xl_base_1.0.safetensors, https://huggingface.co/stabilityai/" \
                     "stable-diffusion-xl-base-1.0)"
VIT_H = "CLIP ViT-H-14 (laion2B) image encoder (CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors)"
BASES = ("SD1.5", "SDXL")
CONTEXT_BASES = {768: "SD1.5", 1024: "SD2.x", 2048: "SDXL"}
FACEID_FILES = {"SD1.5": "ip-adapter-faceid_sd15.bin or ip-adapter-faceid-plusv2_sd15.bin",
                "SDXL": "ip-adapter-faceid_sdxl.bin, ip-adapter-faceid-plusv2_sdxl.bin or "
                        "ip-adapter-faceid-portrait_sdxl.bin"}


@dataclass
class Check:
    """One row: ``name`` what was checked, ``status`` ok/warn/FAIL, ``detail`` what was found, ``fix`` what to do."""

    name: str
    status: str
    detail: str
    fix: str = ""


@dataclass
class Locations:
    """Where to look. ``comfyui`` is None when no ComfyUI was found; folder lists may hold missing folders."""

    comfyui: Optional[Path] = None
    comfyui_version: Optional[str] = None
    folders: dict = field(default_factory=dict)  # ComfyUI folder name → list of paths
    path_configs: Optional[list] = None  # yaml files the CLI read folders from; None: folders from ComfyUI itself
    path_notes: list = field(default_factory=list)  # files ignored or unreadable, as sentences

    def get(self, name: str) -> list[Path]:
        return [Path(p) for p in self.folders.get(name, [])]


FOLDERS = {  # folder name in ComfyUI → default sub-folder of ComfyUI/models
    "insightface": "insightface", "instantfamily": "instantfamily", "controlnet": "controlnet",
    "ipadapter": "ipadapter", "clip_vision": "clip_vision", "loras": "loras", "checkpoints": "checkpoints",
    "instantid": "instantid",
}


# ---------------------------------------------------------------------------------------------------------------
# finding ComfyUI (the CLI; the node knows where it runs)

def is_comfyui(path: Path) -> bool:
    return (path / "main.py").is_file() and (path / "comfy").is_dir() and (path / "folder_paths.py").is_file()


def comfyui_version(root: Path) -> Optional[str]:
    """``__version__`` from ``comfyui_version.py`` (read, not imported), else ``pyproject.toml``'s version."""
    for name, pattern in (("comfyui_version.py", r"__version__\s*=\s*['\"]([^'\"]+)"),
                          ("pyproject.toml", r"(?m)^version\s*=\s*['\"]([^'\"]+)")):
        p = root / name
        if p.is_file():
            m = re.search(pattern, p.read_text(encoding="utf-8", errors="replace"))
            if m:
                return m.group(1)
    return None


def find_comfyui(explicit: Optional[str] = None, pack_root: Optional[Path] = None) -> tuple[Optional[Path], list[str]]:
    """The ComfyUI folder and the places tried: ``explicit`` alone when given (a wrong explicit folder is reported,
    never replaced by another install), else ``$COMFYUI_PATH``, the pack's ``custom_nodes`` parent,
    ``~/comfy/ComfyUI``."""
    if explicit:
        path = Path(explicit).expanduser()
        return (path.resolve() if is_comfyui(path) else None), [str(path)]
    tried = []
    cands = []
    if os.environ.get("COMFYUI_PATH"):
        cands.append(Path(os.environ["COMFYUI_PATH"]).expanduser())
    if pack_root is not None and pack_root.parent.name == "custom_nodes":
        cands.append(pack_root.parent.parent)
    cands.append(Path.home() / "comfy" / "ComfyUI")
    for c in cands:
        tried.append(str(c))
        if is_comfyui(c):
            return c.resolve(), tried
    return None, tried


EXTRA_PATHS = "extra_paths.yaml"
EXTRA_MODEL_PATHS = "extra_model_paths.yaml"


def reads_extra_paths_yaml(install_dir: Path) -> bool:
    """Whether this ComfyUI's ``main.py`` (read, not run) loads ``extra_paths.yaml``: newer ComfyUI reads it first
    and then ignores ``extra_model_paths.yaml``; 0.3.64 reads only ``extra_model_paths.yaml``."""
    try:
        text = (install_dir / "main.py").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return re.search(r"['\"]extra_paths\.yaml['\"]", text) is not None


def path_config_files(root: Path, extra_configs: Iterable = ()) -> tuple[list[Path], list[str]]:
    """The yaml files ComfyUI at ``root`` reads in ``main.py`` ``apply_custom_paths``, in its order, and notes on
    the ones it ignores. Next to the real ``main.py`` (symlinks resolved, as ComfyUI does): ``extra_paths.yaml``,
    else ``extra_model_paths.yaml`` (when main.py knows extra_paths.yaml; older ComfyUI reads only
    ``extra_model_paths.yaml``); then ``extra_configs`` (``--extra-model-paths-config``)."""
    install_dir = Path(os.path.realpath(root / "main.py")).parent
    new, legacy = install_dir / EXTRA_PATHS, install_dir / EXTRA_MODEL_PATHS
    files, notes = [], []
    if reads_extra_paths_yaml(install_dir) and new.is_file():
        files.append(new)
        if legacy.is_file():
            notes.append(f"{legacy} ignored: this ComfyUI reads {EXTRA_PATHS} instead when both exist")
    elif legacy.is_file():
        files.append(legacy)
    files += [Path(p).expanduser() for p in extra_configs]
    return files, notes


def _config_paths(conf: dict, base: Optional[str], yaml_dir: str, out: dict) -> None:
    """One yaml block (ComfyUI's rules: ``base_path`` + relative entries, several paths per entry separated by new
    lines, ``is_default`` puts them first, in reverse as ComfyUI does) merged into ``out``; a nested ``models:`` block likewise."""
    if conf.get("base_path"):
        base = os.path.expandvars(os.path.expanduser(str(conf["base_path"])))
        if not os.path.isabs(base):
            base = os.path.abspath(os.path.join(yaml_dir, base))
    first = bool(conf.get("is_default"))
    for key, value in conf.items():
        if key == "models" and isinstance(value, dict):
            _config_paths(value, base, yaml_dir, out)
            continue
        if key in ("base_path", "is_default") or not isinstance(value, str):
            continue
        paths = []
        for line in value.split("\n"):
            line = line.strip()
            if line:
                full = os.path.join(base, line) if base else os.path.join(yaml_dir, line)
                paths.append(os.path.normpath(os.path.expandvars(os.path.expanduser(full))))
        # is_default: ComfyUI inserts each path at the front in turn, so the last one listed ends up first
        out[key] = paths[::-1] + out.get(key, []) if first else out.get(key, []) + paths


def extra_model_paths(path: Path) -> dict:
    """``{folder name: [paths]}`` from one ``extra_paths.yaml`` / ``extra_model_paths.yaml``; relative paths are
    relative to the file's folder. Raises ``OSError`` / ``yaml.YAMLError`` / ``ImportError`` (no PyYAML)."""
    import yaml
    config = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    out: dict = {}
    yaml_dir = os.path.dirname(os.path.abspath(path))
    for conf in (config.values() if isinstance(config, dict) else ()):
        if isinstance(conf, dict):
            _config_paths(conf, None, yaml_dir, out)
    return out


def locations_for(root: Optional[Path], extra_configs: Iterable = ()) -> Locations:
    """Default ComfyUI model folders of ``root`` merged with the yaml files that ComfyUI version reads
    (:func:`path_config_files`); ``extra_configs`` are files it was started with (``--extra-model-paths-config``)."""
    if root is None:
        return Locations()
    files, notes = path_config_files(root, extra_configs)
    extra: dict = {}
    read = []
    for f in files:
        try:
            found = extra_model_paths(f)
        except Exception as e:  # noqa: BLE001 - missing, broken or unreadable: said in the model paths row
            notes.append(f"{f} not read: {type(e).__name__}: {_first_line(e)}")
            continue
        read.append(str(f))
        for name, paths in found.items():
            extra.setdefault(name, []).extend(paths)
    folders = {}
    for name, sub in FOLDERS.items():
        folders[name] = [str(root / "models" / sub)] + [p for p in extra.get(name, []) if p]
    return Locations(root, comfyui_version(root), folders, read, notes)


# ---------------------------------------------------------------------------------------------------------------
# environment checks

def _version_tuple(v: str) -> Optional[tuple]:
    """``(major, minor, patch)`` compared as numbers (0.38.1 > 0.3.64 < 0.3.100); None when ``v`` has no
    ``N.N[.N]`` at its start (a suffix such as ``-dev`` or ``+git`` is ignored)."""
    m = re.match(r"\s*v?(\d+)\.(\d+)(?:\.(\d+))?", v or "")
    return tuple(int(x or 0) for x in m.groups()) if m else None


def check_comfyui(loc: Locations, tried: Iterable[str] = ()) -> Check:
    """Found, and its version against :data:`TESTED_COMFYUI`: same ok; older, newer or not comparable warn."""
    if loc.comfyui is None:
        return Check("ComfyUI", FAIL, f"not found (tried {', '.join(tried) or 'nothing'})",
                     "run from ComfyUI/custom_nodes/ComfyUI-InstantFamily, or pass --comfyui <ComfyUI folder>, or set "
                     "COMFYUI_PATH")
    v = loc.comfyui_version
    if v is None:
        return Check("ComfyUI", WARN, f"{loc.comfyui} (version unknown: no comfyui_version.py)",
                     f"update ComfyUI (git pull); this pack is tested with {TESTED_COMFYUI}")
    have, tested = _version_tuple(v), _version_tuple(TESTED_COMFYUI)
    if have is None:
        return Check("ComfyUI", WARN, f"{v} at {loc.comfyui}: version cannot be compared with the tested "
                     f"{TESTED_COMFYUI}", f"this pack is tested with ComfyUI {TESTED_COMFYUI}")
    if have < tested:
        return Check("ComfyUI", WARN, f"{v} at {loc.comfyui}",
                     f"older than the tested {TESTED_COMFYUI}; update ComfyUI (git pull, then pip install -r "
                     "requirements.txt)")
    if have > tested:
        return Check("ComfyUI", WARN, f"{v} at {loc.comfyui}: newer than tested ({TESTED_COMFYUI}): known changes "
                     f"handled: {'; '.join(KNOWN_CHANGES_HANDLED)}",
                     f"if something fails, report it with this report, or use ComfyUI {TESTED_COMFYUI}")
    return Check("ComfyUI", OK, f"{v} at {loc.comfyui} (the tested version)")


def check_model_paths(loc: Locations) -> list[Check]:
    """Which extra-paths yaml files the CLI read (and ignored); nothing when ComfyUI gave the folders (the node)."""
    if loc.comfyui is None or loc.path_configs is None:
        return []
    read = ", ".join(loc.path_configs) or f"none (no {EXTRA_PATHS} or {EXTRA_MODEL_PATHS}): default folders only"
    if loc.path_notes:
        return [Check("model paths", WARN, f"read {read}; " + "; ".join(loc.path_notes),
                      "move what you need into the file that is read, or fix it (ComfyUI reads the same files)")]
    return [Check("model paths", OK, f"read {read}")]


def check_torch(importer=importlib.import_module) -> Check:
    try:
        torch = importer("torch")
    except Exception as e:  # noqa: BLE001 - any import failure is the finding
        return Check("torch + CUDA", FAIL, f"torch does not import: {type(e).__name__}: {_first_line(e)}",
                     "install ComfyUI's torch (see ComfyUI's README); this pack never installs torch")
    cuda_build = getattr(getattr(torch, "version", None), "cuda", None)
    try:
        available = bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001
        available = False
    if available:
        try:
            name = torch.cuda.get_device_name(0)
        except Exception:  # noqa: BLE001
            name = "GPU"
        return Check("torch + CUDA", OK, f"torch {torch.__version__}, CUDA {cuda_build}: {name}")
    if cuda_build:
        return Check("torch + CUDA", WARN, f"torch {torch.__version__} built for CUDA {cuda_build}, but no GPU is "
                     "usable (driver missing or too old?)", "update the NVIDIA driver, or run ComfyUI with --cpu")
    mps = getattr(getattr(torch, "backends", None), "mps", None)
    if mps is not None and getattr(mps, "is_available", lambda: False)():
        return Check("torch + CUDA", OK, f"torch {torch.__version__}, Apple MPS")
    return Check("torch + CUDA", WARN, f"torch {torch.__version__}, CPU only (sampling will be slow)",
                 "for an NVIDIA GPU install a CUDA build of torch (see pytorch.org)")


def installed_dists(names: Iterable[str], version_of: Optional[Callable[[str], str]] = None) -> dict:
    """``{distribution: version}`` of those of ``names`` that are installed (``importlib.metadata``)."""
    from importlib import metadata
    version_of = version_of or metadata.version
    out = {}
    for n in names:
        try:
            out[n] = version_of(n)
        except metadata.PackageNotFoundError:
            continue
    return out


def check_onnxruntime(importer=importlib.import_module, version_of=None) -> list[Check]:
    dists = installed_dists(ORT_DISTS, version_of)
    listed = ", ".join(f"{k} {v}" for k, v in dists.items())
    rows = []
    if not dists:
        rows.append(Check("onnxruntime", FAIL, "not installed", "pip install onnxruntime   (or onnxruntime-gpu for "
                          "NVIDIA; never both)"))
    elif len(dists) > 1:
        gpu = "onnxruntime-gpu" in dists
        rows.append(Check("onnxruntime", FAIL, f"{len(dists)} onnxruntime distributions installed ({listed}); they "
                          "share one 'onnxruntime' folder and overwrite each other",
                          (ORT_FIX_GPU if gpu else ORT_FIX_CPU).format(dists=" ".join(dists))))
    else:
        rows.append(Check("onnxruntime", OK, listed))
    try:
        ort = importer("onnxruntime")
        providers = list(ort.get_available_providers())
    except Exception as e:  # noqa: BLE001
        if dists:
            rows.append(Check("onnxruntime providers", FAIL, f"import onnxruntime fails: {type(e).__name__}: "
                              f"{_first_line(e)}", f"reinstall it: pip install --force-reinstall "
                              f"{' '.join(dists) if len(dists) == 1 else 'onnxruntime'}"))
        return rows
    detail = ", ".join(providers)
    if "onnxruntime-gpu" in dists and "CUDAExecutionProvider" not in providers:
        rows.append(Check("onnxruntime providers", WARN, f"{detail} — onnxruntime-gpu without CUDA", "install the "
                          "CUDA/cuDNN versions your onnxruntime-gpu needs (see onnxruntime.ai), or use the CPU "
                          "provider (face analysis is fast on the CPU)"))
    else:
        rows.append(Check("onnxruntime providers", OK, detail))
    return rows


def check_insightface(importer=importlib.import_module) -> Check:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # 0.7.3 imports albumentations, which phones home
    try:
        mod = importer("insightface")
        importer("insightface.app")
    except Exception as e:  # noqa: BLE001
        text = f"{type(e).__name__}: {e}"
        if any(m in text for m in NUMPY_ABI_MARKERS):
            return Check("insightface", FAIL, f"numpy ABI mismatch at import ({_first_line(e)}): the installed "
                         f"insightface was compiled against another numpy major version ({_numpy_version(importer)})",
                         "pip install -U \"insightface>=1.0\"   (pure Python, no compiled parts); or keep 0.7.3 "
                         "and rebuild it: pip install --force-reinstall --no-binary insightface insightface==0.7.3")
        if isinstance(e, ModuleNotFoundError) and getattr(e, "name", "") == "insightface":
            return Check("insightface", FAIL, "not installed", "pip install insightface")
        return Check("insightface", FAIL, f"import fails: {type(e).__name__}: {_first_line(e)}",
                     "pip install --force-reinstall insightface   (and see the error for the module it needs)")
    return Check("insightface", OK, f"{getattr(mod, '__version__', '?')}")


def _numpy_version(importer) -> str:
    try:
        return f"numpy {importer('numpy').__version__} installed"
    except Exception:  # noqa: BLE001
        return "numpy does not import"


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else ""


def _model_file_error(message: str) -> ValueError:
    """A :class:`~instantfamily_core.errors.ModelFileError` for a weights file the doctor rejects. The package's
    ``__init__`` imports torch and this module must still run when torch is broken, so then it is a plain
    ``ValueError`` with the same message; either way the check that called it turns it into a FAIL row."""
    try:
        from instantfamily_core.errors import ModelFileError
    except Exception:  # noqa: BLE001 - a broken torch is reported by its own row
        return ValueError(message)
    return ModelFileError(message)


# ---------------------------------------------------------------------------------------------------------------
# model files

@dataclass
class Models:
    """What the model checks found, for the mode summary (per base where it matters: ``"SD1.5"``, ``"SDXL"``)."""

    packs: dict = field(default_factory=dict)        # valid pack name → folder
    checkpoints: dict = field(default_factory=dict)  # valid InstantFamily file → face pack it needs
    faceid: dict = field(default_factory=dict)       # valid FaceID file → (variant, has LoRA, base)
    faceid_loras: list = field(default_factory=list)
    clip_vision: list = field(default_factory=list)
    vit_h: list = field(default_factory=list)        # CLIP vision files that are ViT-H (what FaceID Plus reads)
    openpose: list = field(default_factory=list)     # usable SD1.5 OpenPose ControlNets
    openpose_sdxl: list = field(default_factory=list)  # usable SDXL OpenPose ControlNets
    bases: list = field(default_factory=list)        # SD1.5 checkpoints
    bases_sdxl: list = field(default_factory=list)   # SDXL base checkpoints
    instantid: list = field(default_factory=list)    # valid InstantID adapters (ip-adapter.bin)
    identitynet: list = field(default_factory=list)  # usable InstantID IdentityNets

    def faceid_loras_for(self, base: str) -> list:
        """Companion LoRA files of a base, told by name as published (``…_sd15_lora``, ``…_sdxl_lora``)."""
        return [p for p in self.faceid_loras if ("sdxl" in p.name.lower()) == (base == "SDXL")]

    def usable_faceid(self, base: str) -> list:
        """FaceID files of ``base`` that have their LoRA (inside, or a companion file; Portrait needs none) and,
        for Plus, a ViT-H image encoder."""
        return [n for n, (v, lora, b) in self.faceid.items() if b == base
                and (lora or v == "portrait" or self.faceid_loras_for(base))
                and (v not in ("plus", "plusv2") or self.vit_h)]


def _walk(folder: Path):
    """Every path under ``folder``, following symlinked folders as ComfyUI's file lists do (``os.walk(...,
    followlinks=True)``), each real folder once (no symlink loops)."""
    seen = set()
    for top, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        yield from (Path(top) / n for n in names)


def _files(folders: Iterable[Path], exts=WEIGHT_EXTS, recursive: bool = True) -> list[Path]:
    out = []
    for d in folders:
        if not d.is_dir():
            continue
        it = _walk(d) if recursive else d.iterdir()
        out += sorted(p for p in it if p.is_file() and p.name.lower().endswith(exts) and not p.name.startswith("."))
    return out


def _where(folders: list[Path]) -> str:
    return str(folders[0]) if folders else "the ComfyUI models folder"


def check_face_packs(loc: Locations, models: Models) -> list[Check]:
    roots = loc.get("insightface")
    try:
        from instantfamily_core.errors import InstantFamilyError, NestedPackError
        from instantfamily_core.faces.packs import list_packs, models_dir, resolve_pack
    except Exception as e:  # noqa: BLE001 - e.g. torch or onnx broken
        return [Check("face packs", FAIL, f"cannot check: {type(e).__name__}: {_first_line(e)}",
                      "fix the rows above (torch / numpy / onnx) first")]
    rows = []
    for root in roots:
        for stray in sorted(p for p in root.iterdir() if p.is_dir() and p.name != "models") if root.is_dir() else []:
            if any(stray.glob("*.onnx")) or any(stray.glob("*/*.onnx")):
                rows.append(Check(f"face pack {stray.name}", FAIL, f"{stray} is outside {models_dir(root)}",
                                  f"move it to {models_dir(root) / stray.name} (insightface reads "
                                  "<root>/models/<pack>)"))
        for name in list_packs(root, include_nested=True):
            try:
                pack = resolve_pack(root, name)
            except NestedPackError as e:
                rows.append(Check(f"face pack {name}", FAIL, "nested one folder too deep", str(e)))
            except InstantFamilyError as e:
                rows.append(Check(f"face pack {name}", FAIL, "missing or broken files", str(e)))
            except Exception as e:  # noqa: BLE001 - onnx not importable, permissions, ...
                rows.append(Check(f"face pack {name}", FAIL, f"cannot be read: {type(e).__name__}: {_first_line(e)}",
                                  "pip install onnx, and check the files are readable"))
            else:
                models.packs.setdefault(name, pack.path)
                rows.append(Check(f"face pack {name}", OK, f"{pack.path}: detector {pack.detector.name}, "
                                  f"recognizer {pack.recognizer.name}"))
    if not models.packs and not rows:
        where = ", ".join(str(models_dir(r)) for r in roots) or "(no folder)"
        rows.append(Check("face packs", FAIL, f"none in {where}",
                          f"download antelopev2 (InstantFamily checkpoints) and/or buffalo_l (FaceID) and unzip each "
                          f"so its .onnx files lie in {models_dir(roots[0]) if roots else 'models/insightface/models'}"
                          "/<pack>/"))
    return rows


def check_checkpoints(loc: Locations, models: Models) -> list[Check]:
    folders = loc.get("instantfamily")
    files = [p for p in _files(folders, (".safetensors",)) if "identities" not in p.relative_to(
        next(f for f in folders if _is_under(p, f))).parts[:-1]]
    try:
        from instantfamily_core.checkpoint import load_checkpoint
        from instantfamily_core.errors import InstantFamilyError
    except Exception as e:  # noqa: BLE001
        return [Check("InstantFamily checkpoints", FAIL, f"cannot check: {type(e).__name__}: {_first_line(e)}",
                      "fix the rows above first")] if files else []
    rows = []
    for p in files:
        try:
            ck = load_checkpoint(str(p))
        except InstantFamilyError as e:
            rows.append(Check(f"checkpoint {p.name}", FAIL, str(e), f"re-export it (python training/export.py) or "
                              f"remove it from {p.parent}"))
            continue
        except Exception as e:  # noqa: BLE001 - out of memory, permissions
            rows.append(Check(f"checkpoint {p.name}", FAIL, f"cannot load: {type(e).__name__}: {_first_line(e)}",
                              f"check the file, or remove it from {p.parent}"))
            continue
        layout_ok, why = _controlnet_layout_ok(set(ck.controlnet), ck.meta.controlnet_layout)
        if not layout_ok:
            rows.append(Check(f"checkpoint {p.name}", FAIL, f"ControlNet tensors do not match its "
                              f"controlnet_layout={ck.meta.controlnet_layout!r}: {why}",
                              "re-export it with training/export.py"))
            continue
        models.checkpoints[p.name] = ck.meta.face_pack
        rows.append(Check(f"checkpoint {p.name}", OK, f"schema v1, face pack {ck.meta.face_pack or '?'}, "
                          f"{ck.meta.max_identities} slots, mask {ck.meta.mask_mode}, ControlNet "
                          f"{ck.meta.controlnet_layout}"))
    return rows


def _is_under(p: Path, folder: Path) -> bool:
    try:
        p.relative_to(folder)
        return True
    except ValueError:
        return False


def _controlnet_layout_ok(keys: set, layout: str) -> tuple[bool, str]:
    """The keys ComfyUI's ControlNet loader recognises a layout by."""
    if layout == "diffusers":
        want = "controlnet_cond_embedding.conv_in.weight"
    else:
        want = "input_hint_block.0.weight"
        keys = {k[len("control_model."):] if k.startswith("control_model.") else k for k in keys}
    return (want in keys, f"no {want!r}")


def _clip_width(p: Path) -> Optional[int]:
    """Width of a CLIP vision file (ViT-H 1280, ViT-L 1024, ViT-bigG 1664) from its safetensors header: the patch
    embedding's output channels (transformers ``…embeddings.patch_embedding.weight``, OpenCLIP ``visual.conv1.
    weight``); pickles and unknown layouts by name (``ViT-H``)."""
    if p.name.lower().endswith(".safetensors"):
        try:
            shapes = _tensor_shapes(p)
        except Exception:  # noqa: BLE001 - unreadable: ComfyUI will say
            return None
        for k, shape in shapes.items():
            if k.endswith("embeddings.patch_embedding.weight") or k.endswith("visual.conv1.weight"):
                return int(shape[0])
    name = p.name.lower().replace("_", "-")
    return 1280 if "vit-h" in name else None


def _read_adapter(p: Path, validate, load):
    """A file's validated adapter weights — the loader node's check (``validate(image_proj, ip_adapter, name)`` of
    ``instantfamily_core.faceid`` or ``.instantid``). A ``.bin`` (zip) is memory-mapped, so a 1.5 GB SDXL file is
    not read into memory; anything unusual goes through ``load(path)`` for its message."""
    if p.name.lower().endswith(".bin"):
        import zipfile

        import torch
        if zipfile.is_zipfile(p):
            try:
                data = torch.load(str(p), map_location="cpu", weights_only=True, mmap=True)
            except Exception:  # noqa: BLE001 - load() reports it
                data = None
            if isinstance(data, dict) and isinstance(data.get("image_proj"), dict) and \
                    isinstance(data.get("ip_adapter"), dict):
                return validate(dict(data["image_proj"]), dict(data["ip_adapter"]), p.name)
    return load(str(p))


def _read_faceid(p: Path):
    from instantfamily_core.faceid import load_faceid, validate
    return _read_adapter(p, validate, load_faceid)


def check_faceid(loc: Locations, models: Models) -> list[Check]:
    """IP-Adapter-FaceID files in ``ipadapter`` (names with 'faceid'; SD1.5 and SDXL), their LoRAs, CLIP ViT-H for
    Plus."""
    files = [p for p in _files(loc.get("ipadapter")) if "faceid" in p.name.lower() and not
             p.name.lower().endswith("_lora.safetensors")]
    models.faceid_loras = [p for p in _files(loc.get("loras"), (".safetensors",))
                           if "faceid" in p.name.lower() and p.name.lower().endswith("_lora.safetensors")]
    models.clip_vision = _files(loc.get("clip_vision"))
    models.vit_h = [p for p in models.clip_vision if _clip_width(p) == 1280]
    rows = []
    try:
        importlib.import_module("instantfamily_core.faceid")  # torch broken: said once, not per file
    except Exception as e:  # noqa: BLE001 - torch broken
        return [Check("FaceID files", FAIL, f"cannot check: {type(e).__name__}: {_first_line(e)}",
                      "fix the rows above first")] if files else []
    for p in files:
        try:
            w = _read_faceid(p)  # container, base, variant, every key and shape (the FaceID loader node's check)
            variant, lora, base = w.variant, w.has_lora, w.base
        except Exception as e:  # noqa: BLE001 - typed FaceIDFileError, or anything a corrupt file raises
            rows.append(Check(f"FaceID {p.name}", FAIL, _first_line(e) or type(e).__name__,
                              f"download it again from {FACEID_DOWNLOAD} or remove it from {p.parent}"))
            continue
        models.faceid[p.name] = (variant, lora, base)
        needs = []
        if variant in ("faceid", "plus", "plusv2") and not lora and not models.faceid_loras_for(base):
            tag = "sdxl" if base == "SDXL" else "sd15"
            needs.append(f"its LoRA (…_{tag}_lora.safetensors from {FACEID_DOWNLOAD}) in {_where(loc.get('loras'))}")
        if variant in ("plus", "plusv2") and not models.vit_h:
            other = [f"{q.name} ({_clip_width(q) or '?'} wide)" for q in models.clip_vision]
            needs.append(f"{VIT_H} in {_where(loc.get('clip_vision'))}"
                         + (f" (found only {', '.join(other)}, not ViT-H)" if other else ""))
        if needs:
            rows.append(Check(f"FaceID {p.name}", WARN, f"{base} {variant}, valid; missing companion files",
                              "download " + "; and ".join(needs)))
        else:
            rows.append(Check(f"FaceID {p.name}", OK, f"{base} {variant}{', LoRA inside' if lora else ''}"))
    return rows


def _tensor_shapes(p: Path) -> dict:
    """``{key: shape}`` of a weights file: the safetensors header, or a tensors-only pickle (memory-mapped when the
    file allows)."""
    if p.name.lower().endswith(".safetensors"):
        from safetensors import safe_open
        with safe_open(str(p), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    import torch
    try:
        sd = torch.load(str(p), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) pickles cannot be memory-mapped
        sd = torch.load(str(p), map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise _model_file_error(f"expected a state dict, found {type(sd).__name__}")
    return {k: tuple(v.shape) for k, v in sd.items() if hasattr(v, "shape")}


def openpose_layout(shapes: dict) -> tuple[str, str]:
    """``(layout, base)``: ``ldm`` / ``diffusers`` (ComfyUI's detection keys) and ``SD1.5`` / ``SDXL`` (the width
    of its cross-attention: 768 / 2048 — thibaud's OpenPoseXL2 and xinsir's SDXL files have diffusers keys); raises
    ModelFileError naming what is wrong (no ControlNet keys, not an RGB hint, SD2.x or another width)."""
    if "controlnet_cond_embedding.conv_in.weight" in shapes:
        hint = shapes["controlnet_cond_embedding.conv_in.weight"]
        ctx = next((s for k, s in shapes.items() if k.endswith("attn2.to_k.weight")), None)
        layout = "diffusers"
    else:
        prefix = "control_model." if "control_model.zero_convs.0.0.weight" in shapes else ""
        if prefix + "zero_convs.0.0.weight" not in shapes:
            raise _model_file_error("no ControlNet keys (neither ldm 'zero_convs.0.0.weight' nor diffusers "
                                    "'controlnet_cond_embedding.conv_in.weight')")
        hint = shapes.get(prefix + "input_hint_block.0.weight")
        ctx = next((s for k, s in shapes.items() if k.startswith(prefix) and k.endswith("attn2.to_k.weight")), None)
        layout = "ldm"
    if hint is None or len(hint) != 4 or hint[1] != 3:
        raise _model_file_error(f"the hint input takes {hint[1] if hint and len(hint) == 4 else '?'} channels, an "
                                "OpenPose ControlNet takes an RGB image (3)")
    width = int(ctx[1]) if ctx is not None and len(ctx) == 2 else None
    if width not in (768, 2048):
        kind = f" ({CONTEXT_BASES[width]})" if width in CONTEXT_BASES else ""
        raise _model_file_error(f"cross-attention width {width if width else '?'}{kind}; SD1.5 ControlNets have 768, "
                                "SDXL ControlNets 2048")
    if width == 2048:  # SDXL also reads the pooled text + size embedding (ADM, 2816 wide): label_emb / add_embedding
        adm = shapes.get("add_embedding.linear_1.weight") if layout == "diffusers" else \
            shapes.get(prefix + "label_emb.0.0.weight")
        if adm is None or len(adm) != 2 or adm[1] != 2816:
            raise _model_file_error("cross-attention width 2048 but no SDXL size/pooled-text embedding (2816-wide "
                                    f"{'add_embedding.linear_1' if layout == 'diffusers' else 'label_emb.0.0'}); "
                                    "not an SDXL ControlNet")
    return layout, CONTEXT_BASES[width]


def check_openpose(loc: Locations, models: Models) -> list[Check]:
    """``*openpose*`` ControlNets: SD1.5 (control_v11p_sd15_openpose) and SDXL (thibaud OpenPoseXL2, xinsir)."""
    folders = loc.get("controlnet")
    cands = [p for p in _files(folders) if "openpose" in str(p).lower()]
    rows = []
    for p in cands:
        if p.parent != p and p.name.startswith("diffusion_pytorch_model") and not (p.parent / "config.json").is_file():
            rows.append(Check(f"OpenPose {p.parent.name}/{p.name}", FAIL, "diffusers weights without config.json",
                              f"put the model's config.json next to it in {p.parent}"))
            continue
        label = f"{p.parent.name}/{p.name}" if p.name.startswith("diffusion_pytorch_model") else p.name
        try:
            shapes = _tensor_shapes(p)
            if "lora_controlnet" in shapes:
                rows.append(Check(f"OpenPose {label}", WARN, "a Control-LoRA (ComfyUI applies it onto the model it "
                                  "runs with; its base is not checked here, and training/generate.py does not read it)",
                                  f"for the SDXL FaceID mode use {OPENPOSE_SDXL_DOWNLOAD}"))
                continue
            layout, base = openpose_layout(shapes)
        except Exception as e:  # noqa: BLE001 - unreadable container or wrong model
            rows.append(Check(f"OpenPose {label}", FAIL, f"not a usable SD1.5 or SDXL ControlNet: {_first_line(e)}",
                              f"download {OPENPOSE_DOWNLOAD} (SD1.5) or {OPENPOSE_SDXL_DOWNLOAD} into "
                              f"{_where(folders)}"))
            continue
        (models.openpose_sdxl if base == "SDXL" else models.openpose).append(p)
        rows.append(Check(f"OpenPose {label}", OK, f"{base} ControlNet, {layout} layout"))
    return rows


INSTANTID_DOWNLOAD = "https://huggingface.co/InstantX/InstantID"
IDENTITYNET_NAMES = ("instantid", "instant_id", "instant-id", "identitynet")
IDENTITYNET_DOWNLOAD = (f"InstantID's IdentityNet (ControlNetModel/diffusion_pytorch_model.safetensors from "
                        f"{INSTANTID_DOWNLOAD}, renamed e.g. instantid-identitynet-sdxl.safetensors)")


def check_instantid(loc: Locations, models: Models) -> list[Check]:
    """InstantID: every weights file in ``instantid`` (``ip-adapter.bin``: every key and shape, the loader node's
    check) and the IdentityNet — a ControlNet in ``controlnet`` whose path names InstantID or IdentityNet (its
    weights are those of any SDXL ControlNet, so the name is what tells it apart)."""
    rows = []
    files = _files(loc.get("instantid"))
    if files:
        try:
            from instantfamily_core.instantid import load_instantid, validate
        except Exception as e:  # noqa: BLE001 - torch broken: said once, not per file
            return [Check("InstantID files", FAIL, f"cannot check: {type(e).__name__}: {_first_line(e)}",
                          "fix the rows above first")]
    for p in files:
        try:
            _read_adapter(p, validate, load_instantid)
        except Exception as e:  # noqa: BLE001 - typed InstantIDFileError, or anything a corrupt file raises
            rows.append(Check(f"InstantID {p.name}", FAIL, _first_line(e) or type(e).__name__,
                              f"download ip-adapter.bin again from {INSTANTID_DOWNLOAD} or remove it from "
                              f"{p.parent}"))
            continue
        models.instantid.append(p)
        rows.append(Check(f"InstantID {p.name}", OK, "SDXL adapter: Resampler and 70 attention pairs"))
    folders = loc.get("controlnet")
    for p in _files(folders):
        rel = next((p.relative_to(f) for f in folders if _is_under(p, f)), Path(p.name))
        if not any(w in str(rel).lower() for w in IDENTITYNET_NAMES):
            continue
        label = f"{p.parent.name}/{p.name}" if p.name.startswith("diffusion_pytorch_model") else p.name
        try:
            layout, base = openpose_layout(_tensor_shapes(p))
            if base != "SDXL":
                raise _model_file_error(f"a {base} ControlNet; the IdentityNet is an SDXL one")
        except Exception as e:  # noqa: BLE001 - unreadable container or wrong model
            rows.append(Check(f"IdentityNet {label}", FAIL, f"not an SDXL ControlNet: {_first_line(e)}",
                              f"download {IDENTITYNET_DOWNLOAD} into {_where(folders)}"))
            continue
        models.identitynet.append(p)
        rows.append(Check(f"IdentityNet {label}", OK, f"SDXL ControlNet, {layout} layout"))
    return rows


def checkpoint_base(p: Path) -> Optional[str]:
    """``"SD1.5"`` / ``"SDXL"`` / another label for a single-file checkpoint, from its safetensors header: the width
    the UNet's cross-attention reads (768 SD1.5, 1024 SD2.x, 2048 SDXL base; the SDXL refiner reads 1280) and
    SDXL's second text encoder (``conditioner.embedders.1``). None: not a UNet checkpoint (or unreadable)."""
    try:
        from safetensors import safe_open
        with safe_open(str(p), framework="pt") as f:
            keys = list(f.keys())
            ctx = next((k for k in keys if k.startswith("model.diffusion_model.") and
                        k.endswith("attn2.to_k.weight")), None)
            width = int(f.get_slice(ctx).get_shape()[1]) if ctx else None
    except Exception:  # noqa: BLE001 - not ours to judge; ComfyUI will say
        return None
    if width == 768:
        return "SD1.5"
    if width == 2048 and any(k.startswith("conditioner.embedders.1.") for k in keys):
        return "SDXL"
    if width == 1280:
        return "SDXL refiner"
    return CONTEXT_BASES.get(width) if width else None


def check_bases(loc: Locations, models: Models) -> list[Check]:
    """SD1.5 and SDXL base checkpoints in ``checkpoints`` (safetensors headers; pickles count as SD1.5 unopened)."""
    files = _files(loc.get("checkpoints"), (".safetensors", ".ckpt"))
    sd15, sdxl = [], []
    for p in files:
        if not p.name.endswith(".safetensors"):
            sd15.append(p)  # pickles are not opened here (slow, and ComfyUI reads them anyway)
            continue
        base = checkpoint_base(p)
        if base == "SD1.5":
            sd15.append(p)
        elif base == "SDXL":
            sdxl.append(p)
    models.bases, models.bases_sdxl = sd15, sdxl
    where = _where(loc.get("checkpoints"))

    def listed(ps):
        return ", ".join(p.name for p in ps[:3]) + (" …" if len(ps) > 3 else "")
    rows = []
    if sd15:
        rows.append(Check("SD1.5 checkpoint", OK, listed(sd15)))
    elif sdxl:  # an SDXL-only install: fine for the SDXL FaceID mode
        rows.append(Check("SD1.5 checkpoint", WARN, f"none in {where} (InstantFamily checkpoints and the SD1.5 FaceID "
                          "mode need one)", "download an SD1.5 checkpoint (e.g. v1-5-pruned-emaonly.safetensors) "
                          f"into {where} for those modes"))
    else:
        rows.append(Check("SD1.5 checkpoint", FAIL, f"no SD1.5 model in {where}",
                          f"download an SD1.5 checkpoint (e.g. v1-5-pruned-emaonly.safetensors) into {where}"))
    sdxl_wanted = any(b == "SDXL" for _, _, b in models.faceid.values()) or bool(
        models.openpose_sdxl or models.instantid or models.identitynet)
    if sdxl:
        rows.append(Check("SDXL checkpoint", OK, listed(sdxl)))
    elif sdxl_wanted:
        rows.append(Check("SDXL checkpoint", WARN, f"no SDXL base in {where} (the SDXL FaceID and InstantID modes need one)",
                          f"download {SDXL_BASE_DOWNLOAD} into {where}"))
    return rows


def _faceid_missing(loc: Locations, models: Models, base: str) -> list[str]:
    """What the FaceID mode of ``base`` still needs (empty: ready)."""
    missing = []
    files = [n for n, (_, _, b) in models.faceid.items() if b == base]
    if not files:
        missing.append(f"{FACEID_FILES[base]} in {_where(loc.get('ipadapter'))}")
    elif not models.usable_faceid(base):
        plus_only = all(models.faceid[n][0] in ("plus", "plusv2") for n in files)
        missing.append(f"{VIT_H} for {', '.join(files)}" if plus_only and not models.vit_h else
                       f"the companion files of the {base} FaceID rows above")
    if not models.packs:
        missing.append(f"face pack buffalo_l in {_where(loc.get('insightface'))}/models/")
    if base == "SDXL":
        if not models.openpose_sdxl:
            missing.append(f"{OPENPOSE_SDXL_DOWNLOAD} in {_where(loc.get('controlnet'))}")
        if not models.bases_sdxl:
            missing.append(f"{SDXL_BASE_DOWNLOAD} in {_where(loc.get('checkpoints'))}")
    else:
        if not models.openpose:
            missing.append(f"{OPENPOSE_DOWNLOAD} in {_where(loc.get('controlnet'))}")
        if not models.bases:
            missing.append(f"an SD1.5 checkpoint in {_where(loc.get('checkpoints'))}")
    return missing


def mode_rows(loc: Locations, models: Models) -> list[Check]:
    """Which way of generating is ready — InstantFamily, public weights (FaceID) on SD1.5, on SDXL, InstantID; FAIL
    when none is."""
    rows = []
    if_missing = []
    if not models.checkpoints:
        if_missing.append(f"an InstantFamily checkpoint in {_where(loc.get('instantfamily'))} (train + export one: "
                          "training/train.py)")
    else:
        packs = {p for p in models.checkpoints.values() if p}
        absent = sorted(p for p in packs if p not in models.packs)
        if absent and len(absent) == len(packs):
            if_missing.append(f"face pack {' or '.join(absent)} (what the checkpoints were trained with) in "
                              f"{_where(loc.get('insightface'))}/models/")
    if not models.bases:
        if_missing.append(f"an SD1.5 checkpoint in {_where(loc.get('checkpoints'))}")
    fid_note = ""
    if models.packs and "buffalo_l" not in models.packs:  # works, but FaceID was trained on buffalo_l's embeddings
        fid_note = (f"with face pack {sorted(models.packs)[0]}; FaceID was trained with buffalo_l: put buffalo_l in "
                    f"{_where(loc.get('insightface'))}/models/ for the identities it knows")
    if_ready = not if_missing
    rows.append(Check("mode: InstantFamily", OK if if_ready else WARN,
                      "ready" if if_ready else "not ready", "" if if_ready else "needs " + "; ".join(if_missing)))
    ready = [if_ready]
    for base in BASES:
        missing = _faceid_missing(loc, models, base)
        name = f"mode: public weights (FaceID {base})"
        if not missing:
            rows.append(Check(name, WARN if fid_note else OK, "ready", fid_note))
        else:
            rows.append(Check(name, WARN, "not ready", "needs " + "; ".join(missing)))
        ready.append(not missing)
    iid_missing = []
    if not models.instantid:
        iid_missing.append(f"ip-adapter.bin from {INSTANTID_DOWNLOAD} in {_where(loc.get('instantid'))}")
    if not models.identitynet:
        iid_missing.append(f"{IDENTITYNET_DOWNLOAD} in {_where(loc.get('controlnet'))}")
    if "antelopev2" not in models.packs:
        iid_missing.append(f"face pack antelopev2 (what InstantID was trained with) in "
                           f"{_where(loc.get('insightface'))}/models/")
    if not models.bases_sdxl:
        iid_missing.append(f"{SDXL_BASE_DOWNLOAD} in {_where(loc.get('checkpoints'))}")
    rows.append(Check("mode: InstantID (SDXL)", WARN if iid_missing else OK, "not ready" if iid_missing else "ready",
                      "needs " + "; ".join(iid_missing) if iid_missing else ""))
    ready.append(not iid_missing)
    if not any(ready):
        rows.append(Check("ready to generate", FAIL, "no mode has all its files",
                          "complete one of the mode rows above"))
    return rows


# ---------------------------------------------------------------------------------------------------------------

def run_checks(loc: Locations, tried: Iterable[str] = (), importer=importlib.import_module, version_of=None,
               progress: Optional[Callable[[str], None]] = None) -> list[Check]:
    """Every check, in order. ``importer`` / ``version_of`` are ``importlib.import_module`` /
    ``importlib.metadata.version`` unless replaced (tests simulate broken installs with them)."""
    steps = [
        ("ComfyUI", lambda: [check_comfyui(loc, tried)] + check_model_paths(loc)),
        ("torch", lambda: [check_torch(importer)]),
        ("onnxruntime", lambda: check_onnxruntime(importer, version_of)),
        ("insightface", lambda: [check_insightface(importer)]),
    ]
    models = Models()
    if loc.comfyui is not None or loc.folders:
        steps += [
            ("face packs", lambda: check_face_packs(loc, models)),
            ("checkpoints", lambda: check_checkpoints(loc, models)),
            ("FaceID", lambda: check_faceid(loc, models)),
            ("OpenPose ControlNet", lambda: check_openpose(loc, models)),
            ("InstantID", lambda: check_instantid(loc, models)),
            ("base checkpoints", lambda: check_bases(loc, models)),
            ("modes", lambda: mode_rows(loc, models)),
        ]
    rows: list[Check] = []
    for name, step in steps:
        if progress:
            progress(name)
        try:
            rows += step()
        except Exception as e:  # noqa: BLE001 - a doctor must finish its report
            rows.append(Check(name, FAIL, f"the check itself failed: {type(e).__name__}: {_first_line(e)}",
                              "please report this with the output of the doctor"))
    return rows


def exit_code(rows: Iterable[Check]) -> int:
    return 1 if any(r.status == FAIL for r in rows) else 0


def format_report(rows: list[Check], width: int = 110) -> str:
    """A plain-text table (check | status | found), each fix on its own line under its row, and a verdict."""
    import textwrap
    name_w = min(max((len(r.name) for r in rows), default=5), 40)
    head = f"{'check':<{name_w}}  {'status':<6}  found"
    lines = ["InstantFamily doctor", "", head, "-" * min(width, max(len(head), 60))]
    indent = " " * (name_w + 10)
    for r in rows:
        detail = textwrap.wrap(r.detail, max(30, width - name_w - 10), break_on_hyphens=False,
                               break_long_words=False) or [""]
        lines.append(f"{r.name[:name_w]:<{name_w}}  {r.status:<6}  {detail[0]}")
        lines += [indent + d for d in detail[1:]]
        if r.fix:
            fix = textwrap.wrap("fix: " + r.fix, max(30, width - name_w - 10), break_on_hyphens=False,
                                break_long_words=False)
            lines += [indent + f for f in fix]
    failed = [r.name for r in rows if r.status == FAIL]
    lines += ["", f"{len(failed)} problem(s) to fix: {', '.join(failed)}" if failed else
              "everything needed is there"]
    return "\n".join(lines)


def main_report(loc: Locations, tried: Iterable[str] = (), **kw) -> tuple[str, int]:
    rows = run_checks(loc, tried, **kw)
    return format_report(rows), exit_code(rows)


if __name__ == "__main__":  # pragma: no cover - use tools/doctor.py
    sys.exit("run: python tools/doctor.py")
