"""Tiny SD1.5-architecture models built with ComfyUI's own classes (random, seeded weights), and InstantFamily
checkpoints whose ControlNet matches them. Nothing here is committed; everything is generated at test time."""

from __future__ import annotations

import torch

from instantfamily_core.checkpoint import CheckpointMeta, save_checkpoint
from instantfamily_core.projector import IdentityProjector, ProjectorConfig

TINY_UNET = {"use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4,
             "use_spatial_transformer": True, "legacy": False, "adm_in_channels": None,
             "model_channels": 32, "num_res_blocks": [1, 1], "channel_mult": [1, 2],
             "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1],
             "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768,
             "use_temporal_attention": False, "use_temporal_resblock": False}
TINY_PROJECTOR = ProjectorConfig(global_dim=512, local_dim=512, grid=7, token_dim=768, hidden_dim=64)


def randomise(module: torch.nn.Module, seed: int, std: float = 0.02) -> torch.nn.Module:
    """ComfyUI layers allocate with torch.empty: fill them, seeded (normal for weights, 1 for norms, 0 bias)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def tiny_sd15(seed: int = 0):
    """A ModelPatcher around a tiny SD1.5-architecture UNet."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    cfg = comfy.supported_models.SD15(dict(TINY_UNET))
    cfg.set_inference_dtype(torch.float32, None)
    base = cfg.get_model({})
    randomise(base.diffusion_model, seed)
    dev = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(base, load_device=dev,
                                            offload_device=comfy.model_management.unet_offload_device())


def tiny_controlnet_ldm(seed: int = 1):
    """ldm-layout state dict + config of a tiny ControlNet matching :data:`TINY_UNET`."""
    import comfy.cldm.cldm
    import comfy.ops
    cfg = {k: v for k, v in TINY_UNET.items() if k != "out_channels"}
    cfg.update(hint_channels=3, num_heads=8, num_head_channels=-1)
    cn = comfy.cldm.cldm.ControlNet(**cfg, operations=comfy.ops.disable_weight_init)
    randomise(cn, seed, std=0.05)
    return {k: v.clone() for k, v in cn.state_dict().items()}, cfg


def write_tiny_checkpoint(path, seed: int = 2, mask_mode: str = "additive") -> IdentityProjector:
    sd, cfg = tiny_controlnet_ldm(seed)
    torch.manual_seed(seed)
    projector = IdentityProjector(TINY_PROJECTOR)
    with torch.no_grad():
        projector.null_tokens.normal_(0, 0.5)
    save_checkpoint(str(path), projector, sd, CheckpointMeta(face_pack="tinypack", projector=TINY_PROJECTOR,
                                                             mask_mode=mask_mode, controlnet_layout="ldm",
                                                             controlnet_config=cfg))
    return projector
