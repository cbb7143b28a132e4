"""Random-valued IP-Adapter-FaceID files in the published SD1.5 layout, written by key name and shape from the
public description (tencent-ailab/IP-Adapter module state dicts; h94/IP-Adapter-FaceID file listing) — not by
the pack's own layout code, so a mistake there cannot hide behind a matching fixture.

fp16 like the published files; ``.bin`` = nested pickle ``{"image_proj", "ip_adapter"}``, ``.safetensors`` = flat
with ``image_proj.``/``ip_adapter.`` prefixes. Generated at test time, never committed.
"""

from __future__ import annotations

import functools
import json
import os

import torch

from .sd15_layouts import FULL_UNET

# hidden width of diffusers' attention processor p (attn1 = 2b, attn2 = 2b+1) for transformer block b in
# processor order: down 0.0, 0.1, 1.0, 1.1, 2.0, 2.1, up 1.0-1.2, up 2.0-2.2, up 3.0-3.2, mid
BLOCK_WIDTHS = [320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320, 1280]
# SDXL (sdxl-weights note §4): down 1.0, 1.1 (2 transformer blocks each, 640), down 2.0, 2.1 (10 each, 1280),
# up 0.0-0.2 (10 each, 1280), up 1.0-1.2 (2 each, 640), mid (10, 1280) → 70 blocks, 140 processors
SDXL_BLOCK_WIDTHS = [640] * 4 + [1280] * 20 + [1280] * 30 + [640] * 6 + [1280] * 10
RANK = 128


def diffusers_block_widths(unet_config: dict, state_shapes: dict) -> list[int]:
    """Per transformer block in diffusers' processor order, its width — from ComfyUI's own diffusers → ldm key map
    (``comfy.utils.unet_to_diffusers``) and the ldm weight shapes of a live model (``{ldm key: shape}``), for
    reduced test topologies. Order: down_blocks, up_blocks, mid_block (as ``UNet2DConditionModel`` registers
    them), each by level, attention and transformer index."""
    import comfy.utils
    to_ldm = comfy.utils.unet_to_diffusers(unet_config)
    group = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}

    def order(path):
        parts = path.split(".")
        return (group[parts[0]],) + tuple(int(x) for x in parts[1:] if x.isdigit())
    paths = sorted({k[:-len(".attn2.to_q.weight")] for k in to_ldm if k.endswith(".attn2.to_q.weight")}, key=order)
    return [int(state_shapes[to_ldm[f"{p}.attn2.to_q.weight"]][0]) for p in paths]


def _rand(shape, g, std=0.02):
    return (torch.randn(shape, generator=g) * std).to(torch.float16)


def image_proj(tokens: int = 4, plus: bool = False, seed: int = 0, d: int = 768) -> dict:
    """MLPProjModel (``d`` = 768 SD1.5, 2048 SDXL) and, for Plus, FacePerceiverResampler(dim=d, heads d/64)."""
    g = torch.Generator().manual_seed(seed)
    one = torch.ones(d, dtype=torch.float16)
    sd = {"proj.0.weight": _rand((1024, 512), g, 0.05), "proj.0.bias": _rand((1024,), g),
          "proj.2.weight": _rand((d * tokens, 1024), g, 0.05), "proj.2.bias": _rand((d * tokens,), g),
          "norm.weight": (1 + _rand((d,), g).float()).half(), "norm.bias": _rand((d,), g)}
    if plus:
        pr = "perceiver_resampler."
        sd.update({pr + "proj_in.weight": _rand((d, 1280), g), pr + "proj_in.bias": _rand((d,), g),
                   pr + "proj_out.weight": _rand((d, d), g), pr + "proj_out.bias": _rand((d,), g),
                   pr + "norm_out.weight": one.clone(), pr + "norm_out.bias": _rand((d,), g)})
        for i in range(4):
            a, f = f"{pr}layers.{i}.0.", f"{pr}layers.{i}.1."
            sd.update({a + "norm1.weight": one.clone(), a + "norm1.bias": _rand((d,), g),
                       a + "norm2.weight": one.clone(), a + "norm2.bias": _rand((d,), g),
                       a + "to_q.weight": _rand((d, d), g), a + "to_kv.weight": _rand((2 * d, d), g),
                       a + "to_out.weight": _rand((d, d), g), f + "0.weight": one.clone(),
                       f + "0.bias": _rand((d,), g), f + "1.weight": _rand((4 * d, d), g),
                       f + "3.weight": _rand((d, 4 * d), g)})
    return sd


def ip_adapter(lora: bool = True, seed: int = 1, context_dim: int = 768, widths=None) -> dict:
    """``to_k_ip``/``to_v_ip`` of every attn2 processor (odd p) and optionally the rank-128 LoRA of all processors;
    ``widths``: per transformer block in diffusers order (default SD1.5's; :data:`SDXL_BLOCK_WIDTHS`, or
    :func:`diffusers_block_widths` of a reduced model)."""
    g = torch.Generator().manual_seed(seed)
    widths = BLOCK_WIDTHS if widths is None else widths
    sd = {}
    for p in range(2 * len(widths)):
        hidden = widths[p // 2]
        if p % 2:
            sd[f"{p}.to_k_ip.weight"] = _rand((hidden, context_dim), g, 0.05)
            sd[f"{p}.to_v_ip.weight"] = _rand((hidden, context_dim), g, 0.05)
        if lora:
            kv_in = context_dim if p % 2 else hidden
            for t, fan_in in (("to_q", hidden), ("to_k", kv_in), ("to_v", kv_in), ("to_out", hidden)):
                sd[f"{p}.{t}_lora.down.weight"] = _rand((RANK, fan_in), g)
                sd[f"{p}.{t}_lora.up.weight"] = _rand((hidden, RANK), g)
    return sd


def faceid_parts(variant: str = "faceid", seed: int = 0) -> tuple[dict, dict]:
    """``(image_proj, ip_adapter)`` of a variant. SD1.5 variants are cached per process (the dicts are fresh
    copies, the tensors shared and never written); SDXL ones (0.7–1.5 GB each) are made anew each time, so that
    the test process does not hold gigabytes while the full-size server tests run beside it."""
    a, b = (_parts.__wrapped__ if variant.startswith("sdxl") else _parts)(variant, seed)
    return dict(a), dict(b)


@functools.lru_cache(maxsize=None)
def _parts(variant: str, seed: int) -> tuple[dict, dict]:
    if variant == "faceid":
        return image_proj(4, seed=seed), ip_adapter(True, seed + 1)
    if variant == "plus":
        return image_proj(4, plus=True, seed=seed), ip_adapter(True, seed + 1)
    if variant == "portrait":
        return image_proj(16, seed=seed), ip_adapter(False, seed + 1)
    if variant == "sdxl":  # FaceID SDXL: 4 tokens of 2048, LoRA embedded (ip-adapter-faceid_sdxl.bin)
        return image_proj(4, seed=seed, d=2048), ip_adapter(True, seed + 1, 2048, SDXL_BLOCK_WIDTHS)
    if variant == "sdxl-plusv2":  # ip-adapter-faceid-plusv2_sdxl.bin
        return image_proj(4, plus=True, seed=seed, d=2048), ip_adapter(True, seed + 1, 2048, SDXL_BLOCK_WIDTHS)
    if variant == "sdxl-portrait":  # ip-adapter-faceid-portrait_sdxl.bin: 16 tokens, no LoRA
        return image_proj(16, seed=seed, d=2048), ip_adapter(False, seed + 1, 2048, SDXL_BLOCK_WIDTHS)
    if variant == "sdxl-nolora":  # the adapter part alone (tests that do not need the 186 M LoRA parameters)
        return image_proj(4, seed=seed, d=2048), ip_adapter(False, seed + 1, 2048, SDXL_BLOCK_WIDTHS)
    raise ValueError(variant)


def reduced_parts(widths: list, variant: str = "faceid", seed: int = 0, d: int = 2048) -> tuple[dict, dict]:
    """``(image_proj, ip_adapter)`` of a FaceID file for a reduced topology (``widths`` per transformer block in
    diffusers order, :func:`diffusers_block_widths`)."""
    tokens, plus, lora = {"faceid": (4, False, True), "plus": (4, True, True), "portrait": (16, False, False)}[variant]
    return image_proj(tokens, plus, seed, d), ip_adapter(lora, seed + 1, d, list(widths))


def write_bin(path, parts: tuple[dict, dict]) -> None:
    torch.save({"image_proj": parts[0], "ip_adapter": parts[1]}, str(path))


def write_safetensors(path, parts: tuple[dict, dict]) -> None:
    from safetensors.torch import save_file
    flat = {f"image_proj.{k}": v.contiguous() for k, v in parts[0].items()}
    flat.update({f"ip_adapter.{k}": v.contiguous() for k, v in parts[1].items()})
    save_file(flat, str(path))


def kohya_lora(parts: tuple[dict, dict]) -> dict:
    """The embedded LoRA in kohya naming (``lora_unet_<diffusers path with _>_to_k.lora_down.weight``), like the
    companion ``*_lora.safetensors`` files."""
    paths = ([f"down_blocks_{l}_attentions_{i}" for l in range(3) for i in range(2)]
             + [f"up_blocks_{l}_attentions_{i}" for l in (1, 2, 3) for i in range(3)] + ["mid_block_attentions_0"])
    out = {}
    for key, v in parts[1].items():
        if "_lora." not in key:
            continue
        p, target, kind, _ = key.split(".")
        t = target[:-len("_lora")]
        t = "to_out_0" if t == "to_out" else t
        out[f"lora_unet_{paths[int(p) // 2]}_transformer_blocks_0_attn{1 + int(p) % 2}_{t}.lora_{kind}.weight"] = v
    return out


SD15_UNET = FULL_UNET
"""SD1.5's real UNet configuration (ComfyUI's unet_config of v1-5-pruned), one definition for all fixtures."""


def meta_sd15():
    """A ModelPatcher around ComfyUI's full-size SD1.5 UNet with its parameters on the ``meta`` device (shapes and
    module tree without memory; model sampling on the CPU). Enough for key maps, LoRA patches and hooks."""
    return meta_patcher("SD15", SD15_UNET)


def meta_patcher(config_class: str, unet_config: dict):
    """A ModelPatcher around ComfyUI's ``comfy.supported_models.<config_class>`` UNet of ``unet_config`` with its
    parameters on the ``meta`` device and model sampling on the CPU."""
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models
    cfg = getattr(comfy.supported_models, config_class)(dict(unet_config))
    cfg.set_inference_dtype(torch.float32, None)
    with torch.device("meta"):
        base = cfg.get_model({})
    base.model_sampling = comfy.model_base.model_sampling(cfg, comfy.model_base.ModelType.EPS)
    return comfy.model_patcher.ModelPatcher(base, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def random_module_state(module: torch.nn.Module, seed: int, std: float = 0.02) -> dict:
    """fp16 random values for a (meta) module's state dict: normal(0, std) for matrices and kernels, **1 for the
    weights of every normalisation layer found by type** (GroupNorm/LayerNorm — in ldm naming a resblock's
    GroupNorm is ``in_layers.0``, so a name rule misses it and a zero scale makes the UNet output ε ≡ 0), 0 for
    biases."""
    g = torch.Generator().manual_seed(seed)
    norm_weights = {f"{name}.weight" if name else "weight" for name, m in module.named_modules()
                    if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and getattr(m, "weight", None) is not None}
    out = {}
    for name, t in module.state_dict().items():
        if name in norm_weights:
            v = torch.ones(t.shape)
        elif t.ndim > 1:
            v = torch.randn(t.shape, generator=g) * std
        else:
            v = torch.zeros(t.shape)
        out[name] = v.to(torch.float16).contiguous()
    return out


def write_sd15_checkpoint(path: str, seed: int = 0) -> None:
    """A full-size SD1.5 checkpoint (random fp16 UNet + CLIP-L, TAESD as the VAE) that ComfyUI's stock loader reads
    as SD1.5 with all 16 cross-attentions at 320/640/1280 — what the FaceID weights need — and whose UNet output
    depends on its input and context (norm scales 1). ~1.9 GiB: call it through :func:`generate_in_subprocess`."""
    import comfy.clip_model
    import comfy.ldm.modules.diffusionmodules.openaimodel as oai
    import comfy.ops
    import comfy.sd1_clip
    import comfy.taesd.taesd
    from safetensors.torch import save_file

    from .comfy_files import _meta, _random_state
    unet = _meta(lambda: oai.UNetModel(**SD15_UNET, operations=comfy.ops.disable_weight_init))
    with open(os.path.join(os.path.dirname(comfy.sd1_clip.__file__), "sd1_clip_config.json")) as f:
        clip_cfg = json.load(f)
    clip = _meta(lambda: comfy.clip_model.CLIPTextModel(clip_cfg, torch.float32, "meta", comfy.ops.disable_weight_init))
    sd = {f"model.diffusion_model.{k}": v for k, v in random_module_state(unet, seed).items()}
    sd.update({f"cond_stage_model.transformer.{k}": v for k, v in _random_state(clip, seed + 1).items()
               if "text_projection" not in k and "logit_scale" not in k})
    sd.update({f"first_stage_model.{k}": v for k, v in _random_state(comfy.taesd.taesd.TAESD(), seed + 2,
                                                                          std=0.05).items()})
    save_file(sd, path)


def write_sd15_openpose_controlnet(path: str, seed: int = 5) -> None:
    """A full-size SD1.5 ControlNet in the layout of ``control_v11p_sd15_openpose.pth`` (keys ``control_model.*``,
    hint channels 3), random fp16 values, as a tensors-only pickle."""
    import comfy.cldm.cldm
    import comfy.ops

    from .comfy_files import _meta
    cfg = {k: v for k, v in SD15_UNET.items() if k != "out_channels"}
    cfg["hint_channels"] = 3
    cn = _meta(lambda: comfy.cldm.cldm.ControlNet(**cfg, operations=comfy.ops.disable_weight_init))
    torch.save({f"control_model.{k}": v for k, v in random_module_state(cn, seed).items()}, str(path))


def generate_in_subprocess(kind: str, path: str) -> None:
    """Run one of the full-size writers in a fresh Python (the host imported there), so its memory is returned."""
    import subprocess
    import sys
    from pathlib import Path
    tests = Path(__file__).resolve().parents[1]
    code = ("import sys; sys.path[:0] = [{t!r}, {r!r}]\n"
            "from tools.devkit.comfy_host import import_host; import_host()\n"
            "from support import faceid_files as ff\n"
            "ff.{fn}({p!r})\n").format(t=str(tests), r=str(tests.parent), p=str(path),
                                        fn={"checkpoint": "write_sd15_checkpoint",
                                            "controlnet": "write_sd15_openpose_controlnet"}[kind])
    subprocess.run([sys.executable, "-c", code], check=True, timeout=900)


FIXTURE_VERSION = 2


def cached_full_size(kind: str) -> str:
    """Path of a full-size random fixture (``checkpoint`` or ``controlnet``), generated once per machine in
    ``~/.cache/instantfamily/fixtures`` (XDG_CACHE_HOME respected) — deterministic, never committed."""
    import os
    from pathlib import Path
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "instantfamily" / "fixtures"
    cache.mkdir(parents=True, exist_ok=True)
    name = {"checkpoint": f"sd15_random_v{FIXTURE_VERSION}.safetensors",
            "controlnet": f"control_sd15_random_v{FIXTURE_VERSION}.pth"}[kind]
    path = cache / name
    if not path.is_file():
        tmp = cache / f".{name}.{os.getpid()}.tmp{path.suffix}"
        generate_in_subprocess(kind, str(tmp))
        os.replace(tmp, path)
    return str(path)
