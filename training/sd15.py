"""Stable Diffusion 1.5 components for training: offline loading, building from configs, and writing.

Loading (``load_base``), always offline:

* a **diffusers folder** (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``), or
* a **single-file checkpoint** (``.safetensors`` / ``.ckpt`` in the original LDM layout, what ComfyUI users keep
  in ``models/checkpoints``). Its architecture comes from ``training/configs/sd15`` (shipped, tiny JSON files),
  the weights are converted with diffusers' own LDM → diffusers key conversion.

The CLIP BPE tokenizer (~1.5 MB) is not shipped: ``--tokenizer`` names a folder with ``vocab.json`` +
``merges.txt``; otherwise the diffusers folder's ``tokenizer/``, the config folder's ``tokenizer/`` or ComfyUI's
``comfy/sd1_tokenizer`` (found when this pack sits in ``ComfyUI/custom_nodes``) is used.

Writing (``save_diffusers``, ``save_single_file``) and random tiny models (``write_tiny_config_dir`` +
``build_from_configs``) serve tests and the train/infer parity check.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from instantfamily_core.errors import BaseModelError, ModelFileError

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = Path(__file__).resolve().parent / "configs" / "sd15"
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


@dataclass
class SD15Components:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler_config: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# tokenizer

def comfyui_tokenizer_dir() -> Optional[Path]:
    """``<ComfyUI>/comfy/sd1_tokenizer`` when this pack is installed in ``<ComfyUI>/custom_nodes/<pack>``."""
    candidate = REPO_ROOT.parents[1] / "comfy" / "sd1_tokenizer" if len(REPO_ROOT.parents) > 1 else None
    return candidate if candidate is not None and (candidate / "vocab.json").is_file() else None


def find_tokenizer(explicit: Optional[str], base: Optional[Path], config_dir: Path) -> Path:
    candidates = [Path(explicit)] if explicit else []
    if base is not None and base.is_dir():
        candidates.append(base / "tokenizer")
    candidates.append(config_dir / "tokenizer")
    comfy = comfyui_tokenizer_dir()
    if comfy is not None:
        candidates.append(comfy)
    for c in candidates:
        if ((c / "vocab.json").is_file() and (c / "merges.txt").is_file()) or (c / "tokenizer.json").is_file():
            return c
    if explicit:
        raise ModelFileError(f"--tokenizer: {explicit} has no vocab.json + merges.txt or tokenizer.json (a CLIP "
                             "BPE tokenizer folder)")
    raise ModelFileError("tokenizer: no CLIP tokenizer found. Pass --tokenizer <folder with vocab.json and "
                         "merges.txt> (e.g. the 'tokenizer' folder of a diffusers SD1.5 copy, or "
                         "ComfyUI/comfy/sd1_tokenizer)")


def load_tokenizer(folder: Path):
    from transformers import CLIPTokenizer
    try:
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:
        raise ModelFileError(f"tokenizer: cannot load a CLIP tokenizer from {folder} ({e})") from e


# ---------------------------------------------------------------------------------------------------------------
# loading

def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    name = path.name
    if not path.is_file():
        raise ModelFileError(f"base model: file not found at {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
            sd = sd.get("state_dict", sd)
    except Exception as e:
        raise ModelFileError(f"{name}: cannot read the checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(sd, dict):
        raise ModelFileError(f"{name}: expected a state dict, got {type(sd).__name__}")
    return sd


def check_sd15_single_file(sd: dict, name: str) -> None:
    if any(k.startswith("conditioner.embedders") for k in sd):
        raise BaseModelError(f"{name}: this is an SDXL checkpoint; InstantFamily trains on Stable Diffusion 1.5")
    if any(k.startswith("cond_stage_model.model.") for k in sd):
        raise BaseModelError(f"{name}: this is an SD2.x (OpenCLIP) checkpoint; InstantFamily trains on SD1.5")
    key = UNET_PREFIX + "input_blocks.0.0.weight"
    if key not in sd:
        raise BaseModelError(f"{name}: no '{key}'; not an SD1.5 single-file checkpoint (LDM layout)")
    ctx = [v.shape[1] for k, v in sd.items() if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight")]
    if ctx and ctx[0] != 768:
        raise BaseModelError(f"{name}: cross-attention width {ctx[0]}, SD1.5 has 768")
    if not any(k.startswith(TEXT_PREFIX) for k in sd) or not any(k.startswith(VAE_PREFIX) for k in sd):
        raise BaseModelError(f"{name}: the checkpoint lacks the text encoder ('{TEXT_PREFIX}*') or the VAE "
                             f"('{VAE_PREFIX}*'); use a full SD1.5 checkpoint")


def _load_into(model: torch.nn.Module, sd: dict, what: str, name: str) -> torch.nn.Module:
    sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
    result = model.load_state_dict(sd, strict=False, assign=True)
    persistent_missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if persistent_missing or result.unexpected_keys:
        raise ModelFileError(f"{name}: the {what} weights do not match the SD1.5 config (missing "
                             f"{persistent_missing[:4]}, unexpected {result.unexpected_keys[:4]}); is the config "
                             "folder right for this checkpoint?")
    return model


def _empty(cls_or_fn):
    from accelerate import init_empty_weights
    with init_empty_weights():
        return cls_or_fn()


def load_single_file(path: Path, config_dir: Path = CONFIG_DIR, tokenizer=None) -> SD15Components:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint)
    from transformers import CLIPTextConfig, CLIPTextModel

    sd = read_state_dict(path)
    check_sd15_single_file(sd, path.name)
    unet_cfg = UNet2DConditionModel.load_config(str(config_dir / "unet"))
    vae_cfg = AutoencoderKL.load_config(str(config_dir / "vae"))
    text_cfg = CLIPTextConfig.from_pretrained(str(config_dir / "text_encoder"), local_files_only=True)
    unet = _load_into(_empty(lambda: UNet2DConditionModel.from_config(unet_cfg)),
                      convert_ldm_unet_checkpoint(sd, unet_cfg), "UNet", path.name)
    vae = _load_into(_empty(lambda: AutoencoderKL.from_config(vae_cfg)),
                     convert_ldm_vae_checkpoint(sd, vae_cfg), "VAE", path.name)
    text = _load_into(_empty(lambda: CLIPTextModel(text_cfg)), convert_ldm_clip_checkpoint(sd), "text encoder",
                      path.name)
    return SD15Components(unet, vae, text, tokenizer, read_scheduler_config(config_dir))


def load_diffusers_folder(folder: Path, tokenizer=None) -> SD15Components:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel
    for sub in ("unet", "vae", "text_encoder"):
        if not (folder / sub).is_dir():
            raise ModelFileError(f"base model: {folder} is not a diffusers SD1.5 folder (no '{sub}/' inside)")
    try:
        unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet", local_files_only=True)
        vae = AutoencoderKL.from_pretrained(str(folder), subfolder="vae", local_files_only=True)
        text = CLIPTextModel.from_pretrained(str(folder), subfolder="text_encoder", local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelFileError(f"base model: cannot load the diffusers folder {folder} ({e})") from e
    if unet.config.cross_attention_dim != text.config.hidden_size:
        raise BaseModelError(f"base model: UNet cross-attention width {unet.config.cross_attention_dim} ≠ text "
                             f"width {text.config.hidden_size}")
    sched = folder / "scheduler"
    return SD15Components(unet, vae, text, tokenizer,
                          read_scheduler_config(folder if (sched / "scheduler_config.json").is_file() else CONFIG_DIR))


def read_scheduler_config(config_dir: Path) -> dict:
    with open(config_dir / "scheduler" / "scheduler_config.json", encoding="utf-8") as f:
        return json.load(f)


def load_base(path: str | os.PathLike, tokenizer: Optional[str] = None,
              config_dir: str | os.PathLike | None = None) -> SD15Components:
    """SD1.5 UNet, VAE, text encoder, tokenizer and scheduler config from a diffusers folder or a single file."""
    p = Path(path)
    cfg = Path(config_dir) if config_dir else CONFIG_DIR
    if not p.exists():
        raise ModelFileError(f"base model: {p} does not exist (give a diffusers SD1.5 folder or a single-file "
                             "checkpoint such as v1-5-pruned-emaonly.safetensors)")
    tok = load_tokenizer(find_tokenizer(tokenizer, p if p.is_dir() else None, cfg))
    comps = load_diffusers_folder(p, tok) if p.is_dir() else load_single_file(p, cfg, tok)
    for m in (comps.unet, comps.vae, comps.text_encoder):
        m.requires_grad_(False).eval()
    return comps


# ---------------------------------------------------------------------------------------------------------------
# building from configs and writing

def build_from_configs(config_dir: str | os.PathLike, seed: int = 0, tokenizer: Optional[str] = None) -> SD15Components:
    """Randomly initialised (frozen, eval-mode) components from a config folder laid out like
    ``training/configs/sd15``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    cfg = Path(config_dir)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(cfg / "unet")))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(cfg / "vae")))
    text = CLIPTextModel(CLIPTextConfig.from_pretrained(str(cfg / "text_encoder"), local_files_only=True))
    tok = load_tokenizer(find_tokenizer(tokenizer, None, cfg))
    for m in (unet, vae, text):
        m.requires_grad_(False).eval()
    return SD15Components(unet, vae, text, tok, read_scheduler_config(cfg))


def _atomic_safetensors(tensors: dict, path: Path, metadata: Optional[dict] = None) -> None:
    from safetensors.torch import save_file
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=str(path.parent))
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_diffusers(comps: SD15Components, folder: str | os.PathLike) -> Path:
    """A diffusers SD1.5 folder (``model_index.json``, five sub-folders)."""
    out = Path(folder)
    comps.unet.save_pretrained(str(out / "unet"))
    comps.vae.save_pretrained(str(out / "vae"))
    comps.text_encoder.save_pretrained(str(out / "text_encoder"))
    comps.tokenizer.save_pretrained(str(out / "tokenizer"))
    (out / "scheduler").mkdir(parents=True, exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(comps.scheduler_config, indent=2))
    (out / "model_index.json").write_text((CONFIG_DIR / "model_index.json").read_text())
    return out


def unet_to_ldm(sd: dict, config) -> dict:
    """diffusers ``UNet2DConditionModel`` keys → original LDM ``UNetModel`` keys (SD1.x layout)."""
    layers = int(config["layers_per_block"])
    levels = len(config["block_out_channels"])
    resnet = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
              ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]
    prefixes = [("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
                ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2.")]
    for i in range(levels):
        for j in range(layers):
            idx = 1 + i * (layers + 1) + j
            prefixes += [(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{idx}.0."),
                         (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{idx}.1.")]
        if i < levels - 1:
            prefixes.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{1 + i * (layers + 1) + layers}.0.op."))
        has_attn = "CrossAttn" in config["up_block_types"][i]
        for j in range(layers + 1):
            idx = i * (layers + 1) + j
            prefixes += [(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{idx}.0."),
                         (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{idx}.1.")]
        if i < levels - 1:
            prefixes.append((f"up_blocks.{i}.upsamplers.0.conv.",
                             f"output_blocks.{i * (layers + 1) + layers}.{2 if has_attn else 1}.conv."))
    prefixes += [("mid_block.resnets.0.", "middle_block.0."), ("mid_block.attentions.0.", "middle_block.1."),
                 ("mid_block.resnets.1.", "middle_block.2.")]
    out = {}
    for key, value in sd.items():
        for src, dst in prefixes:
            if key.startswith(src):
                rest = key[len(src):]
                if ".resnets." in src or src.startswith("mid_block.resnets"):
                    for a, b in resnet:
                        if rest.startswith(a + "."):
                            rest = b + rest[len(a):]
                            break
                out[dst + rest] = value
                break
        else:
            raise ModelFileError(f"unet_to_ldm: no LDM name for UNet key {key!r}")
    return out


def vae_to_ldm(sd: dict, config) -> dict:
    """diffusers ``AutoencoderKL`` keys → original LDM ``AutoencoderKL`` keys."""
    levels = len(config["block_out_channels"])
    renames = [("conv_norm_out.", "norm_out."), ("mid_block.resnets.0.", "mid.block_1."),
               ("mid_block.resnets.1.", "mid.block_2."), ("mid_block.attentions.0.", "mid.attn_1.")]
    for i in range(levels):
        renames += [(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block."),
                    (f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."),
                    (f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{levels - 1 - i}.block."),
                    (f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{levels - 1 - i}.upsample.")]
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, value in sd.items():
        new = key
        for a, b in renames:
            new = new.replace(a, b)
        new = new.replace("conv_shortcut", "nin_shortcut")
        if ".mid.attn_1." in new:
            head, _, rest = new.partition(".mid.attn_1.")
            layer, _, param = rest.rpartition(".")
            new = f"{head}.mid.attn_1.{attn.get(layer, layer)}.{param}"
            if param == "weight" and value.ndim == 2:
                value = value[:, :, None, None]
        out[new] = value
    return out


def save_single_file(comps: SD15Components, path: str | os.PathLike) -> Path:
    """An SD1.5 single-file checkpoint in the original LDM layout (what ComfyUI and diffusers' single-file
    loaders read), written atomically."""
    p = Path(path)
    tensors = {UNET_PREFIX + k: v for k, v in unet_to_ldm(comps.unet.state_dict(), comps.unet.config).items()}
    tensors.update({VAE_PREFIX + k: v for k, v in vae_to_ldm(comps.vae.state_dict(), comps.vae.config).items()})
    tensors.update({TEXT_PREFIX + k: v for k, v in comps.text_encoder.state_dict().items()
                    if not k.endswith("position_ids")})
    _atomic_safetensors(tensors, p)
    return p


# ---------------------------------------------------------------------------------------------------------------
# tiny random SD1.5-architecture models (tests, parity)

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
    for sub, base_file, tiny, extra in (("unet", "config.json", TINY_UNET, unet), ("vae", "config.json", TINY_VAE, vae),
                                        ("text_encoder", "config.json", TINY_TEXT, text_encoder)):
        cfg = json.loads((CONFIG_DIR / sub / base_file).read_text())
        cfg.update(tiny)
        cfg.update(extra or {})
        (out / sub).mkdir(parents=True, exist_ok=True)
        (out / sub / base_file).write_text(json.dumps(cfg, indent=2))
    (out / "scheduler").mkdir(parents=True, exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(
        (CONFIG_DIR / "scheduler" / "scheduler_config.json").read_text())
    (out / "model_index.json").write_text((CONFIG_DIR / "model_index.json").read_text())
    write_tiny_tokenizer(out / "tokenizer")
    return out
