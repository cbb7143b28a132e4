"""The InstantFamily model for training and for checking train/infer parity.

Context for **both** the UNet and the ControlNet = ``stack_context(text (B, 77, 768), identity tokens)``; every
attn2 of both runs the core's :class:`~instantfamily_core.attention.MaskedCrossAttention` through
:mod:`training.processors`. The ControlNet reads the pose image (float RGB in [0, 1], ``(B, 3, H, W)``) and adds its
residuals to the UNet, scaled by ``conditioning_scale``.

Public API (used by ``train.py`` and by the ComfyUI parity test)::

    predict_noise(unet, controlnet, projector, noisy_latents, timesteps, text_embeddings, identities, masks,
                  control_image, mask_mode="additive", conditioning_scale=1.0, identity_weights=None) -> noise_pred
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from instantfamily_core.attention import MaskedCrossAttention
from instantfamily_core.checkpoint import CONTROLNET_HINT_CHANNELS, CheckpointMeta, save_checkpoint
from instantfamily_core.errors import (BaseModelError, CheckpointError, EmbeddingError, IdentityCountError,
                                        ModelFileError, OptionError)
from instantfamily_core.identity import IdentityFeatures
from instantfamily_core.projector import IdentityProjector
from instantfamily_core.stack import stack_context

from training.processors import MaskContext, MaskedCrossAttnProcessor, install_processors


@dataclass
class IdentityBatch:
    """Per-row identity features for ``N`` slots, padded.

    ``global_embedding`` ``(B, N, D_g)``; ``local_map`` ``(B, N, D_l, L, L)``; ``present`` ``(B, N)`` bool (False =
    padding slot → null tokens); ``drop`` ``(B,)`` bool (True = identity dropout for classifier-free guidance: every
    slot of the row gets the null tokens, masks unchanged).
    """

    global_embedding: torch.Tensor
    local_map: torch.Tensor
    present: torch.Tensor
    drop: Optional[torch.Tensor] = None

    def to(self, device) -> "IdentityBatch":
        return IdentityBatch(self.global_embedding.to(device), self.local_map.to(device), self.present.to(device),
                             None if self.drop is None else self.drop.to(device))


Identities = Union[torch.Tensor, Sequence[IdentityFeatures], IdentityBatch]


def batch_tokens(projector: IdentityProjector, batch: IdentityBatch) -> torch.Tensor:
    """``(B, N, T, D)`` tokens: projected features where present (and not dropped), null tokens elsewhere.

    Every slot goes through the projector (absent ones on zeros) so all projector parameters take part in every
    step — DDP then needs no ``find_unused_parameters``."""
    g, loc, present = batch.global_embedding, batch.local_map, batch.present.bool()
    if g.ndim != 3 or loc.ndim != 5 or present.shape != g.shape[:2] or loc.shape[:2] != g.shape[:2]:
        raise EmbeddingError(f"identity batch: expected global (B, N, D_g), local (B, N, D_l, L, L), present (B, N); "
                             f"got {tuple(g.shape)}, {tuple(loc.shape)}, {tuple(present.shape)}")
    b, n = present.shape
    p = projector.null_tokens
    if n == 0:
        return p.new_zeros((b, 0, *p.shape))
    tokens = projector(g.reshape(b * n, -1).to(p.device, p.dtype),
                       loc.reshape(b * n, *loc.shape[2:]).to(p.device, p.dtype)).reshape(b, n, *p.shape)
    keep = present.to(p.device)
    if batch.drop is not None:
        keep = keep & ~batch.drop.bool().to(p.device)[:, None]
    return torch.where(keep[:, :, None, None], tokens, p.expand_as(tokens))


def identity_tokens(projector: IdentityProjector, identities: Identities) -> torch.Tensor:
    """Tokens ``(N, T, D)`` (shared by the batch) or ``(B, N, T, D)`` from any accepted identity input."""
    if isinstance(identities, IdentityBatch):
        return batch_tokens(projector, identities)
    if isinstance(identities, torch.Tensor):
        if identities.ndim not in (3, 4) or identities.shape[-2:] != projector.null_tokens.shape:
            raise IdentityCountError(f"identity tokens: expected (N, T, D) or (B, N, T, D) with (T, D) = "
                                     f"{tuple(projector.null_tokens.shape)}, got {tuple(identities.shape)}")
        return identities
    return projector.project(list(identities))


def ensure_processors(model: nn.Module) -> None:
    """Install the InstantFamily processors on ``model`` unless every attn2 already has them."""
    procs = model.attn_processors
    if not all(isinstance(p, MaskedCrossAttnProcessor) for k, p in procs.items() if k.endswith("attn2.processor")):
        install_processors(model)


def predict_noise(unet, controlnet, projector: IdentityProjector, noisy_latents: torch.Tensor,
                  timesteps: torch.Tensor, text_embeddings: torch.Tensor, identities: Identities,
                  masks: torch.Tensor, control_image: Optional[torch.Tensor], mask_mode: str = "additive",
                  conditioning_scale: float = 1.0,
                  identity_weights: Optional[Sequence[float]] = None) -> torch.Tensor:
    """The UNet's noise prediction with the ControlNet and masked cross-attention in both.

    ``noisy_latents`` (B, 4, h, w); ``timesteps`` scalar or (B,); ``text_embeddings`` (B, 77, 768) (CLIP last
    hidden state after the final layer norm); ``identities``: a list of :class:`IdentityFeatures` (projected here,
    shared by the batch), a tensor of tokens (N, T, D) / (B, N, T, D), or an :class:`IdentityBatch`; ``masks``
    (N, H, W) or per-row (B, N, H, W) in [0, 1] at any resolution (image resolution in practice; all-zero = padding
    slot); ``control_image`` (B, 3, H, W) float RGB in [0, 1], or None to run the UNet alone;
    ``identity_weights`` N per-identity weights (default 1). Returns (B, 4, h, w).
    """
    tokens = identity_tokens(projector, identities)
    context, layout = stack_context(text_embeddings, tokens)
    attention = MaskedCrossAttention(masks, layout.tokens_per_identity, identity_weights, mode=mask_mode) \
        if layout.num_identities else None
    if attention is not None and attention.num_identities != layout.num_identities:
        raise IdentityCountError(f"masks: {attention.num_identities} masks for {layout.num_identities} identities; "
                                 "give one mask per identity, in slot order")
    state = MaskContext(attention, (int(noisy_latents.shape[-2]), int(noisy_latents.shape[-1])))
    context = context.to(noisy_latents.dtype)
    down, mid = None, None
    ensure_processors(unet)
    if control_image is not None:
        ensure_processors(controlnet)
        down, mid = controlnet(noisy_latents, timesteps, encoder_hidden_states=context,
                               controlnet_cond=control_image.to(noisy_latents.dtype),
                               conditioning_scale=conditioning_scale, cross_attention_kwargs=state.as_kwargs(),
                               return_dict=False)
        # a fp32 ControlNet on a half-precision frozen UNet: residuals in the UNet's dtype (as diffusers' scripts do)
        down, mid = [d.to(noisy_latents.dtype) for d in down], mid.to(noisy_latents.dtype)
    return unet(noisy_latents, timesteps, encoder_hidden_states=context, down_block_additional_residuals=down,
                mid_block_additional_residual=mid, cross_attention_kwargs=state.as_kwargs(), return_dict=False)[0]


def make_controlnet(unet):
    """A pose ControlNet initialised from the UNet's weights (zero convolutions at zero), with our processors, in
    fp32 (the paper's initialisation; :func:`load_controlnet_init` starts from a public OpenPose ControlNet instead).

    The hint encoder keeps the standard ``(16, 32, 96, 256)`` channels: ComfyUI's ControlNet loader maps exactly
    that layout onto its ``input_hint_block``."""
    from diffusers import ControlNetModel
    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=CONTROLNET_HINT_CHANNELS)
    install_processors(cn)
    return as_fp32(cn)  # trained weights are fp32 (call this before casting the frozen UNet)


def as_fp32(module: nn.Module) -> nn.Module:
    """``module`` with every floating-point tensor in fp32 (left as it is when it already is)."""
    if any(t.is_floating_point() and t.dtype != torch.float32 for t in module.state_dict().values()):
        module.to(torch.float32)
    return module



def controlnet_weights_in_folder(folder: Path, name: str, what: str) -> Path:
    """The one ``diffusion_pytorch_model[.<variant>].safetensors`` (or ``.bin``) of a diffusers ControlNet
    folder; published folders carry both: safetensors preferred."""
    from training import sd15
    variant = sd15.weights_variant(folder, what)
    weights = [f for f in folder.iterdir() if f.name.startswith("diffusion_pytorch_model") and
               f.name.split(".")[-1] in ("safetensors", "bin") and
               (variant is None and f.name.count(".") == 1 or variant is not None and f".{variant}." in f.name)]
    if any(w.suffix == ".safetensors" for w in weights):
        weights = [w for w in weights if w.suffix == ".safetensors"]
    if len(weights) != 1:
        raise ModelFileError(f"{name}: expected one diffusion_pytorch_model[.<variant>].safetensors or .bin in "
                             f"{folder}, found {[w.name for w in weights]}")
    return weights[0]


def controlnet_state(sd: dict, target, refuse: Callable[[dict], Exception]) -> dict:
    """A ControlNet state dict in diffusers names for ``target`` (a diffusers ControlNetModel): diffusers files as
    they are, ldm files (``control_model.`` prefix or none) converted; else ``refuse(sd)`` is raised (``sd``
    without the ``control_model.`` prefix)."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
    if any(k.startswith("control_model.") for k in sd):
        sd = {k[len("control_model."):]: v for k, v in sd.items() if k.startswith("control_model.")}
    if "controlnet_cond_embedding.conv_in.weight" in sd:
        return sd
    if "zero_convs.0.0.weight" in sd and "input_hint_block.0.weight" in sd:
        return convert_controlnet_checkpoint(sd, dict(target.config))
    raise refuse(sd)


def load_controlnet_init(path, unet):
    """The pose ControlNet initialised from a public SD1.5 OpenPose ControlNet (``control_v11p_sd15_openpose``),
    in fp32, with our processors, shaped like :func:`make_controlnet`'s.

    ``path``: a diffusers folder (``config.json`` + ``diffusion_pytorch_model[.fp16].safetensors``/``.bin``) or a
    single file: the original (LDM) layout, ``.pth``/``.safetensors``, with or without the ``control_model.``
    prefix (ControlNet 1.0 files that also hold a full SD model are fine: only ``control_model.*`` is read), or
    diffusers keys in one file. fp16 and fp32 files alike. The LDM → diffusers key conversion is diffusers' own."""
    from diffusers import ControlNetModel

    from training import sd15
    p = Path(path)
    name = f"--controlnet-init {p.name}"
    if not p.exists():
        raise ModelFileError(f"--controlnet-init: {p} does not exist (give control_v11p_sd15_openpose.pth, its "
                             "fp16 .safetensors, or the diffusers folder lllyasviel/control_v11p_sd15_openpose)")
    target = sd15._empty(lambda: ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=CONTROLNET_HINT_CHANNELS, load_weights_from_unet=False))
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelFileError(f"{name}: a folder must be a diffusers ControlNet (config.json + "
                                 "diffusion_pytorch_model.safetensors)")
        sd = sd15.read_state_dict(controlnet_weights_in_folder(p, name, "--controlnet-init"), "--controlnet-init")
    else:
        sd = sd15.read_state_dict(p, "--controlnet-init")
    converted = controlnet_state(sd, target, lambda sd: BaseModelError(
        f"{name}: not a ControlNet ({sd15.describe_file(sd) or 'no ControlNet keys'}); expected an SD1.5 "
        "ControlNet such as control_v11p_sd15_openpose"))
    hint = converted.get("controlnet_cond_embedding.conv_in.weight")
    if hint is not None and hint.ndim == 4 and hint.shape[1] != 3:
        raise BaseModelError(f"{name}: its hint encoder takes {hint.shape[1]} channels; the pose ControlNet reads an "
                             "RGB pose image (3 channels)")
    ctx = [v.shape[1] for k, v in converted.items() if k.endswith("attn2.to_k.weight")]
    if ctx and ctx[0] != int(unet.config.cross_attention_dim):
        raise BaseModelError(f"{name}: a ControlNet with {ctx[0]}-wide cross-attention (SDXL: 2048, SD2.x: 1024); "
                             f"the base model has {unet.config.cross_attention_dim} (SD1.5)")
    cn = sd15._load_into(target, converted, "ControlNet", name)
    install_processors(cn)
    return cn


class InstantFamilyNet(nn.Module):
    """The trainable part (ControlNet + projector) as one module for accelerate/DDP; the frozen UNet is passed in
    at call time so it is not wrapped, sharded or saved with it."""

    def __init__(self, controlnet, projector: IdentityProjector, mask_mode: str = "additive"):
        super().__init__()
        self.controlnet = controlnet
        self.projector = projector
        self.mask_mode = mask_mode

    def forward(self, unet, noisy_latents, timesteps, text_embeddings, identities: IdentityBatch, masks,
                control_image):
        return predict_noise(unet, self.controlnet, self.projector, noisy_latents, timesteps, text_embeddings,
                             identities, masks, control_image, mask_mode=self.mask_mode)


# ---------------------------------------------------------------------------------------------------------------
# text, control images, export

@torch.no_grad()
def encode_text(text_encoder, tokenizer, captions: Sequence[str], device=None) -> torch.Tensor:
    """CLIP last hidden state (after the final layer norm) ``(B, 77, D)``, the context SD1.5 was trained with.

    Captions are padded/truncated to the text encoder's own positions (``config.max_position_embeddings``, 77),
    whatever the tokenizer's ``model_max_length`` says (ComfyUI's ``sd1_tokenizer`` declares 8192)."""
    length = int(text_encoder.config.max_position_embeddings)
    ids = tokenizer(list(captions), padding="max_length", max_length=length, truncation=True,
                    return_tensors="pt").input_ids
    dev = device if device is not None else next(text_encoder.parameters()).device
    return text_encoder(ids.to(dev))[0]


def control_tensor(images: Sequence[np.ndarray]) -> torch.Tensor:
    """``draw_control_image`` outputs (H×W×3 uint8 RGB) → ``(B, 3, H, W)`` float in [0, 1]."""
    return torch.stack([torch.from_numpy(np.ascontiguousarray(i)).permute(2, 0, 1).float() / 255.0 for i in images])


def json_config(config) -> dict:
    """A diffusers config as plain JSON (tuples → lists, FrozenDict → dict), without diffusers' bookkeeping keys
    (``_use_default_values``, ``_name_or_path``: local paths)."""
    cfg = {k: v for k, v in dict(config).items() if k not in ("_use_default_values", "_name_or_path")}
    return json.loads(json.dumps(cfg, default=lambda o: list(o) if isinstance(o, (tuple, set)) else str(o)))


EXPORT_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


def export_checkpoint(path, projector: IdentityProjector, controlnet, face_pack: str, mask_mode: str = "additive",
                      max_identities: int = 4, controlnet_state: Optional[dict] = None,
                      extra: Optional[dict] = None, dtype: str = "fp32") -> None:
    """Write the pack's checkpoint (schema v1, diffusers ControlNet layout) atomically.

    ``controlnet``: a diffusers ``ControlNetModel`` (config and weights) or its config as a dict (then
    ``controlnet_state`` is required); ``controlnet_state`` overrides the weights (e.g. EMA weights); ``dtype``
    (``fp16`` | ``fp32``): the floating-point tensors are written in it (the training CLIs export fp16 by default,
    as SD1.5 files are shared)."""
    if dtype not in EXPORT_DTYPES:
        raise OptionError(f"export: --dtype {dtype!r} unknown; expected one of {sorted(EXPORT_DTYPES)}")
    target = EXPORT_DTYPES[dtype]
    if isinstance(controlnet, dict):
        if controlnet_state is None:
            raise CheckpointError("export: a ControlNet config dict needs controlnet_state (the weights)")
        config = json_config(controlnet)
    else:
        config = json_config(controlnet.config)
    state = controlnet_state if controlnet_state is not None else controlnet.state_dict()
    state = {k: (v.detach().to(target) if v.is_floating_point() else v) for k, v in state.items()}
    projector = copy.deepcopy(projector).to(target)
    meta = CheckpointMeta(face_pack=face_pack, projector=projector.config, mask_mode=mask_mode,
                          controlnet_layout="diffusers", controlnet_config=config,
                          max_identities=int(max_identities), extra={"dtype": dtype, **dict(extra or {})})
    save_checkpoint(str(path), projector, state, meta)


def load_controlnet_from_checkpoint(ckpt):
    """The diffusers ControlNet of a loaded :class:`InstantFamilyCheckpoint` (diffusers layout), with processors."""
    from diffusers import ControlNetModel
    if ckpt.meta.controlnet_layout != "diffusers" or ckpt.meta.controlnet_config is None:
        raise CheckpointError("checkpoint: only diffusers-layout ControlNets with a stored config can be rebuilt "
                              "here")
    cfg = {k: v for k, v in ckpt.meta.controlnet_config.items() if not k.startswith("_")}
    cn = ControlNetModel.from_config(cfg)
    cn.load_state_dict(ckpt.controlnet, strict=True)
    install_processors(cn)
    return cn.eval()


# ---------------------------------------------------------------------------------------------------------------
# sampling (validation images)

@torch.no_grad()
def sample_latents(unet, controlnet, projector, scheduler, text, uncond_text, identities: IdentityBatch, masks,
                   control, latent_shape, steps: int = 20, guidance: float = 5.0, mask_mode: str = "additive",
                   generator: Optional[torch.Generator] = None, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Classifier-free-guided sampling: cond = (text, identity tokens), uncond = (empty text, null tokens in the
    same slots with the same masks). ``noise`` (shape ``latent_shape``) replaces the initial ``randn`` (e.g. one
    seed per row, as ``training/generate.py`` does)."""
    device = text.device
    if noise is None:
        noise = torch.randn(latent_shape, generator=generator)
    elif tuple(noise.shape) != tuple(latent_shape):
        raise OptionError(f"noise: expected shape {tuple(latent_shape)}, got {tuple(noise.shape)}")
    latents = noise.to(device, text.dtype) * scheduler.init_noise_sigma
    scheduler.set_timesteps(steps, device=device)
    dropped = IdentityBatch(identities.global_embedding, identities.local_map, identities.present,
                            torch.ones(text.shape[0], dtype=torch.bool, device=device))
    tokens = torch.cat([batch_tokens(projector, dropped), batch_tokens(projector, identities)])
    both_text = torch.cat([uncond_text, text])
    both_masks = torch.cat([masks, masks])
    both_control = torch.cat([control, control])
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        eps = predict_noise(unet, controlnet, projector, inp, t, both_text, tokens, both_masks, both_control,
                            mask_mode=mask_mode)
        e_uncond, e_cond = eps.chunk(2)
        latents = scheduler.step(e_uncond + guidance * (e_cond - e_uncond), t, latents).prev_sample
    return latents
