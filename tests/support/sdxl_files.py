"""SDXL stand-ins for tests: ComfyUI's SDXL UNet configuration, a tiny SDXL-topology model, a meta-device full-size
SDXL model, and random-valued full-size files in the published layouts of

* ``sd_xl_base_1.0.safetensors`` (stabilityai; SGM single file, fp16 + int64 ``position_ids``),
* xinsir/controlnet-openpose-sdxl-1.0 ``diffusion_pytorch_model.safetensors`` (diffusers keys, fp16, no
  ``__metadata__``, header padded to 8 bytes — 2,502,139,104 B published),
* thibaud/controlnet-openpose-sdxl-1.0 ``OpenPoseXL2.safetensors`` (diffusers keys without prefix, fp32, no
  ``__metadata__``, header *not* padded — 5,004,167,829 B published),
* InstantX/InstantID ``ControlNetModel/diffusion_pytorch_model.safetensors``, the IdentityNet (the same diffusers
  SDXL ControlNet architecture, fp16, ``__metadata__ = {"format": "pt"}`` as diffusers' ``save_pretrained`` writes
  it, header padded — 2,502,139,136 B published).

The ControlNet key names come from diffusers' ``ControlNetModel`` built on the meta device from the published
config (:data:`SDXL_CONTROLNET_CONFIG`), not from ComfyUI's conversion table, so ComfyUI's loader reads them as an
independent reader. The checkpoint names come from ComfyUI's own modules on the meta device and its own save path
(``BaseModel.state_dict_for_saving`` → ``SDXL.process_clip_state_dict_for_saving``), like ComfyUI's CheckpointSave.

Values: seeded normal(0, 0.02) for matrices and kernels, **1 for the scale of every normalisation layer found by
type**, 0 for other vectors, ``arange(77)`` for ``position_ids``, ln(100) for ``logit_scale``. Files are written
tensor by tensor by :func:`write_safetensors_stream` (the library's byte layout, checked against
``safetensors.torch.save`` in the tests) in a fresh subprocess, cached in ``~/.cache/instantfamily/fixtures``
under versioned names (:data:`FIXTURE_VERSION`), never committed. Facts: ``shared/notes/sdxl-weights.md`` §0, §3-§5.
"""

from __future__ import annotations

import json
import math
import os
import struct

import torch

# ComfyUI 0.3.64's unet_config of SDXL base: what ``comfy.model_detection.detect_unet_config`` returns for
# sd_xl_base_1.0 plus the ``unet_extra_config`` that ``supported_models.SDXL`` adds (num_heads -1,
# num_head_channels 64), i.e. ``model_config_from_unet(...).unet_config`` without ``dtype``.
SDXL_UNET = {"use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
             "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "out_channels": 4,
             "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
             "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "channel_mult": [1, 2, 4],
             "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048,
             "use_temporal_resblock": False, "use_temporal_attention": False, "num_heads": -1,
             "num_head_channels": 64}

# SDXL's topology (same block ids, cross-attention at input 4,5,7,8, middle, output 0-5) at small widths/depths:
# levels 32/64/128 wide, 16-channel heads (4 heads at input 4,5 / output 3-5, 8 at input 7,8 / middle / output 0-2),
# depths 2 and 3; context 2048 and ADM 2816 as SDXL.
TINY_SDXL_UNET = dict(SDXL_UNET, model_channels=32, transformer_depth=[0, 0, 2, 2, 3, 3],
                      transformer_depth_output=[0, 0, 0, 2, 2, 2, 3, 3, 3], transformer_depth_middle=3,
                      num_head_channels=16)

# where SDXL's cross-attentions are: (block, id) -> number of transformer blocks, width, heads (d_head 64)
SDXL_ATTN2 = {**{("input", i): (2, 640, 10) for i in (4, 5)}, **{("input", i): (10, 1280, 20) for i in (7, 8)},
              ("middle", 0): (10, 1280, 20), **{("output", i): (10, 1280, 20) for i in (0, 1, 2)},
              **{("output", i): (2, 640, 10) for i in (3, 4, 5)}}
TINY_SDXL_ATTN2 = {**{("input", i): (2, 64, 4) for i in (4, 5)}, **{("input", i): (3, 128, 8) for i in (7, 8)},
                   ("middle", 0): (3, 128, 8), **{("output", i): (3, 128, 8) for i in (0, 1, 2)},
                   **{("output", i): (2, 64, 4) for i in (3, 4, 5)}}

# thibaud/controlnet-openpose-sdxl-1.0 config.json (the standard diffusers SDXL ControlNet; json.dumps(indent=2,
# sort_keys=True) + "\n" of it is the published 1,235 B file)
SDXL_CONTROLNET_CONFIG = {
    "_class_name": "ControlNetModel", "_diffusers_version": "0.20.0.dev0", "act_fn": "silu",
    "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280], "class_embed_type": None,
    "conditioning_channels": 3, "conditioning_embedding_out_channels": [16, 32, 96, 256],
    "controlnet_conditioning_channel_order": "rgb", "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "flip_sin_to_cos": True, "freq_shift": 0,
    "global_pool_conditions": False, "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1,
    "norm_eps": 1e-05, "norm_num_groups": 32, "num_attention_heads": None, "num_class_embeds": None,
    "only_cross_attention": False, "projection_class_embeddings_input_dim": 2816,
    "resnet_time_scale_shift": "default", "transformer_layers_per_block": [1, 2, 10], "upcast_attention": None,
    "use_linear_projection": True}

# published byte sizes (notes §0, §3, §5)
PUBLISHED_BYTES = {"checkpoint": 6_938_078_334, "openpose_xinsir": 2_502_139_104,
                   "openpose_thibaud": 5_004_167_829, "identitynet": 2_502_139_136}
# writer settings per ControlNet kind: tensor dtype, header padded to 8 bytes, __metadata__
CONTROLNET_LAYOUTS = {"openpose_xinsir": (torch.float16, True, None), "openpose_thibaud": (torch.float32, False, None),
                      "identitynet": (torch.float16, True, {"format": "pt"})}
STD = 0.02
FIXTURE_VERSION = 1
FILE_NAMES = {"checkpoint": f"sdxl_base_random_v{FIXTURE_VERSION}.safetensors",
              "openpose_xinsir": f"controlnet_openpose_sdxl_xinsir_random_v{FIXTURE_VERSION}.safetensors",
              "openpose_thibaud": f"OpenPoseXL2_thibaud_random_v{FIXTURE_VERSION}.safetensors",
              "identitynet": f"instantid_identitynet_random_v{FIXTURE_VERSION}.safetensors"}
GENERATED: dict = {}
"""``kind -> {"seconds", "peak_rss_mib"}`` of the writers this process ran (empty when the cache was warm)."""


def controlnet_config_json() -> str:
    """thibaud's ``config.json`` text, as diffusers writes it."""
    return json.dumps(SDXL_CONTROLNET_CONFIG, indent=2, sort_keys=True) + "\n"


# ---------------------------------------------------------------- in-memory models

def _norm_scales(module: torch.nn.Module) -> set:
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.BatchNorm2d)
    return {f"{n}.weight" if n else "weight" for n, m in module.named_modules()
            if isinstance(m, norms) and getattr(m, "weight", None) is not None}


def randomise(module: torch.nn.Module, seed: int, std: float = STD) -> torch.nn.Module:
    """Seeded values in place: normal(0, std) for matrices/kernels and biases, 1 for normalisation scales
    (found by type, so ResBlocks' ``in_layers.0`` count too)."""
    g = torch.Generator().manual_seed(seed)
    scales = _norm_scales(module)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name in scales:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def tiny_sdxl(seed: int = 0):
    """A ModelPatcher around a tiny SDXL-topology UNet (:data:`TINY_SDXL_UNET`, fp32, 22.3M parameters, most in
    the 2048-wide attn2 k/v) built with ``comfy.supported_models.SDXL(cfg).get_model({})``: cross-attentions at
    SDXL's places (:data:`TINY_SDXL_ATTN2`), context 2048, ADM ``y`` 2816, seeded values with norm scales 1.
    A 1×4×16×16 forward takes ~60 ms on one CPU thread."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    cfg = comfy.supported_models.SDXL(dict(TINY_SDXL_UNET))
    cfg.unet_config["num_head_channels"] = TINY_SDXL_UNET["num_head_channels"]  # BASE forces 64
    cfg.set_inference_dtype(torch.float32, None)
    base = cfg.get_model({})
    randomise(base.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(base, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def meta_sdxl():
    """A ModelPatcher around ComfyUI's full-size SDXL UNet with its parameters on the ``meta`` device (70 attn2;
    model sampling on the CPU). Enough for key maps, LoRA patches and hooks."""
    from .faceid_files import meta_patcher
    return meta_patcher("SDXL", SDXL_UNET)


def spatial_transformers(unet: torch.nn.Module) -> dict:
    """``(block, id) -> (n transformer blocks, width, heads, context width)`` of every
    ``comfy.ldm.modules.attention.SpatialTransformer`` in a ComfyUI UNet or ``cldm`` ControlNet, with ComfyUI's
    block names (``input``/``middle``/``output``; the middle block is ``("middle", 0)``)."""
    from comfy.ldm.modules.attention import SpatialTransformer
    blocks = [("input", i, b) for i, b in enumerate(unet.input_blocks)] + [("middle", 0, unet.middle_block)]
    blocks += [("output", i, b) for i, b in enumerate(getattr(unet, "output_blocks", []))]
    out = {}
    for name, i, block in blocks:
        for m in block.modules():
            if isinstance(m, SpatialTransformer):
                assert (name, i) not in out, (name, i)
                a = m.transformer_blocks[0].attn2
                assert all(t.attn2.to_k.in_features == a.to_k.in_features for t in m.transformer_blocks)
                out[(name, i)] = (len(m.transformer_blocks), a.to_q.in_features, a.heads, a.to_k.in_features)
    return out


# ---------------------------------------------------------------- safetensors writer

# safetensors' Dtype order (the library writes tensors sorted by dtype, descending, then by name)
_DTYPE_RANK = ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64",
               "I64", "U64"]
_ST_NAMES = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.float16: "F16",
             torch.bfloat16: "BF16", torch.int32: "I32", torch.float32: "F32", torch.float64: "F64",
             torch.int64: "I64"}


def safetensors_header(specs, pad: bool = True, metadata: dict | None = None) -> tuple[bytes, list]:
    """``(8-byte length + JSON header, specs in file order)`` for ``specs`` = ``[(name, shape, torch dtype)]``,
    byte-identical to what the safetensors library writes (compact JSON, tensors ordered by dtype then name;
    ``pad=False`` gives the unpadded header of early-2023 writers)."""
    order = sorted(specs, key=lambda s: (-_DTYPE_RANK.index(_ST_NAMES[s[2]]), s[0]))
    header, off = {}, 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, shape, dtype in order:
        n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, order


def write_safetensors_stream(path: str, specs, make, pad: bool = True, metadata: dict | None = None) -> None:
    """Write a safetensors file tensor by tensor: ``make(name, shape, dtype)`` returns each tensor (in file order),
    which is written and dropped, so peak memory is one tensor, not the state dict."""
    head, order = safetensors_header(specs, pad, metadata)
    with open(path, "wb") as f:
        f.write(head)
        for name, shape, dtype in order:
            t = make(name, tuple(shape), dtype)
            assert tuple(t.shape) == tuple(shape) and t.dtype == dtype, (name, t.shape, t.dtype)
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data if t.numel() else b"")
            del t


def _filler(kinds: dict, seed: int, std: float = STD):
    g = torch.Generator().manual_seed(seed)

    def make(name, shape, dtype):
        kind = kinds[name]
        if kind == "normal":
            v = torch.randn(shape, generator=g) * std
        elif kind == "one":
            v = torch.ones(shape)
        elif kind == "arange":
            return torch.arange(math.prod(shape), dtype=dtype).reshape(shape)
        elif kind == "logit_scale":
            v = torch.full(shape, math.log(100.0))
        else:
            v = torch.zeros(shape)
        return v.to(dtype)
    return make


def _module_kinds(module: torch.nn.Module) -> dict:
    scales = _norm_scales(module)
    return {k: "one" if k in scales else "normal" if t.ndim > 1 else "zero" for k, t in module.state_dict().items()}


# ---------------------------------------------------------------- ControlNets (diffusers names)

def controlnet_specs(dtype: torch.dtype) -> tuple[list, dict]:
    """``([(name, shape, dtype)], name -> kind)`` of diffusers' ``ControlNetModel(**SDXL_CONTROLNET_CONFIG)``
    built on the meta device: 844 tensors, 1,251,014,160 parameters."""
    import diffusers
    cfg = {k: v for k, v in SDXL_CONTROLNET_CONFIG.items() if not k.startswith("_")}
    with torch.device("meta"):
        model = diffusers.ControlNetModel(**cfg)
    specs = [(k, tuple(t.shape), dtype) for k, t in model.state_dict().items()]
    return specs, _module_kinds(model)


def write_controlnet(kind: str, path: str, seed: int = 7) -> None:
    dtype, pad, metadata = CONTROLNET_LAYOUTS[kind]
    specs, kinds = controlnet_specs(dtype)
    write_safetensors_stream(path, specs, _filler(kinds, seed), pad=pad, metadata=metadata)


# ---------------------------------------------------------------- SDXL base single file

def sdxl_base_on_meta():
    """``(config, base model, SDXLClipModel, AutoencoderKL, state dict)`` of SDXL base on the meta device: ComfyUI's
    modules and its own save path (``state_dict_for_saving``) give sd_xl_base_1.0's single-file names and shapes."""
    import comfy.ldm.models.autoencoder
    import comfy.sdxl_clip
    import comfy.supported_models
    cfg = comfy.supported_models.SDXL(dict(SDXL_UNET))
    cfg.set_inference_dtype(torch.float16, None)
    vae_ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                    "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    with torch.device("meta"):
        base = cfg.get_model({})
        clip = comfy.sdxl_clip.SDXLClipModel(device="meta", dtype=torch.float16)
        vae = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=vae_ddconfig, embed_dim=4)
    return cfg, base, clip, vae, base.state_dict_for_saving(clip.state_dict(), vae.state_dict())


def checkpoint_specs() -> tuple[list, dict]:
    """``([(name, shape, dtype)], name -> kind)`` of sd_xl_base_1.0's single-file layout, from ComfyUI's SDXL
    UNet, ``SDXLClipModel`` and ``AutoencoderKL`` on the meta device through ComfyUI's own save path
    (``state_dict_for_saving``): 2515 tensors (UNet 1680, CLIP-L + OpenCLIP-bigG 587, VAE 248)."""
    cfg, base, clip, vae, full = sdxl_base_on_meta()
    clip_sd = clip.state_dict()
    kinds = {f"model.diffusion_model.{k}": v for k, v in _module_kinds(base.diffusion_model).items()}
    kinds.update({f"first_stage_model.{k}": v for k, v in _module_kinds(vae).items()})
    # the CLIP conversion renames, fuses q/k/v and transposes: send one-element markers through it
    codes = {"zero": 0.0, "one": 1.0, "normal": 2.0, "logit_scale": 3.0}
    clip_kinds = _module_kinds(clip)
    markers = {k: torch.full((1,) * t.ndim, codes["logit_scale" if k.endswith("logit_scale") else clip_kinds[k]])
               for k, t in clip_sd.items()}
    names = {v: k for k, v in codes.items()}
    for k, t in cfg.process_clip_state_dict_for_saving(markers).items():
        kinds[k] = "arange" if not t.is_floating_point() else names[float(t.flatten()[0])]
    assert set(kinds) == set(full), set(kinds) ^ set(full)
    specs = [(k, tuple(t.shape), torch.int64 if not t.is_floating_point() else torch.float16) for k, t in full.items()]
    return specs, kinds


def write_checkpoint(path: str, seed: int = 0) -> None:
    specs, kinds = checkpoint_specs()
    write_safetensors_stream(path, specs, _filler(kinds, seed))


# ---------------------------------------------------------------- subprocesses and cache

RESULT_MARK = "SDXL_FILES_RESULT "


def run_in_subprocess(fn: str, *args, host: bool = True, timeout: int = 1800) -> dict:
    """Call ``support.sdxl_files.<fn>(*args)`` in a fresh Python (ComfyUI host imported first when ``host``), so its
    memory goes back to the system; returns the function's JSON-able result plus ``seconds`` (wall time of the
    call) and ``peak_rss_mib`` (``ru_maxrss`` of that process)."""
    import subprocess
    import sys
    from pathlib import Path
    tests = Path(__file__).resolve().parents[1]
    code = (f"import sys, json, time, resource; sys.path[:0] = [{str(tests)!r}, {str(tests.parent)!r}]\n"
            + ("from tools.devkit.comfy_host import import_host; import_host()\n" if host else "")
            + "from support import sdxl_files as sf\n"
            f"t = time.perf_counter(); r = sf.{fn}(*{args!r}) or {{}}\n"
            "r = dict(r, seconds=time.perf_counter() - t,"
            " peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n"
            f"print({RESULT_MARK!r} + json.dumps(r), flush=True)\n")
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{fn}{args!r} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_MARK)][-1]
    return json.loads(line[len(RESULT_MARK):])


def generate_in_subprocess(kind: str, path: str) -> dict:
    """Write one full-size fixture (``checkpoint`` or a :data:`CONTROLNET_LAYOUTS` kind) in a fresh Python;
    returns ``{"seconds", "peak_rss_mib"}``. The ControlNet writers do not import ComfyUI."""
    if kind == "checkpoint":
        return run_in_subprocess("write_checkpoint", path)
    if kind in CONTROLNET_LAYOUTS:
        return run_in_subprocess("write_controlnet", kind, path, host=False)
    raise ValueError(kind)


def fixture_dir():
    from pathlib import Path
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "instantfamily" / "fixtures"
    cache.mkdir(parents=True, exist_ok=True)
    return cache


def cached_sdxl(kind: str) -> str:
    """Path of a full-size random SDXL fixture (``checkpoint`` 6.9 GB, ``openpose_xinsir`` 2.5 GB,
    ``openpose_thibaud`` 5.0 GB, ``identitynet`` 2.5 GB), generated once per machine in ``~/.cache/instantfamily/fixtures`` (XDG_CACHE_HOME
    respected; written under a temporary name, then renamed) — deterministic, never committed."""
    cache = fixture_dir()
    name = FILE_NAMES[kind]
    path = cache / name
    if not path.is_file():
        tmp = cache / f".{name}.{os.getpid()}.tmp.safetensors"
        try:
            GENERATED[kind] = generate_in_subprocess(kind, str(tmp))
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
    return str(path)


def read_header(path: str) -> tuple[int, dict]:
    """``(header length N, parsed JSON header)`` of a safetensors file, read directly (no library)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return n, json.loads(f.read(n))


# ---------------------------------------------------------------- probes (run them through run_in_subprocess)

_KEY_WORDS = ("missing", "unexpected", "leftover", "left over", "not loaded")


class _Capture:
    """Every ComfyUI log record from DEBUG up (root logger), kept as text."""

    def __init__(self):
        import logging

        class H(logging.Handler):
            def emit(h, record):
                self.records.append((record.levelname, record.getMessage()))
        self.records = []
        self.handler = H(level=logging.DEBUG)
        root = logging.getLogger()
        root.addHandler(self.handler)
        root.setLevel(logging.DEBUG)
        logging.debug("sdxl_files capture check: missing/unexpected/leftover")  # must be seen (see key_messages)

    def key_messages(self) -> list:
        """Records about missing/unexpected/leftover keys (without the self-check record, which must be there)."""
        hits = [f"{lv}: {m[:2000]}" for lv, m in self.records if any(w in m.lower() for w in _KEY_WORDS)]
        check = [h for h in hits if "sdxl_files capture check" in h]
        assert len(check) == 1, "the log capture does not see DEBUG records"
        return [h for h in hits if h not in check]


def probe_controlnet(path: str) -> dict:
    """Load a ControlNet file with ``comfy.controlnet.load_controlnet`` and report what ComfyUI made of it."""
    import comfy.controlnet
    cap = _Capture()
    cn = comfy.controlnet.load_controlnet(path)
    cm = cn.control_model
    st = spatial_transformers(cm)
    dtypes = sorted({str(p.dtype) for p in cm.parameters()})
    return {"class": type(cn).__name__, "control_model": type(cm).__module__ + "." + type(cm).__name__,
            "key_messages": cap.key_messages(), "attn2": sum(v[0] for v in st.values()),
            "context_widths": sorted({v[3] for v in st.values()}),
            "places": {f"{b}.{i}": list(v) for (b, i), v in st.items()}, "zero_convs": len(cm.zero_convs),
            "hint_channels": cm.input_hint_block[0].in_channels, "param_dtypes": dtypes,
            "params": sum(p.numel() for p in cm.parameters())}


def probe_checkpoint(path: str) -> dict:
    """Load the checkpoint with ``comfy.sd.load_checkpoint_guess_config`` (UNet as bf16 and CLIP as fp16 weights to
    keep memory near 12 GiB; VAE) and check, in one batched UNet call at a 8×8 latent, that its ε prediction depends
    on the latent and on the context, and that its VAE decodes to finite values."""
    import time

    import comfy.sd
    cap = _Capture()
    t0 = time.perf_counter()
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
        path, output_vae=True, output_clip=True, model_options={"dtype": torch.bfloat16},
        te_model_options={"dtype": torch.float16})
    base = model.model
    out = {"key_messages": cap.key_messages(), "model_config": type(base.model_config).__name__,
           "unet_config": {k: v for k, v in base.model_config.unet_config.items() if k != "dtype"},
           "clip": type(clip.cond_stage_model).__name__, "vae": type(vae.first_stage_model).__name__,
           "unet_params": sum(p.numel() for p in base.diffusion_model.parameters()),
           "clip_params": sum(p.numel() for p in clip.cond_stage_model.parameters()),
           "vae_params": sum(p.numel() for p in vae.first_stage_model.parameters()),
           "load_seconds": time.perf_counter() - t0}
    g = torch.Generator().manual_seed(0)
    x = torch.randn((1, 4, 8, 8), generator=g)
    ctx = torch.randn((1, 77, 2048), generator=g)
    y = torch.randn((1, 2816), generator=g)
    xs, ctxs = torch.cat([x, -x, x]), torch.cat([ctx, ctx, torch.randn(ctx.shape, generator=g)])
    sigma = torch.full((3,), 5.0)
    with torch.no_grad():  # ε = (x - denoised) / σ: apply_model returns x - σ·ε for this EPS model
        t0 = time.perf_counter()
        eps = (xs - base.apply_model(xs, sigma, c_crossattn=ctxs, y=y.repeat(3, 1)).float()) / 5.0
        out["unet_seconds"] = time.perf_counter() - t0
        img = vae.decode(torch.randn((1, 4, 8, 8), generator=g))
    out.update(unet_finite=bool(torch.isfinite(eps).all()), unet_std=float(eps[0].std()),
               unet_dx=float((eps[0] - eps[1]).abs().max()), unet_dctx=float((eps[0] - eps[2]).abs().max()),
               vae_shape=list(img.shape), vae_finite=bool(torch.isfinite(img).all()), vae_std=float(img.float().std()))
    return out


def meta_state_dict(path: str) -> dict:
    """The file's tensors as ``meta`` tensors of the stored shapes and dtypes (header only, no data read)."""
    dtypes = {v: k for k, v in _ST_NAMES.items()}
    _, header = read_header(path)
    return {k: torch.empty(v["shape"], dtype=dtypes[v["dtype"]], device="meta")
            for k, v in header.items() if k != "__metadata__"}


def checkpoint_key_report(path: str) -> dict:
    """What ComfyUI's single-file path makes of the file's header, on the meta device: the detected model config
    (``unet_prefix_from_state_dict`` + ``model_config_from_unet``) and the missing/unexpected keys of its UNet,
    CLIP (after ``process_clip_state_dict``) and VAE, and the keys no part takes. Shape mismatches raise."""
    import comfy.ldm.models.autoencoder
    import comfy.model_detection
    import comfy.utils
    sd = meta_state_dict(path)
    prefix = comfy.model_detection.unet_prefix_from_state_dict(sd)
    mc = comfy.model_detection.model_config_from_unet(sd, prefix)
    rep = {"prefix": prefix, "model_config": type(mc).__name__}
    if mc is None:
        return rep
    rep["unet_config"] = dict(mc.unet_config)
    mc.set_inference_dtype(torch.float16, None)
    rest = dict(sd)
    unet_sd = mc.process_unet_state_dict({k[len(prefix):]: rest.pop(k) for k in list(rest) if k.startswith(prefix)})
    vae_sd = mc.process_vae_state_dict(comfy.utils.state_dict_prefix_replace(
        rest, {k: "" for k in mc.vae_key_prefix}, filter_keys=True))
    clip_sd = mc.process_clip_state_dict(rest)  # pops what it takes
    clip_target = mc.clip_target(state_dict=sd)
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    with torch.device("meta"):
        unet = mc.get_model(sd, prefix).diffusion_model
        clip = clip_target.clip(device="meta", dtype=torch.float16)
        vae = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=ddconfig,
                                                         embed_dim=vae_sd["post_quant_conv.weight"].shape[1])
    for part, module, part_sd in (("unet", unet, unet_sd), ("clip", clip, clip_sd), ("vae", vae, vae_sd)):
        m, u = module.load_state_dict(part_sd, strict=False)
        rep[part] = {"keys": len(part_sd), "missing": sorted(m), "unexpected": sorted(u)}
    rep["clip_class"] = type(clip).__name__
    rep["left_over"] = sorted(rest)
    return rep


def tiny_sdxl_controlnet(seed: int = 1, wrap: bool = True):
    """A ControlNet of :data:`TINY_SDXL_UNET`'s encoder (cldm, hint 3 channels, ADM 2816, cross-attention reading
    2048-d context), random seeded; ``wrap``: as ComfyUI's CONTROL_NET (``comfy.controlnet.ControlNet``), like
    ControlNetLoader returns it."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.ops
    cfg = {k: v for k, v in TINY_SDXL_UNET.items() if k not in ("out_channels", "transformer_depth_output")}
    cfg["hint_channels"] = 3
    model = comfy.cldm.cldm.ControlNet(**cfg, operations=comfy.ops.disable_weight_init)
    randomise(model, seed)
    if not wrap:
        return model
    return comfy.controlnet.ControlNet(model, load_device=torch.device("cpu"))
