"""Writers of SD1.5 files, the inverse of :mod:`training.sd15`'s loaders: a diffusers folder and a single file in
the original LDM layout. Test-only: the tiny random setups are written with them, and the conversion is checked
against diffusers' own LDM → diffusers conversion (``tests/test_training_sd15.py``). Real-layout fixtures are built
independently, from ComfyUI's modules (``sd15_layouts.py``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from instantfamily_core.errors import ModelFileError
from instantfamily_core.fileio import save_safetensors_atomic, write_text_atomic
from training.sd15 import CONFIG_DIR, TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX, SD15Components



def save_diffusers(comps: SD15Components, folder: str | os.PathLike) -> Path:
    """A diffusers SD1.5 folder (``model_index.json``, five sub-folders)."""
    out = Path(folder)
    comps.unet.save_pretrained(str(out / "unet"))
    comps.vae.save_pretrained(str(out / "vae"))
    comps.text_encoder.save_pretrained(str(out / "text_encoder"))
    comps.tokenizer.save_pretrained(str(out / "tokenizer"))
    write_text_atomic(out / "scheduler" / "scheduler_config.json", json.dumps(comps.scheduler_config, indent=2))
    write_text_atomic(out / "model_index.json", (CONFIG_DIR / "model_index.json").read_text())
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
    save_safetensors_atomic({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(p))
    return p
