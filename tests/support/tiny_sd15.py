"""Tiny random SD1.5-architecture models for the training, parity and generation tests.

A byte-level CLIP tokenizer, config folders laid out like ``training/configs/sd15`` with tiny sizes, randomly
initialised components built from them, and :func:`write_tiny_setup`: a base model written as an SD1.5 single file
(+ optional diffusers folder) and an exported InstantFamily checkpoint, all through the product's own writers
(:func:`support.sd15_writers.save_single_file`, :func:`support.sd15_writers.save_diffusers`,
:func:`training.model.export_checkpoint`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from instantfamily_core.projector import IdentityProjector, ProjectorConfig
from support import sd15_writers
from training import sd15
from training.model import export_checkpoint, make_controlnet

# ---------------------------------------------------------------------------------------------------------------
# tokenizer and config folders


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte → printable unicode character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def write_tiny_tokenizer(folder: str | os.PathLike) -> Path:
    """A byte-level CLIP tokenizer with no merges (516 tokens): every character is a token."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": i + 256 for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": 77, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "do_lower_case": True}), encoding="utf-8")
    return out


TINY_UNET = {"block_out_channels": [32, 64], "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], "layers_per_block": 1,
             "attention_head_dim": 8, "sample_size": 8}
TINY_VAE = {"block_out_channels": [8, 8, 8, 8], "layers_per_block": 1, "norm_num_groups": 4, "sample_size": 64}
TINY_TEXT = {"vocab_size": 514, "hidden_size": 768, "intermediate_size": 64, "num_hidden_layers": 1,
             "num_attention_heads": 4, "bos_token_id": 512, "eos_token_id": 513, "pad_token_id": 513}


def write_tiny_config_dir(folder: str | os.PathLike, unet: Optional[dict] = None, vae: Optional[dict] = None,
                          text_encoder: Optional[dict] = None) -> Path:
    """A config folder like ``training/configs/sd15`` for tiny models (SD1.5 layout, 768-wide context; the
    overrides update the tiny defaults) with a tiny tokenizer in ``tokenizer/``."""
    out = Path(folder)
    config_dir = sd15.CONFIG_DIR
    for sub, base_file, tiny, extra in (("unet", "config.json", TINY_UNET, unet), ("vae", "config.json", TINY_VAE, vae),
                                        ("text_encoder", "config.json", TINY_TEXT, text_encoder)):
        cfg = json.loads((config_dir / sub / base_file).read_text())
        cfg.update(tiny)
        cfg.update(extra or {})
        (out / sub).mkdir(parents=True, exist_ok=True)
        (out / sub / base_file).write_text(json.dumps(cfg, indent=2))
    (out / "scheduler").mkdir(parents=True, exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(
        (config_dir / "scheduler" / "scheduler_config.json").read_text())
    (out / "model_index.json").write_text((config_dir / "model_index.json").read_text())
    write_tiny_tokenizer(out / "tokenizer")
    return out


def build_from_configs(config_dir: str | os.PathLike, seed: int = 0,
                       tokenizer: Optional[str] = None) -> sd15.SD15Components:
    """Randomly initialised (frozen, eval-mode) components from a config folder laid out like
    ``training/configs/sd15``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    cfg = Path(config_dir)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(cfg / "unet")))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(cfg / "vae")))
    text = CLIPTextModel(CLIPTextConfig.from_pretrained(str(cfg / "text_encoder"), local_files_only=True))
    tok = sd15.load_tokenizer(sd15.find_tokenizer(tokenizer, None, cfg))
    for m in (unet, vae, text):
        m.requires_grad_(False).eval()
    return sd15.SD15Components(unet, vae, text, tok, sd15.read_scheduler_config(cfg))


# ---------------------------------------------------------------------------------------------------------------
# a whole tiny setup: base model files + InstantFamily export

@torch.no_grad()
def randomize_zero_init(controlnet, projector: IdentityProjector, seed: int = 0, std: float = 0.02) -> None:
    """Give the ControlNet's zero convolutions and the projector's null tokens random values, so that a parity
    check sees non-zero ControlNet residuals and distinct null tokens (a fresh ControlNet adds exactly zero)."""
    g = torch.Generator().manual_seed(seed)
    zero = [m for name, m in controlnet.named_modules()
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out"))
            and isinstance(m, nn.Conv2d)]
    for m in zero:
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) * std)
        if m.bias is not None:
            m.bias.copy_(torch.randn(m.bias.shape, generator=g) * std)
    projector.null_tokens.copy_(torch.randn(projector.null_tokens.shape, generator=g))


@dataclass
class TinySetup:
    """Files and live models of :func:`write_tiny_setup`."""

    folder: Path
    config_dir: Path  # SD1.5-layout tiny configs + tiny tokenizer (``tokenizer/``)
    single_file: Path  # SD1.5 single-file checkpoint (LDM layout): UNet + VAE + text encoder
    diffusers_dir: Optional[Path]  # the same as a diffusers folder, or None
    checkpoint: Path  # the exported InstantFamily checkpoint (projector + ControlNet, schema v1)
    components: sd15.SD15Components
    controlnet: object  # diffusers ControlNetModel
    projector: IdentityProjector


def write_tiny_setup(folder, seed: int = 0, unet: Optional[dict] = None, vae: Optional[dict] = None,
                     text_encoder: Optional[dict] = None, projector: Optional[ProjectorConfig] = None,
                     mask_mode: str = "additive", max_identities: int = 4, face_pack: str = "tinypack",
                     diffusers_folder: bool = False) -> TinySetup:
    """Random tiny SD1.5-architecture models, written as a base checkpoint and an InstantFamily export.

    ``unet`` / ``vae`` / ``text_encoder`` override :data:`TINY_UNET` etc. (e.g.
    ``unet={"block_out_channels": [320, 640]}`` for ComfyUI's SD1.5 detection, which needs 320 channels). The
    ControlNet starts from the UNet and gets random zero-convs (:func:`randomize_zero_init`); the projector
    defaults to ``ProjectorConfig(hidden_dim=64)`` (512-d global, 512×7×7 local, 768-d tokens)."""
    out = Path(folder)
    cfg_dir = write_tiny_config_dir(out / "config", unet, vae, text_encoder)
    comps = build_from_configs(cfg_dir, seed=seed)
    torch.manual_seed(seed + 1)
    cn = make_controlnet(comps.unet).eval()
    proj = IdentityProjector(projector or ProjectorConfig(hidden_dim=64)).eval()
    randomize_zero_init(cn, proj, seed + 2)
    single = sd15_writers.save_single_file(comps, out / "tiny-sd15.safetensors")
    ddir = sd15_writers.save_diffusers(comps, out / "tiny-sd15-diffusers") if diffusers_folder else None
    ckpt = out / "instantfamily-tiny.safetensors"
    export_checkpoint(ckpt, proj, cn, face_pack, mask_mode, max_identities)
    return TinySetup(out, cfg_dir, single, ddir, ckpt, comps, cn, proj)
