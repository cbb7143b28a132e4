"""Random-weight model files that ComfyUI's stock loaders detect, generated at test time (never committed).

* a "micro" SD1.5 checkpoint: 320-channel UNet with one level (SD1.5 detection compares only context_dim,
  model_channels, linear-in-transformer and adm), full-size CLIP-L (always full size), TAESD as the VAE;
* a micro SD2 UNet-only file (context 1024, linear transformers) for the wrong-base-model error;
* an InstantFamily checkpoint whose ControlNet matches the micro UNet.
"""

from __future__ import annotations

import json
import os

import torch

from instantfamily_core.checkpoint import CheckpointMeta, save_checkpoint
from instantfamily_core.projector import IdentityProjector

from .comfy_models import TINY_PROJECTOR

MICRO_UNET = {"use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4,
              "use_spatial_transformer": True, "legacy": False, "adm_in_channels": None, "model_channels": 320,
              "num_res_blocks": [1], "channel_mult": [1], "transformer_depth": [1], "transformer_depth_output": [1, 1],
              "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768,
              "num_heads": 8, "num_head_channels": -1, "use_temporal_attention": False,
              "use_temporal_resblock": False}


def _norm_scales(module: torch.nn.Module) -> set:
    """State-dict names of the scale of every normalisation layer, found by type (ResBlocks call theirs
    ``in_layers.0``/``out_layers.0``: a name rule would zero them and make the UNet predict ε ≡ 0)."""
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.BatchNorm2d)
    return {f"{name}.weight" if name else "weight" for name, m in module.named_modules() if isinstance(m, norms)}


def _random_state(module: torch.nn.Module, seed: int, std: float = 0.02) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    scales = _norm_scales(module)
    for name, t in module.state_dict().items():
        if t.ndim > 1:
            v = torch.randn(t.shape, generator=g) * std
        elif name in scales or "norm" in name and name.endswith("weight") or name.endswith("ln_1.weight") \
                or "layer_norm" in name and name.endswith("weight"):
            v = torch.ones(t.shape)
        elif t.dtype in (torch.long, torch.int64, torch.int32):
            v = torch.arange(t.numel()).reshape(t.shape) if "position_ids" in name else torch.zeros_like(t)
        else:
            v = torch.zeros(t.shape)
        out[name] = v.to(torch.float16 if v.is_floating_point() else v.dtype).contiguous()
    return out


def _meta(ctor):
    with torch.device("meta"):
        return ctor()


def write_micro_sd15(path: str, seed: int = 0) -> None:
    import comfy.clip_model
    import comfy.ldm.modules.diffusionmodules.openaimodel as oai
    import comfy.ops
    import comfy.sd1_clip
    import comfy.taesd.taesd
    from safetensors.torch import save_file
    cfg = {k: v for k, v in MICRO_UNET.items()}
    unet = _meta(lambda: oai.UNetModel(**cfg, operations=comfy.ops.disable_weight_init))
    with open(os.path.join(os.path.dirname(comfy.sd1_clip.__file__), "sd1_clip_config.json")) as f:
        clip_cfg = json.load(f)
    clip = _meta(lambda: comfy.clip_model.CLIPTextModel(clip_cfg, torch.float32, "meta", comfy.ops.disable_weight_init))
    taesd = comfy.taesd.taesd.TAESD()
    sd = {f"model.diffusion_model.{k}": v for k, v in _random_state(unet, seed).items()}
    sd.update({f"cond_stage_model.transformer.{k}": v for k, v in _random_state(clip, seed + 1).items()
               if "text_projection" not in k and "logit_scale" not in k})
    sd.update({f"first_stage_model.{k}": v for k, v in _random_state(taesd, seed + 2, std=0.05).items()})
    save_file(sd, path)


def write_micro_sd2_unet(path: str, seed: int = 3) -> None:
    import comfy.ldm.modules.diffusionmodules.openaimodel as oai
    import comfy.ops
    from safetensors.torch import save_file
    cfg = dict(MICRO_UNET, context_dim=1024, use_linear_in_transformer=True, num_heads=-1, num_head_channels=64)
    unet = _meta(lambda: oai.UNetModel(**cfg, operations=comfy.ops.disable_weight_init))
    save_file(_random_state(unet, seed), path)


def write_micro_instantfamily(path: str, seed: int = 4, face_pack: str = "antelopev2") -> None:
    import comfy.cldm.cldm
    import comfy.ops
    cfg = {k: v for k, v in MICRO_UNET.items() if k != "out_channels"}
    cfg["hint_channels"] = 3
    cn = _meta(lambda: comfy.cldm.cldm.ControlNet(**cfg, operations=comfy.ops.disable_weight_init))
    torch.manual_seed(seed)
    projector = IdentityProjector(TINY_PROJECTOR)
    save_checkpoint(path, projector, {k: v.float() for k, v in _random_state(cn, seed, std=0.05).items()},
                    CheckpointMeta(face_pack=face_pack, projector=TINY_PROJECTOR, controlnet_layout="ldm",
                                   controlnet_config=cfg))


def write_face_photos(folder, colors, group: str = "group_photo.png") -> None:
    """ComfyUI ``input/`` photos the tiny face pack detects: ``person_<i>.png`` (one face of ``colors[i - 1]``,
    640×640) for each colour, and ``group`` with the first two colours side by side."""
    from PIL import Image

    from tools.devkit.face_models import draw_faces
    os.makedirs(folder, exist_ok=True)
    for i, color in enumerate(colors):
        Image.fromarray(draw_faces((640, 640), [(320, 320)], [color])).save(os.path.join(folder, f"person_{i + 1}.png"))
    Image.fromarray(draw_faces((640, 640), [(160, 320), (480, 320)], list(colors[:2]))).save(os.path.join(folder, group))
