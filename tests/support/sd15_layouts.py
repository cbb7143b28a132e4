"""SD1.5 checkpoint files in every layout in use, written by the published key names — independent of the training
loader and of its inverse (``support.sd15_writers.save_single_file``).

The tensors come from ComfyUI's own module definitions of the original (LDM) architecture (``UNetModel``,
``AutoencoderKL``, the CLIP-L ``CLIPTextModel``), built on the meta device and filled from a seeded generator, under
the standard single-file prefixes ``model.diffusion_model.``, ``first_stage_model.`` and
``cond_stage_model.transformer.text_model.``. :func:`write_layout` then writes one variant:

* ``text_model``: the standard layout (``v1-5-pruned-emaonly``, nearly every community checkpoint);
* ``legacy``: the older ``cond_stage_model.transformer.*`` without ``text_model.``;
* ``position_ids``: either of them may store ``embeddings.position_ids`` (int64 ``arange(77)``);
* ``ema``: a full non-pruned file: ``model.diffusion_model.*`` holds other (non-EMA) weights, and the weights to use
  are the EMA copies ``model_ema.<name without dots>`` (LDM ``LitEma``), with ``model_ema.decay``/``num_updates``;
* ``.ckpt``: a PyTorch zip with a ``{"state_dict": ..., "global_step": ...}`` wrapper;
* fp32 / fp16 / bf16 tensors.

Needs the ComfyUI host importable (``tools.devkit.comfy_host.import_host()``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."

# the published SD1.5 UNet (v1-inference.yaml: model_channels 320, channel_mult 1,2,4,4, attention at the three
# first levels, 8 heads, context 768) in ComfyUI's UNetModel arguments
FULL_UNET = {"use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4,
             "use_spatial_transformer": True, "legacy": False, "adm_in_channels": None, "model_channels": 320,
             "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
             "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
             "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "transformer_depth_middle": 1,
             "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8, "num_head_channels": -1,
             "use_temporal_attention": False, "use_temporal_resblock": False}
# one 320-channel level: ComfyUI still detects SD1.5 (it compares context_dim, model_channels, linear-in-transformer,
# adm), ~26M parameters
MICRO_UNET = dict(FULL_UNET, num_res_blocks=[1], channel_mult=[1], transformer_depth=[1],
                  transformer_depth_output=[1, 1])
# the published SD1.5 VAE (ddconfig of v1-inference.yaml; ComfyUI's VAE loader assumes exactly this for SD files)
VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
# the same micro UNet in diffusers' UNet2DConditionModel config terms (for the training loader's --config-dir)
MICRO_DIFFUSERS_UNET = {"block_out_channels": [320], "down_block_types": ["CrossAttnDownBlock2D"],
                        "up_block_types": ["CrossAttnUpBlock2D"], "layers_per_block": 1}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _meta(ctor):
    with torch.device("meta"):
        return ctor()


def _fill(module: torch.nn.Module, seed: int, prefix: str, std: float = 0.02,
          dtype: torch.dtype = torch.float32) -> dict:
    """Seeded values for every tensor of a meta ``module``, keyed ``prefix + name``, in ``dtype`` (each tensor cast as
    it is made, so a full-size fp16 model never exists in fp32): normal(0, std) for matrices/kernels, ~1 for norm
    weights, small normal for biases and other vectors."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in module.state_dict().items():
        if t.ndim > 1:
            v = torch.randn(t.shape, generator=g) * std
        elif name.endswith("weight") and ("norm" in name or name.split(".")[-2].startswith(("ln", "layer_norm"))):
            v = 1.0 + torch.randn(t.shape, generator=g) * 0.05
        else:
            v = torch.randn(t.shape, generator=g) * std
        out[prefix + name] = v.to(dtype)
    return out


def comfy_modules(unet_cfg: dict):
    """ComfyUI's UNetModel, AutoencoderKL and CLIP-L text model, on the meta device."""
    import comfy.clip_model
    import comfy.ldm.models.autoencoder as ae
    import comfy.ldm.modules.diffusionmodules.openaimodel as oai
    import comfy.ops
    import comfy.sd1_clip
    ops = comfy.ops.disable_weight_init
    unet = _meta(lambda: oai.UNetModel(**unet_cfg, operations=ops))
    with open(os.path.join(os.path.dirname(comfy.sd1_clip.__file__), "sd1_clip_config.json")) as f:
        clip_cfg = json.load(f)
    clip = _meta(lambda: comfy.clip_model.CLIPTextModel(clip_cfg, torch.float32, "meta", ops))
    vae = _meta(lambda: ae.AutoencoderKL(ddconfig=VAE_DDCONFIG, embed_dim=4))
    return unet, vae, clip


def sd15_state(unet_cfg: dict = MICRO_UNET, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict:
    """A random SD1.5 single-file state dict in the standard layout, keys by the published names."""
    unet, vae, clip = comfy_modules(unet_cfg)
    sd = _fill(unet, seed, UNET_PREFIX, dtype=dtype)
    sd.update(_fill(vae, seed + 1, VAE_PREFIX, std=0.01, dtype=dtype))
    text = _fill(clip, seed + 2, TEXT_PREFIX, dtype=dtype)
    sd.update({k: v for k, v in text.items() if not k.endswith(("text_projection.weight", "logit_scale"))})
    assert any(k.startswith(TEXT_PREFIX + "text_model.") for k in sd)
    return sd


def ema_flat_name(unet_key: str) -> str:
    """LDM ``LitEma`` buffer name of a UNet parameter: ``model_ema.`` + the name under ``model.`` without dots."""
    return "model_ema." + unet_key[len("model."):].replace(".", "")


def layout_state(sd: dict, text: str = "text_model", position_ids: bool = False, ema: bool = False,
                 dtype: str = "fp16", seed: int = 99) -> dict:
    """``sd`` (standard layout, fp32) rewritten into one layout; the UNet weights to use stay ``sd``'s."""
    out = {}
    for k, v in sd.items():
        if text == "legacy" and k.startswith(TEXT_PREFIX + "text_model."):
            k = TEXT_PREFIX + k[len(TEXT_PREFIX + "text_model."):]
        elif text != "legacy" and text != "text_model":
            raise ValueError(text)
        out[k] = v
    if position_ids:
        key = TEXT_PREFIX + ("text_model." if text == "text_model" else "") + "embeddings.position_ids"
        out[key] = torch.arange(77, dtype=torch.int64)[None]
    if ema:
        g = torch.Generator().manual_seed(seed)
        for k in [k for k in out if k.startswith(UNET_PREFIX)]:
            out[ema_flat_name(k)] = out[k]
            out[k] = torch.randn(out[k].shape, generator=g) * 0.05  # the non-EMA weights: different
        out["model_ema.decay"] = torch.tensor(0.9999)
        out["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    target = DTYPES[dtype]
    return {k: (v.to(target) if v.is_floating_point() and k not in ("model_ema.decay",) else v).contiguous()
            for k, v in out.items()}


def write_state(sd: dict, path: Path) -> Path:
    """``.safetensors`` as is; ``.ckpt`` as a PyTorch zip with a ``state_dict`` wrapper."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(sd, str(path))
    else:
        torch.save({"state_dict": sd, "global_step": 470000, "epoch": 6}, str(path))
    return path


def write_layout(sd: dict, path: Path, **layout) -> Path:
    return write_state(layout_state(sd, **layout), path)


def micro_config_dir(folder: Path) -> Path:
    """The training loader's config folder for the micro UNet (full VAE and CLIP-L)."""
    from training.sd15 import CONFIG_DIR
    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(CONFIG_DIR, folder)
    cfg = json.loads((folder / "unet" / "config.json").read_text())
    cfg.update(MICRO_DIFFUSERS_UNET)
    (folder / "unet" / "config.json").write_text(json.dumps(cfg, indent=2))
    return folder


def comfy_tokenizer_dir() -> Path:
    """ComfyUI's ``comfy/sd1_tokenizer`` (the real CLIP BPE tokenizer; declares model_max_length 8192)."""
    import comfy.sd1_clip
    return Path(comfy.sd1_clip.__file__).resolve().parent / "sd1_tokenizer"


# ---------------------------------------------------------------------------------------------------------------
# ControlNet files (for --controlnet-init), by the published names: ComfyUI's cldm.ControlNet, as the original
# ControlNet repository saves it (ldm layout, optionally under ``control_model.``)

def controlnet_state(unet_cfg: dict = MICRO_UNET, seed: int = 5) -> dict:
    import comfy.cldm.cldm
    import comfy.ops
    cfg = {k: v for k, v in unet_cfg.items() if k != "out_channels"}
    cfg["hint_channels"] = 3
    cn = _meta(lambda: comfy.cldm.cldm.ControlNet(**cfg, operations=comfy.ops.disable_weight_init))
    return _fill(cn, seed, "", std=0.03)


# ---------------------------------------------------------------------------------------------------------------
# ComfyUI's side of the comparison

def comfy_load_checkpoint(path: Path):
    """(model, clip, vae) from ComfyUI's own ``CheckpointLoaderSimple`` for ``path``."""
    import folder_paths
    import nodes
    folder_paths.add_model_folder_path("checkpoints", str(Path(path).parent))
    return nodes.CheckpointLoaderSimple().load_checkpoint(Path(path).name)


def comfy_text(clip, prompt: str) -> torch.Tensor:
    """ComfyUI's CLIPTextEncode conditioning ``(1, 77, 768)`` for one short prompt."""
    tokens = clip.tokenize(prompt)
    return clip.encode_from_tokens(tokens).float()


def comfy_eps(model, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, control=None) -> torch.Tensor:
    """ComfyUI's noise prediction: ``(x - denoised) / sigma`` of ``BaseModel.apply_model`` (EPS)."""
    import comfy.model_management
    comfy.model_management.load_models_gpu([model])
    base = model.model
    opts = {"cond_or_uncond": [0], "sigmas": sigma}
    with torch.no_grad():
        denoised = base.apply_model(x, sigma, c_crossattn=context, control=control, transformer_options=opts)
    return (x - denoised.float()) / sigma.view(-1, 1, 1, 1)


def our_eps(unet, x: torch.Tensor, sigma: torch.Tensor, t: float, context: torch.Tensor, down=None, mid=None):
    """The diffusers UNet's prediction for the same input (ComfyUI scales the input by 1/sqrt(sigma² + 1))."""
    with torch.no_grad():
        return unet(x / torch.sqrt(sigma ** 2 + 1), torch.tensor([t]), encoder_hidden_states=context,
                    down_block_additional_residuals=down, mid_block_additional_residual=mid,
                    return_dict=False)[0].float()
