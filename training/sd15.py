"""Stable Diffusion 1.5 components for training: offline loading.

Loading (``load_base``), always offline:

* a **diffusers folder** (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``), or
* a **single-file checkpoint** (``.safetensors`` / ``.ckpt`` in the original LDM layout, what ComfyUI users keep
  in ``models/checkpoints``), in every layout in use (see :func:`load_base`). Its architecture comes from
  ``training/configs/sd15`` (shipped, tiny JSON files); UNet and VAE weights are converted with diffusers' own
  LDM → diffusers key conversion, text-encoder keys are mapped to the installed ``CLIPTextModel``'s own names.

Whatever the file stores, the components come back in fp32 (training casts the frozen ones afterwards).

The CLIP BPE tokenizer (~1.5 MB) is not shipped: ``--tokenizer`` names a folder with ``vocab.json`` +
``merges.txt``; otherwise the diffusers folder's ``tokenizer/``, the config folder's ``tokenizer/`` or ComfyUI's
``comfy/sd1_tokenizer`` (found when this pack sits in ``ComfyUI/custom_nodes``) is used.

Writers (the inverse of loading) and random tiny models exist for the tests only: ``tests/support/sd15_writers.py``
and ``tests/support/tiny_sd15.py``.
"""

from __future__ import annotations

import json
import os
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

def _safetensors_expected_size(path: Path) -> Optional[int]:
    """Size a ``.safetensors`` file must have according to its own header (None: no readable header)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return None
            n = int.from_bytes(head, "little")
            if n <= 0 or n > 100_000_000:
                return None
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    return 8 + n + max(ends, default=0)


def read_state_dict(path: Path, what: str = "base model") -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` or PyTorch (``.ckpt``/``.pt``/``.pth``/``.bin``) file, unwrapped from a
    ``state_dict`` entry (or a single-entry wrapper) the way ComfyUI's ``load_torch_file`` does. PyTorch files are
    read with ``weights_only=True`` (no code runs); a truncated file is reported as such."""
    path = Path(path)
    name = path.name
    if not path.is_file():
        raise ModelFileError(f"{what}: file not found at {path}")
    size = path.stat().st_size
    if path.suffix == ".safetensors":
        expected = _safetensors_expected_size(path)
        if expected is None:
            raise ModelFileError(f"{what}: {name} is not a readable .safetensors file (no valid header; "
                                 f"{size} bytes)")
        if size < expected:
            raise ModelFileError(f"{what}: {name} is truncated: {size} bytes of the {expected} its header "
                                 "declares; copy or download it again")
        try:
            from safetensors.torch import load_file
            sd = load_file(str(path))
        except Exception as e:  # safetensors raises several types for corrupt files
            raise ModelFileError(f"{what}: cannot read {name} ({type(e).__name__}: {e})") from None
    else:
        import zipfile
        if zipfile.is_zipfile(path):
            try:
                sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise ModelFileError(f"{what}: cannot read {name} safely ({type(e).__name__}: {e}); convert it to "
                                     ".safetensors") from None
        else:
            with open(path, "rb") as f:
                magic = f.read(4)
            if magic[:2] == b"PK":  # a zip archive without its central directory: cut short
                raise ModelFileError(f"{what}: {name} is truncated (a PyTorch zip archive without its end, "
                                     f"{size} bytes); copy or download it again")
            try:
                sd = torch.load(str(path), map_location="cpu", weights_only=True)
            except Exception as e:
                raise ModelFileError(f"{what}: cannot read {name} as a PyTorch checkpoint ({type(e).__name__}: "
                                     f"{e}); is the file complete?") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    elif isinstance(sd, dict) and len(sd) == 1 and isinstance(next(iter(sd.values())), dict):
        sd = next(iter(sd.values()))
    if not isinstance(sd, dict) or not sd:
        raise ModelFileError(f"{what}: {name}: expected a state dict of tensors, got {type(sd).__name__}")
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def describe_file(sd: dict) -> Optional[str]:
    """What a state dict that is *not* a full SD1.5 checkpoint is, for error messages (None: looks like SD1.5)."""
    keys = list(sd)
    if any(k.startswith("conditioner.embedders") for k in keys) or UNET_PREFIX + "label_emb.0.0.weight" in sd:
        return "an SDXL checkpoint"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "an SD2.x checkpoint (OpenCLIP text encoder)"
    if any(("lora_down" in k or "lora_up" in k or ".lora_A." in k or ".lora_B." in k or k.startswith(("lora_unet_",
           "lora_te"))) for k in keys):
        return "a LoRA"
    if any(k.startswith("control_model.") or k.startswith("zero_convs.") or k.startswith("input_hint_block.")
           or k.startswith("controlnet_cond_embedding.") for k in keys) and UNET_PREFIX + "input_blocks.0.0.weight" \
            not in sd:
        return "a ControlNet"
    if "string_to_param" in sd or "emb_params" in sd or "clip_l" in sd:
        return "a textual-inversion embedding"
    if any(k.startswith(("encoder.down.", "decoder.up.", "encoder.down_blocks.", "decoder.up_blocks.")) for k in keys) \
            and not any(k.startswith(UNET_PREFIX) for k in keys):
        return "a VAE"
    if any(k.startswith(("down_blocks.", "mid_block.", "conv_in.")) for k in keys):
        return "a diffusers UNet weight file (give the whole diffusers folder instead)"
    conv_in = sd.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None:
        return "not an SD checkpoint in the original (LDM) layout (no 'model.diffusion_model.input_blocks.0.0.weight')"
    if conv_in.ndim == 4 and conv_in.shape[1] == 9:
        return "an SD1.5 inpainting checkpoint (9 input channels)"
    if conv_in.ndim == 4 and conv_in.shape[1] != 4:
        return f"a UNet with {conv_in.shape[1]} input channels (SD1.5 has 4)"
    ctx = [v.shape[1] for k, v in sd.items() if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight")]
    if ctx and ctx[0] == 1024:
        return "an SD2.x checkpoint (1024-wide cross-attention)"
    if ctx and ctx[0] != 768:
        return f"a UNet with {ctx[0]}-wide cross-attention (SD1.5 has 768)"
    return None


def check_sd15_single_file(sd: dict, name: str) -> None:
    kind = describe_file(sd)
    if kind is not None:
        raise BaseModelError(f"--base {name}: this is {kind}; InstantFamily trains on a full Stable Diffusion 1.5 "
                             "checkpoint (UNet + VAE + CLIP text encoder, e.g. v1-5-pruned-emaonly.safetensors)")
    if not any(k.startswith(TEXT_PREFIX) for k in sd) or not any(k.startswith(VAE_PREFIX) for k in sd):
        raise BaseModelError(f"--base {name}: the checkpoint lacks the text encoder ('{TEXT_PREFIX}*') or the VAE "
                             f"('{VAE_PREFIX}*'); use a full SD1.5 checkpoint")


EMA_BOOKKEEPING = ("model_ema.decay", "model_ema.num_updates")


def use_ema_weights(sd: dict, name: str) -> bool:
    """Replace the UNet weights of a non-pruned LDM checkpoint by its EMA weights, in place.

    LDM's ``LitEma`` keeps one buffer per UNet parameter, named ``model_ema.`` + the parameter name under ``model.``
    with the dots removed (``model.diffusion_model.input_blocks.0.0.weight`` → ``model_ema.diffusion_modelinput_
    blocks00weight``; diffusers' ``convert_ldm_unet_checkpoint(extract_ema=True)`` uses the same rule). Returns True
    when EMA weights were used."""
    ema = [k for k in sd if k.startswith("model_ema.") and k not in EMA_BOOKKEEPING]
    if not ema:
        for k in EMA_BOOKKEEPING:
            sd.pop(k, None)
        return False
    unet = [k for k in sd if k.startswith(UNET_PREFIX)]
    flat = {k: "model_ema." + k[len("model."):].replace(".", "") for k in unet}
    missing = [k for k, e in flat.items() if e not in sd and not k.endswith(("position_ids",))]
    if missing:
        raise ModelFileError(f"{name}: has {len(ema)} EMA tensors ('model_ema.*') but none for {len(missing)} of the "
                             f"{len(unet)} UNet tensors (e.g. {missing[0]}); the file is damaged or not an LDM "
                             "checkpoint")
    for k, e in flat.items():
        if e in sd:
            if sd[e].shape != sd[k].shape:
                raise ModelFileError(f"{name}: EMA tensor {e} has shape {tuple(sd[e].shape)}, {k} has "
                                     f"{tuple(sd[k].shape)}")
            sd[k] = sd.pop(e)
    for k in [k for k in sd if k.startswith("model_ema.")]:
        del sd[k]
    return True


def text_encoder_state(sd: dict, model_keys: list[str], prefix: str = TEXT_PREFIX) -> dict:
    """``<prefix>*`` (SD1.5: ``cond_stage_model.transformer.``; with or without ``text_model.``) → the installed
    ``CLIPTextModel``'s own key names (``text_model.*`` in transformers 4.x, bare in 5.x). ``position_ids`` (a
    fixed ``arange(77)`` that some files store, sometimes as damaged floats) and CLIP's ``text_projection``/
    ``logit_scale`` are dropped."""
    own = "text_model." if any(k.startswith("text_model.") for k in model_keys) else ""
    out = {}
    for k, v in sd.items():
        if not k.startswith(prefix):
            continue
        bare = k[len(prefix):]
        bare = bare[len("text_model."):] if bare.startswith("text_model.") else bare
        if bare.endswith("position_ids") or bare in ("text_projection.weight", "logit_scale"):
            continue
        out[own + bare] = v
    return out


def load_into(model: torch.nn.Module, sd: dict, what: str, name: str, dtype: torch.dtype = torch.float32,
              arch: str = "", hint: str = "") -> torch.nn.Module:
    """Load ``sd`` into an empty (meta) ``model`` in ``dtype``: every persistent tensor present, names and shapes as
    the model has them, else a :class:`ModelFileError` naming the file, what differs and ``arch`` (e.g. "SD1.5";
    empty: "the expected architecture"), followed by ``hint``."""
    expected = model.state_dict()
    persistent = {k: v for k, v in expected.items() if not k.endswith("position_ids")}
    missing = sorted(set(persistent) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise ModelFileError(f"{name}: the {what} weights do not match the {arch or 'expected'} architecture (missing "
                             f"{len(missing)}: {missing[:3]}, unexpected {len(unexpected)}: {unexpected[:3]}){hint}")
    bad = [f"{k} {tuple(sd[k].shape)} ≠ {tuple(v.shape)}" for k, v in persistent.items() if sd[k].shape != v.shape]
    if bad:
        raise ModelFileError(f"{name}: {len(bad)} {what} tensors have the wrong shape{' for ' + arch if arch else ''} "
                             f"({bad[:3]})")
    # convert one tensor at a time, dropping the stored one as we go: peak memory ≈ the model in ``dtype``
    # (callers hand over the only references, see load_single_file)
    converted = {}
    for k in list(sd):
        v = sd.pop(k)
        converted[k] = v.to(dtype) if v.is_floating_point() else v
        del v
    model.load_state_dict(converted, strict=False, assign=True)
    return model


def _load_into(model: torch.nn.Module, sd: dict, what: str, name: str,
               dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """:func:`load_into` for SD1.5 files."""
    return load_into(model, sd, what, name, dtype, "SD1.5", "; is it an SD1.5 checkpoint, and is the config "
                     "folder right for it?")


def _drop(sd: dict, prefix: str) -> None:
    for k in [k for k in sd if k.startswith(prefix)]:
        del sd[k]


def _empty(cls_or_fn):
    from accelerate import init_empty_weights
    with init_empty_weights():
        return cls_or_fn()


def load_single_file(path: Path, config_dir: Path = CONFIG_DIR, tokenizer=None,
                     dtype: torch.dtype = torch.float32) -> SD15Components:
    """An SD1.5 single file in any layout in use (see :func:`load_base`), every tensor in ``dtype``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    path = Path(path)
    sd = read_state_dict(path)
    check_sd15_single_file(sd, path.name)
    use_ema_weights(sd, path.name)
    unet_cfg = UNet2DConditionModel.load_config(str(config_dir / "unet"))
    vae_cfg = AutoencoderKL.load_config(str(config_dir / "vae"))
    text_cfg = CLIPTextConfig.from_pretrained(str(config_dir / "text_encoder"), local_files_only=True)
    # each part's tensors leave ``sd`` before they are converted, so that the stored copies are freed one by one
    text = _empty(lambda: CLIPTextModel(text_cfg))
    part = text_encoder_state(sd, list(text.state_dict()))
    _drop(sd, TEXT_PREFIX)
    text = _load_into(text, part, "text encoder", path.name, dtype)
    part = convert_ldm_vae_checkpoint(sd, vae_cfg)
    _drop(sd, VAE_PREFIX)
    vae = _load_into(_empty(lambda: AutoencoderKL.from_config(vae_cfg)), part, "VAE", path.name, dtype)
    part = convert_ldm_unet_checkpoint(sd, unet_cfg)
    sd.clear()
    unet = _load_into(_empty(lambda: UNet2DConditionModel.from_config(unet_cfg)), part, "UNet", path.name, dtype)
    del part
    return SD15Components(unet, vae, text, tokenizer, read_scheduler_config(config_dir))


STANDARD_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", "model.safetensors",
                    "pytorch_model.bin", "diffusion_pytorch_model.safetensors.index.json",
                    "model.safetensors.index.json", "pytorch_model.bin.index.json",
                    "diffusion_pytorch_model.bin.index.json")


def weights_variant(folder: Path, what: str = "base model") -> Optional[str]:
    """``None`` when a diffusers/transformers sub-folder has the standard weight files, else the variant its files
    carry (``diffusion_pytorch_model.fp16.safetensors`` → ``fp16``)."""
    names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    if any(n in STANDARD_WEIGHTS for n in names):
        return None
    for n in sorted(names):
        parts = n.split(".")
        if len(parts) >= 3 and parts[0] in ("diffusion_pytorch_model", "model", "pytorch_model") and \
                parts[-1] in ("safetensors", "bin", "json"):
            return parts[1]
    raise ModelFileError(f"{what}: {folder} has no weights (expected diffusion_pytorch_model[.fp16].safetensors "
                         "or model[.fp16].safetensors)")


def load_diffusers_folder(folder: Path, tokenizer=None, dtype: torch.dtype = torch.float32) -> SD15Components:
    """A diffusers SD1.5 folder, also with only fp16 (or other variant) weight files, every tensor in ``dtype``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel
    folder = Path(folder)
    if (folder / "text_encoder_2").is_dir():
        raise BaseModelError(f"--base {folder}: this is an SDXL diffusers folder (it has text_encoder_2/); "
                             "InstantFamily trains on Stable Diffusion 1.5")
    for sub in ("unet", "vae", "text_encoder"):
        if not (folder / sub).is_dir():
            raise ModelFileError(f"base model: {folder} is not a diffusers SD1.5 folder (no '{sub}/' inside)")
    unet_cfg = UNet2DConditionModel.load_config(str(folder / "unet"))
    if int(unet_cfg.get("cross_attention_dim", 768)) != 768 or int(unet_cfg.get("in_channels", 4)) != 4:
        kind = "an inpainting model (9 input channels)" if int(unet_cfg.get("in_channels", 4)) == 9 else \
            f"a UNet with {unet_cfg.get('cross_attention_dim')}-wide cross-attention (SD2.x: 1024)"
        raise BaseModelError(f"--base {folder}: this is {kind}; InstantFamily trains on Stable Diffusion 1.5")
    try:
        unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet", local_files_only=True,
                                                    variant=weights_variant(folder / "unet"))
        vae = AutoencoderKL.from_pretrained(str(folder), subfolder="vae", local_files_only=True,
                                            variant=weights_variant(folder / "vae"))
        text = CLIPTextModel.from_pretrained(str(folder), subfolder="text_encoder", local_files_only=True,
                                             variant=weights_variant(folder / "text_encoder"))
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelFileError(f"base model: cannot load the diffusers folder {folder} ({e})") from e
    if unet.config.cross_attention_dim != text.config.hidden_size:
        raise BaseModelError(f"base model: UNet cross-attention width {unet.config.cross_attention_dim} ≠ text "
                             f"width {text.config.hidden_size}")
    for m in (unet, vae, text):
        if any(t.is_floating_point() and t.dtype != dtype for t in m.state_dict().values()):
            m.to(dtype)
    sched = folder / "scheduler"
    return SD15Components(unet, vae, text, tokenizer,
                          read_scheduler_config(folder if (sched / "scheduler_config.json").is_file() else CONFIG_DIR))


def read_scheduler_config(config_dir: Path) -> dict:
    with open(config_dir / "scheduler" / "scheduler_config.json", encoding="utf-8") as f:
        return json.load(f)


def load_base(path: str | os.PathLike, tokenizer: Optional[str] = None,
              config_dir: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32) -> SD15Components:
    """SD1.5 UNet, VAE, text encoder, tokenizer and scheduler config, frozen, every tensor in ``dtype`` (fp32 by
    default, whatever the file stores).

    ``path``: a diffusers folder (also fp16-variant-only) or a single file (``.safetensors``/``.ckpt``, with or
    without a ``state_dict`` wrapper; text encoder as ``cond_stage_model.transformer.text_model.*`` or the older
    ``cond_stage_model.transformer.*``, with or without ``position_ids``; fp32/fp16/bf16; a non-pruned file's EMA
    weights are used). The tokenizer always pads/truncates to the text encoder's positions (77)."""
    p = Path(path)
    cfg = Path(config_dir) if config_dir else CONFIG_DIR
    if not p.exists():
        raise ModelFileError(f"base model: {p} does not exist (give a diffusers SD1.5 folder or a single-file "
                             "checkpoint such as v1-5-pruned-emaonly.safetensors)")
    tok = load_tokenizer(find_tokenizer(tokenizer, p if p.is_dir() else None, cfg))
    comps = load_diffusers_folder(p, tok, dtype) if p.is_dir() else load_single_file(p, cfg, tok, dtype)
    for m in (comps.unet, comps.vae, comps.text_encoder):
        m.requires_grad_(False).eval()
    tok.model_max_length = int(comps.text_encoder.config.max_position_embeddings)
    return comps
