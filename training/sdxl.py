"""Stable Diffusion XL components for the research loop (``training/generate.py --faceid``): offline loading, both
text encoders, the size conditioning.

Loading (:func:`load_sdxl`), always offline, like :mod:`training.sd15`:

* a **single file** in the SGM layout of ``sd_xl_base_1.0.safetensors`` (what ComfyUI users keep in
  ``models/checkpoints``): ``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE),
  ``conditioner.embedders.0.transformer.*`` (CLIP ViT-L text, 768) and ``conditioner.embedders.1.model.*``
  (OpenCLIP ViT-bigG text, 1280, with ``text_projection``). The architecture comes from ``training/configs/sdxl``
  (shipped JSON, the published SDXL base configs); UNet, VAE and OpenCLIP weights are converted with diffusers'
  own single-file conversions, CLIP-L keys are mapped to the installed ``CLIPTextModel``'s names;
* a **diffusers folder** (``unet/``, ``vae/``, ``text_encoder/``, ``text_encoder_2/``, ``tokenizer[_2]/``,
  ``scheduler/``).

The text context is SDXL's: the penultimate hidden states of both encoders concatenated (77 × 2048), the pooled
(projected) output of the second (1280), and ``add_time_ids`` = original size, crop (0, 0), target size — what
ComfyUI's SDXL conditioning gives for an image of the generated size. The second tokenizer pads with ``!`` (the
published ``tokenizer_2``; ComfyUI's clip_g pads with token 0, the same token).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from instantfamily_core.errors import BaseModelError, ModelFileError
from training import sd15

CONFIG_DIR = Path(__file__).resolve().parent / "configs" / "sdxl"
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "conditioner.embedders.0.transformer."
TEXT2_PREFIX = "conditioner.embedders.1.model."
CONTEXT_DIM = 2048
BASES = {768: "SD1.5", 1024: "SD2.x", 2048: "SDXL"}


@dataclass
class SDXLComponents:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    text_encoder_2: torch.nn.Module
    tokenizer: object
    tokenizer_2: object
    scheduler_config: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# what a --base is

def _safetensors_keys(path: Path) -> dict:
    """``{key: shape}`` from a safetensors header (nothing else read)."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for corrupt files
        raise ModelFileError(f"--base {path.name}: not a readable .safetensors file ({type(e).__name__}: {e})") \
            from None


def base_kind(path: str | os.PathLike) -> str:
    """``"SD1.5"`` or ``"SDXL"`` for a ``--base`` (single file or diffusers folder), from key names and the UNet's
    cross-attention width only; anything else is a :class:`BaseModelError` naming what it is."""
    p = Path(path)
    if not p.exists():
        raise ModelFileError(f"--base: {p} does not exist (give an SD1.5 or SDXL single-file checkpoint, e.g. "
                             "v1-5-pruned-emaonly.safetensors or sd_xl_base_1.0.safetensors, or a diffusers folder)")
    if p.is_dir():
        if (p / "text_encoder_2").is_dir():
            cfg = _read_json(p / "unet" / "config.json", "--base")
            width = int(cfg.get("cross_attention_dim", CONTEXT_DIM))
        else:
            cfg = _read_json(p / "unet" / "config.json", "--base") if (p / "unet").is_dir() else {}
            width = int(cfg.get("cross_attention_dim", 768)) if cfg else 768
    else:
        shapes = _safetensors_keys(p) if p.suffix == ".safetensors" else {
            k: tuple(v.shape) for k, v in sd15.read_state_dict(p, "--base").items()}
        ctx = [s for k, s in shapes.items() if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight")]
        if not ctx:
            raise BaseModelError(f"--base {p.name}: no UNet cross-attention ('{UNET_PREFIX}…attn2.to_k.weight'); "
                                 "give a full SD1.5 or SDXL checkpoint (UNet + VAE + text encoders)")
        width = int(ctx[0][1])
    if width not in (768, CONTEXT_DIM):
        raise BaseModelError(f"--base {p.name}: a UNet with {width}-wide cross-attention "
                             f"({BASES.get(width, 'not SD1.5 or SDXL')}); the FaceID mode runs on SD1.5 (768) or "
                             f"SDXL ({CONTEXT_DIM})")
    return BASES[width]


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelFileError(f"{what}: cannot read {path} ({e})") from None


# ---------------------------------------------------------------------------------------------------------------
# loading

def _rename_to(model_keys: list[str], sd: dict) -> dict:
    """diffusers' conversions name a ``CLIPTextModelWithProjection`` ``text_model.*`` + ``text_projection.*``;
    map onto the installed model's own names (identical in transformers 4.x and 5.x, checked anyway)."""
    own = set(model_keys)
    out = {}
    for k, v in sd.items():
        if k in own:
            out[k] = v
        elif k.startswith("text_model.") and k[len("text_model."):] in own:
            out[k[len("text_model."):]] = v
        else:
            out[k] = v
    return out


def check_sdxl_single_file(sd: dict, name: str) -> None:
    missing = [what for what, prefix in (("UNet", UNET_PREFIX), ("VAE", VAE_PREFIX), ("CLIP-L text encoder",
                                                                                      TEXT_PREFIX),
                                         ("OpenCLIP-bigG text encoder", TEXT2_PREFIX))
               if not any(k.startswith(prefix) for k in sd)]
    if missing:
        raise BaseModelError(f"--base {name}: the checkpoint lacks the {', '.join(missing)} "
                             f"({'; '.join(p for p in (UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX, TEXT2_PREFIX))}*); "
                             "use a full SDXL base checkpoint such as sd_xl_base_1.0.safetensors")


def tokenizers_for(explicit: Optional[str], base: Optional[Path], config_dir: Path):
    """``(tokenizer, tokenizer_2)``: the CLIP BPE tokenizer (``--tokenizer``, the folder's ``tokenizer/``, the
    config folder's, ComfyUI's ``sd1_tokenizer``) twice, the second padding with ``!``."""
    folder2 = base / "tokenizer_2" if base is not None and (base / "tokenizer_2").is_dir() else None
    tok = sd15.load_tokenizer(sd15.find_tokenizer(explicit, base, config_dir))
    tok2 = sd15.load_tokenizer(folder2 if folder2 is not None and not explicit else
                               sd15.find_tokenizer(explicit, base, config_dir))
    if folder2 is None or explicit:
        tok2.pad_token = "!"
    return tok, tok2


def load_single_file(path: Path, config_dir: Path = CONFIG_DIR, tokenizers=(None, None),
                     dtype: torch.dtype = torch.float32) -> SDXLComponents:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
                                                     convert_open_clip_checkpoint)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    path = Path(path)
    name = f"--base {path.name}"
    sd = sd15.read_state_dict(path, "--base")
    check_sdxl_single_file(sd, path.name)
    sd15.use_ema_weights(sd, path.name)
    unet_cfg = UNet2DConditionModel.load_config(str(config_dir / "unet"))
    vae_cfg = AutoencoderKL.load_config(str(config_dir / "vae"))
    t1_cfg = CLIPTextConfig.from_pretrained(str(config_dir / "text_encoder"), local_files_only=True)
    t2_cfg = CLIPTextConfig.from_pretrained(str(config_dir / "text_encoder_2"), local_files_only=True)

    text = sd15._empty(lambda: CLIPTextModel(t1_cfg))
    part = sd15.text_encoder_state(sd, list(text.state_dict()), TEXT_PREFIX)
    sd15._drop(sd, TEXT_PREFIX)
    text = sd15.load_into(text, part, "CLIP-L text encoder", name, dtype)
    text2 = sd15._empty(lambda: CLIPTextModelWithProjection(t2_cfg))
    part = convert_open_clip_checkpoint(text2, {k: v for k, v in sd.items() if k.startswith(TEXT2_PREFIX)},
                                        prefix=TEXT2_PREFIX)
    sd15._drop(sd, TEXT2_PREFIX)
    text2 = sd15.load_into(text2, _rename_to(list(text2.state_dict()), part), "OpenCLIP-bigG text encoder", name,
                           dtype)
    part = convert_ldm_vae_checkpoint(sd, vae_cfg)
    sd15._drop(sd, VAE_PREFIX)
    vae = sd15.load_into(sd15._empty(lambda: AutoencoderKL.from_config(vae_cfg)), part, "VAE", name, dtype)
    part = convert_ldm_unet_checkpoint(sd, unet_cfg)
    sd.clear()
    unet = sd15.load_into(sd15._empty(lambda: UNet2DConditionModel.from_config(unet_cfg)), part, "UNet", name, dtype)
    tok, tok2 = tokenizers
    return SDXLComponents(unet, vae, text, text2, tok, tok2, sd15.read_scheduler_config(config_dir))


def load_diffusers_folder(folder: Path, tokenizers=(None, None), dtype: torch.dtype = torch.float32) -> SDXLComponents:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection
    folder = Path(folder)
    for sub in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if not (folder / sub).is_dir():
            raise ModelFileError(f"--base: {folder} is not a diffusers SDXL folder (no '{sub}/' inside)")
    try:
        unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet", local_files_only=True,
                                                    variant=sd15.weights_variant(folder / "unet", "--base"))
        vae = AutoencoderKL.from_pretrained(str(folder), subfolder="vae", local_files_only=True,
                                            variant=sd15.weights_variant(folder / "vae", "--base"))
        text = CLIPTextModel.from_pretrained(str(folder), subfolder="text_encoder", local_files_only=True,
                                             variant=sd15.weights_variant(folder / "text_encoder", "--base"))
        text2 = CLIPTextModelWithProjection.from_pretrained(
            str(folder), subfolder="text_encoder_2", local_files_only=True,
            variant=sd15.weights_variant(folder / "text_encoder_2", "--base"))
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelFileError(f"--base: cannot load the diffusers folder {folder} ({e})") from e
    for m in (unet, vae, text, text2):
        if any(t.is_floating_point() and t.dtype != dtype for t in m.state_dict().values()):
            m.to(dtype)
    sched = folder / "scheduler"
    tok, tok2 = tokenizers
    return SDXLComponents(unet, vae, text, text2, tok, tok2,
                          sd15.read_scheduler_config(folder if (sched / "scheduler_config.json").is_file()
                                                     else CONFIG_DIR))


def load_sdxl(path: str | os.PathLike, tokenizer: Optional[str] = None, config_dir: str | os.PathLike | None = None,
              dtype: torch.dtype = torch.float32) -> SDXLComponents:
    """SDXL UNet, VAE, both text encoders, tokenizers and scheduler config, frozen, in ``dtype``."""
    p = Path(path)
    cfg = Path(config_dir) if config_dir else CONFIG_DIR
    if not p.exists():
        raise ModelFileError(f"--base: {p} does not exist (give an SDXL single-file checkpoint such as "
                             "sd_xl_base_1.0.safetensors or a diffusers SDXL folder)")
    toks = tokenizers_for(tokenizer, p if p.is_dir() else None, cfg)
    comps = load_diffusers_folder(p, toks, dtype) if p.is_dir() else load_single_file(p, cfg, toks, dtype)
    for m in (comps.unet, comps.vae, comps.text_encoder, comps.text_encoder_2):
        m.requires_grad_(False).eval()
    if int(comps.unet.config.cross_attention_dim) != (int(comps.text_encoder.config.hidden_size)
                                                      + int(comps.text_encoder_2.config.hidden_size)):
        raise BaseModelError(f"--base {p.name}: UNet cross-attention width {comps.unet.config.cross_attention_dim} ≠ "
                             f"the two text widths {comps.text_encoder.config.hidden_size} + "
                             f"{comps.text_encoder_2.config.hidden_size}")
    for t, enc in ((comps.tokenizer, comps.text_encoder), (comps.tokenizer_2, comps.text_encoder_2)):
        t.model_max_length = int(enc.config.max_position_embeddings)
    return comps


# ---------------------------------------------------------------------------------------------------------------
# conditioning

@torch.no_grad()
def encode_prompts(comps: SDXLComponents, prompts: Sequence[str], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(context (B, 77, 2048), pooled (B, 1280))``: both encoders' penultimate hidden states (no final layer norm)
    concatenated, and the second encoder's projected pooled output."""
    outs = []
    pooled = None
    for tok, enc in ((comps.tokenizer, comps.text_encoder), (comps.tokenizer_2, comps.text_encoder_2)):
        length = int(enc.config.max_position_embeddings)
        ids = tok(list(prompts), padding="max_length", max_length=length, truncation=True,
                  return_tensors="pt").input_ids
        dev = device if device is not None else next(enc.parameters()).device
        out = enc(ids.to(dev), output_hidden_states=True)
        outs.append(out.hidden_states[-2])
        if enc is comps.text_encoder_2:
            pooled = out.text_embeds
    return torch.cat(outs, dim=-1), pooled


def time_ids(height: int, width: int, batch: int) -> torch.Tensor:
    """``add_time_ids`` (B, 6): original size (h, w), crop top-left (0, 0), target size (h, w) — the generated
    image's size, as ComfyUI's SDXL conditioning sets it by default."""
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32).repeat(batch, 1)
