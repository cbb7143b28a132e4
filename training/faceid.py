"""The public-weights (IP-Adapter-FaceID) mode on diffusers models: what ``training/generate.py --faceid`` runs.

The same core as the ComfyUI nodes (*InstantFamily FaceID Loader* / *Apply InstantFamily FaceID*), on the diffusers
UNet of an SD1.5 or SDXL base:

* **which processor is which**: the reference saves ``ModuleList(unet.attn_processors.values())``, so index ``p`` of
  a file's ``ip_adapter.<p>.*`` is the p-th entry of diffusers' ``attn_processors``. :func:`diffusers_topology`
  reads the UNet's cross-attentions as a core :class:`~instantfamily_core.faceid.Topology` (ComfyUI block names,
  widths, heads); its slot ``b`` is transformer block ``b`` in that order (``p = 2b`` attn1, ``2b + 1`` attn2),
  and ``slot.attention_path(w)`` is the module path diffusers lists (checked in ``tests/test_generate_faceid.py``);
* **the file** (:func:`load_faceid_for`): read and validated by the core (``instantfamily_core.faceid``) against its
  published base (SD1.5: 768-d text, SDXL: 2048-d) and then against the base model's topology; an SD1.5 file on an
  SDXL base (or the reverse) is a :class:`BaseModelError` naming ``--faceid`` and ``--base``. Reduced test
  topologies (tiny UNets) are validated against the live topology;
* **LoRA** (:func:`merge_lora`): the file's embedded rank-128 LoRA merged into every attention's ``to_q/to_k/to_v/
  to_out.0``: ``W ← W + s · up · down`` (the reference's ``LoRALinearLayer`` with ``network_alpha=None``; s = 1
  as trained). FaceID and Plus have one, Portrait none. Never on the ControlNet;
* **attention** (:class:`FaceIDAttnProcessor`, every attn2 of the UNet): ``to_q/to_k/to_v`` → text SDPA +
  :func:`instantfamily_core.faceid.identity_term` (``Σ_n w_n·m_n·softmax(q K_nᵀ/√d) V_n``, one softmax per person)
  → ``to_out``; the tokens of the batch rows travel in ``cross_attention_kwargs={"faceid": FaceIDContext}``:
  each person's tokens on the cond rows and their unconditional tokens (``proj(0)``) on the uncond rows, with
  the same masks (resized to every feature map by max pooling, as the node does);
* **ControlNet** (:func:`load_openpose_controlnet`): a stock OpenPose ControlNet — SD1.5
  ``control_v11p_sd15_openpose`` (ldm ``.pth``/``.safetensors``, or diffusers), SDXL thibaud ``OpenPoseXL2`` /
  xinsir ``controlnet-openpose-sdxl-1.0`` (diffusers keys) — with the text context only (as ComfyUI runs it), on
  both CFG halves;
* **Plus**: CLIP ViT-H/14 (:func:`load_clip_vision`; a transformers folder or ComfyUI's ``clip_vision`` file) reads
  each reference's aligned 224-px face crop (Encode Identity's), penultimate hidden states, averaged over the
  person's photos; the uncond input is an all-zero *normalised* pixel tensor (the reference's).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from instantfamily_core.attention import sdpa_attention
from instantfamily_core.errors import (BaseModelError, EmbeddingError, FaceIDFileError, IdentityCountError,
                                        MaskError, ModelFileError, OptionError)
from instantfamily_core.faceid import (FaceIDProjection, FaceIDWeights, Topology, base_topology, identity_term,
                                       pad_people, person_tokens, read_container, validate)
from instantfamily_core.faceid.files import CLIP_DIM, CLIP_TOKENS
from instantfamily_core.faceid.layout import LORA_TARGETS
from instantfamily_core.masks import feature_size_for, resize_masks
from training.processors import attention_finish, attention_prelude

KWARG = "faceid"
BASE_NAMES = {768: "SD1.5", 2048: "SDXL"}
OPENPOSE_HINT = {"SD1.5": "control_v11p_sd15_openpose (.pth, or its fp16 .safetensors)",
                 "SDXL": "thibaud OpenPoseXL2.safetensors or xinsir controlnet-openpose-sdxl-1.0 "
                         "(diffusion_pytorch_model.safetensors)"}
FACEID_HINT = {"SD1.5": "ip-adapter-faceid_sd15.bin, -plusv2_sd15.bin or -portrait-v11_sd15.bin",
               "SDXL": "ip-adapter-faceid_sdxl.bin, -plusv2_sdxl.bin or -portrait_sdxl.bin"}


def base_name(context_dim: int) -> str:
    return BASE_NAMES.get(int(context_dim), f"a {int(context_dim)}-d-text model")


# ---------------------------------------------------------------------------------------------------------------
# the UNet's cross-attentions as a core Topology

_PATH = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.attentions\.(\d+)\.transformer_blocks\.(\d+)\.attn2$|"
                   r"^mid_block\.attentions\.0\.transformer_blocks\.(\d+)\.attn2$")


def diffusers_topology(unet) -> Topology:
    """The cross-attention layout of a diffusers ``UNet2DConditionModel`` with ComfyUI's block names: down block
    ``l`` attention ``i`` is ``("input", 1 + l·(r+1) + i)``, up block ``l`` attention ``i`` ``("output", l·(r+1) + i)``,
    the middle ``("middle", 0)`` (``r`` = ``layers_per_block``). Named after the published base of its text width
    (``"SD1.5"``, ``"SDXL"``) also when reduced (tests)."""
    r = unet.config.layers_per_block
    if not isinstance(r, int):
        if len(set(r)) != 1:
            raise BaseModelError(f"--base: layers_per_block {list(r)} differ per level; the FaceID layout needs one "
                                 "value")
        r = int(r[0])
    per = r + 1
    sites = {}
    for path, module in unet.named_modules():
        m = _PATH.match(path)
        if m is None:
            continue
        if m.group(5) is not None:
            key = ("middle", 0, int(m.group(5)))
        elif m.group(1) == "down_blocks":
            key = ("input", 1 + int(m.group(2)) * per + int(m.group(3)), int(m.group(4)))
        else:
            key = ("output", int(m.group(2)) * per + int(m.group(3)), int(m.group(4)))
        sites[key] = (int(module.to_q.out_features), int(module.heads))
    if not sites:
        raise BaseModelError("--base: the UNet has no cross-attention (attn2) layers")
    ctx = int(unet.config.cross_attention_dim)
    try:
        return Topology.from_sites(base_name(ctx), sites, ctx, r)
    except ValueError as e:
        raise BaseModelError(f"--base: {e}") from None


def check_processor_order(unet, topology: Topology) -> None:
    """diffusers' ``attn_processors`` order must be the topology's slot order (p = position), else the file's
    weights would land on the wrong layers."""
    names = list(unet.attn_processors)
    want = [f"{s.attention_path(w)}.processor" for s in topology.slots for w in (1, 2)]
    if names != want:
        first = next((i for i, (a, b) in enumerate(zip(names, want)) if a != b), min(len(names), len(want)))
        raise BaseModelError(f"--base: the UNet's attention processors are not in the FaceID file's order (position "
                             f"{first}: {names[first] if first < len(names) else '—'} vs "
                             f"{want[first] if first < len(want) else '—'})")


# ---------------------------------------------------------------------------------------------------------------
# the FaceID file against the base

@dataclass
class FaceIDFile:
    """A FaceID file read but not yet matched to a base: its parts and the published base it is for."""

    name: str
    image_proj: dict
    ip_adapter: dict
    published: Topology

    @property
    def is_plus(self) -> bool:
        return any(k.startswith("perceiver_resampler.") for k in self.image_proj)


def read_faceid(path) -> FaceIDFile:
    """Read ``--faceid`` (tensors only) and tell its published base from the text width it reads."""
    p = Path(path)
    if not p.is_file():
        raise FaceIDFileError(f"--faceid: {p} does not exist (give {FACEID_HINT['SD1.5']} for SD1.5, "
                              f"{FACEID_HINT['SDXL']} for SDXL, from https://huggingface.co/h94/IP-Adapter-FaceID)")
    try:
        image_proj, ip = read_container(str(p))
        published = base_topology(image_proj, ip, p.name)
    except FaceIDFileError as e:
        raise FaceIDFileError(f"--faceid {e}") from None
    return FaceIDFile(p.name, image_proj, ip, published)


def check_faceid_base(file: FaceIDFile, context_dim: int, base_label: str) -> None:
    """The file's base must be the ``--base``'s (same text width), else a :class:`BaseModelError` naming both."""
    if file.published.context_dim != int(context_dim):
        live = base_name(context_dim)
        raise BaseModelError(
            f"--faceid {file.name} is an {file.published.name} FaceID file ({file.published.context_dim}-d text) but "
            f"--base {base_label} is {live} ({int(context_dim)}-d text); use {FACEID_HINT.get(live, 'a FaceID file')} "
            f"with this base, or an {file.published.name} base with this file")


def validate_for(file: FaceIDFile, live: Topology, base_label: str,
                 plus_version: str = "auto (file name)") -> FaceIDWeights:
    """Validate the file against its published base and the ``--base`` UNet's topology ``live`` (reduced test
    UNets: against ``live`` itself). Errors name ``--faceid`` (and ``--base`` when the two do not fit)."""
    check_faceid_base(file, live.context_dim, base_label)
    try:
        weights = validate(file.image_proj, file.ip_adapter, file.name, plus_version)
    except FaceIDFileError as first:
        if not file.published.differences(live):
            raise FaceIDFileError(f"--faceid {first}") from None
        try:  # a reduced base (tests): the file must fit the model's own layout
            return validate(file.image_proj, file.ip_adapter, file.name, plus_version, topology=live)
        except FaceIDFileError:
            raise FaceIDFileError(f"--faceid {first}") from None
    problems = weights.topology.differences(live)
    if problems:
        raise BaseModelError(f"--faceid {file.name} is for {weights.topology.describe()}, but --base {base_label} is "
                             f"{live.describe()} ({'; '.join(problems[:2])}); the weights address every "
                             f"cross-attention of a full {weights.base} UNet")
    return weights


def load_faceid_for(path, live: Topology, base_label: str, plus_version: str = "auto (file name)") \
        -> FaceIDWeights:
    """:func:`read_faceid` + :func:`validate_for`."""
    return validate_for(read_faceid(path), live, base_label, plus_version)


def lora_pairs(weights: FaceIDWeights) -> dict:
    """``{(p, target): (down, up)}`` of the embedded LoRA (empty without one)."""
    out: dict = {}
    for key, value in weights.ip_adapter.items():
        parts = key.split(".")
        if len(parts) != 4 or not parts[1].endswith("_lora") or parts[3] != "weight":
            continue
        out.setdefault((int(parts[0]), parts[1][:-len("_lora")]), {})[parts[2]] = value
    return {k: (v["down"], v["up"]) for k, v in out.items()}


def _linear(attn, target: str):
    return attn.to_out[0] if target == "to_out" else getattr(attn, target)


@torch.no_grad()
def merge_lora(unet, weights: FaceIDWeights, topology: Topology, strength: float = 1.0) -> int:
    """``W ← W + strength · up · down`` on every LoRA target of the file (fp32 arithmetic, stored in the weight's
    dtype); returns the number of merged layers. The UNet must not hold a merge already."""
    pairs = lora_pairs(weights)
    if not pairs or strength == 0:
        return 0
    if getattr(unet, "_faceid_lora", None) is not None:
        raise OptionError(f"--lora-strength: this UNet already holds the FaceID LoRA of {unet._faceid_lora}; load "
                          "the base again to merge another")
    for (p, target), (down, up) in pairs.items():
        if target not in LORA_TARGETS:
            raise FaceIDFileError(f"--faceid {weights.name}: unknown LoRA target {target!r} at processor {p}")
        attn = unet.get_submodule(topology.slots[p // 2].attention_path(1 + p % 2))
        lin = _linear(attn, target)
        delta = up.float() @ down.float()
        if tuple(delta.shape) != tuple(lin.weight.shape):
            raise FaceIDFileError(f"--faceid {weights.name}: LoRA {p}.{target} is {tuple(delta.shape)}, the layer "
                                  f"{topology.slots[p // 2].attention_path(1 + p % 2)}.{target} "
                                  f"{tuple(lin.weight.shape)}")
        lin.weight.copy_((lin.weight.float() + float(strength) * delta.to(lin.weight.device)).to(lin.weight.dtype))
    unet._faceid_lora = weights.name
    return len(pairs)


# ---------------------------------------------------------------------------------------------------------------
# attention processors

@dataclass
class FaceIDContext:
    """One UNet call's identities: ``tokens`` ``(B, N, T, d)`` per batch row (uncond rows: the unconditional
    tokens), ``masks`` ``(B, N, H, W)`` in [0, 1] at any resolution, ``weights`` ``(N,)`` (w_n), ``key_valid``
    ``(N, T)`` bool or None (people with fewer tokens), ``latent_hw`` the latent's (h, w). Keys/values per
    processor and regions per feature size are computed once and reused over the sampling steps."""

    tokens: torch.Tensor
    masks: torch.Tensor
    weights: torch.Tensor
    latent_hw: tuple[int, int]
    key_valid: Optional[torch.Tensor] = None
    cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.tokens.ndim != 4 or self.masks.ndim != 4 or self.tokens.shape[:2] != self.masks.shape[:2]:
            raise IdentityCountError(f"FaceID: tokens (B, N, T, d) and masks (B, N, H, W) must agree, got "
                                     f"{tuple(self.tokens.shape)} and {tuple(self.masks.shape)}")
        if self.weights.shape != (self.tokens.shape[1],):
            raise IdentityCountError(f"FaceID: {self.weights.numel()} weights for {self.tokens.shape[1]} people")

    def as_kwargs(self) -> dict:
        return {KWARG: self}

    def kv(self, p: int, wk: torch.Tensor, wv: torch.Tensor, like: torch.Tensor):
        key = ("kv", p, like.device, like.dtype)
        if key not in self.cache:
            t = self.tokens.to(like.device, like.dtype)
            self.cache[key] = (t @ wk.to(like.device, like.dtype).T, t @ wv.to(like.device, like.dtype).T)
        return self.cache[key]

    def region(self, num_queries: int, like: torch.Tensor) -> torch.Tensor:
        """``(B, Nq, N)``: w_n · m_n at each position of this feature map."""
        key = ("region", num_queries, like.device)
        if key not in self.cache:
            hw = feature_size_for(num_queries, self.latent_hw)
            small = resize_masks(self.masks.float().to(like.device), hw).flatten(-2).transpose(-1, -2)
            self.cache[key] = small * self.weights.float().to(like.device).view(1, 1, -1)
        return self.cache[key]


class FaceIDAttnProcessor:
    """attn2 processor ``p``: ``to_out(softmax(QK_textᵀ/√d)V_text + Σ_n w_n·m_n·softmax(QK_nᵀ/√d)V_n)`` with
    ``K_n = T_n W_k^p``, ``V_n = T_n W_v^p`` (the file's ``to_k_ip``/``to_v_ip``); without a ``faceid`` context
    the plain attention."""

    def __init__(self, p: int, to_k_ip: torch.Tensor, to_v_ip: torch.Tensor):
        self.p, self.wk, self.wv = int(p), to_k_ip, to_v_ip

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 faceid: Optional[FaceIDContext] = None, **kwargs):
        if attention_mask is not None:
            raise MaskError("attention_mask: the FaceID processor takes its masks from the 'faceid' "
                            "cross_attention_kwargs entry")
        residual, hidden_states, context, shape = attention_prelude(attn, hidden_states, encoder_hidden_states, temb)
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        out = sdpa_attention(q, k, v, attn.heads)
        if faceid is not None:
            k_ids, v_ids = faceid.kv(self.p, self.wk, self.wv, q)
            out = out + identity_term(q, k_ids, v_ids, attn.heads, faceid.region(q.shape[1], q), faceid.key_valid)
        return attention_finish(attn, out.to(q.dtype), residual, shape)


class PlainAttnProcessor:
    """attn1 processor: plain SDPA attention (diffusers' ``AttnProcessor2_0`` maths); ignores ``faceid``."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 faceid: Optional[FaceIDContext] = None, **kwargs):
        if attention_mask is not None:
            raise MaskError("attention_mask: not used by the FaceID mode's self-attention")
        residual, hidden_states, context, shape = attention_prelude(attn, hidden_states, encoder_hidden_states, temb)
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        return attention_finish(attn, sdpa_attention(q, k, v, attn.heads).to(q.dtype), residual, shape)


def install_faceid(unet, weights: FaceIDWeights, topology: Topology) -> int:
    """Every attn2 of ``unet`` gets its FaceID processor (``p`` from ``topology``), every attn1 the plain one;
    returns the number of FaceID processors."""
    check_processor_order(unet, topology)
    plain = PlainAttnProcessor()
    procs = {}
    for slot in topology.slots:
        procs[f"{slot.attention_path(1)}.processor"] = plain
        wk, wv = weights.kv_weights(slot.attn2)
        procs[f"{slot.attention_path(2)}.processor"] = FaceIDAttnProcessor(slot.attn2, wk, wv)
    unet.set_attn_processor(procs)
    return len(topology.slots)


# ---------------------------------------------------------------------------------------------------------------
# the OpenPose ControlNet

def load_openpose_controlnet(path, unet, base_label: str, dtype: torch.dtype = torch.float32):
    """A stock OpenPose ControlNet for the base (``--controlnet``): a single file (ldm keys with or without
    ``control_model.``, or diffusers keys — thibaud/xinsir SDXL files) shaped like ``ControlNetModel.from_unet``
    of the base's UNet, or a diffusers folder (``config.json`` + weights). Default attention processors: the
    ControlNet sees the text context only."""
    from diffusers import ControlNetModel

    from training import sd15
    from training.model import controlnet_state, controlnet_weights_in_folder
    p = Path(path)
    ctx = int(unet.config.cross_attention_dim)
    base = base_name(ctx)
    if not p.exists():
        raise ModelFileError(f"--controlnet: {p} does not exist (for an {base} base give "
                             f"{OPENPOSE_HINT.get(base, 'an OpenPose ControlNet of the base')})")
    name = f"--controlnet {p.name}"
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelFileError(f"{name}: a folder must be a diffusers ControlNet (config.json + "
                                 "diffusion_pytorch_model.safetensors)")
        cfg = ControlNetModel.load_config(str(p))
        target = sd15._empty(lambda: ControlNetModel.from_config(cfg))
        sd = sd15.read_state_dict(controlnet_weights_in_folder(p, "--controlnet", "--controlnet"), "--controlnet")
    else:
        sd = sd15.read_state_dict(p, "--controlnet")
        target = sd15._empty(lambda: ControlNetModel.from_unet(unet, load_weights_from_unet=False))

    def refuse(sd):
        kind = sd15.describe_file(sd) if any(k.startswith("model.diffusion_model.") for k in sd) else None
        return BaseModelError(f"{name}: not a ControlNet ({kind or 'no ControlNet keys'}); expected an OpenPose "
                              f"ControlNet for {base}: {OPENPOSE_HINT.get(base, '')}")
    converted = controlnet_state(sd, target, refuse)
    hint = converted.get("controlnet_cond_embedding.conv_in.weight")
    if hint is not None and hint.ndim == 4 and hint.shape[1] != 3:
        raise BaseModelError(f"{name}: its hint encoder takes {hint.shape[1]} channels; an OpenPose ControlNet reads "
                             "an RGB pose image (3)")
    widths = [v.shape[1] for k, v in converted.items() if k.endswith("attn2.to_k.weight")]
    if widths and int(widths[0]) != ctx:
        raise BaseModelError(f"{name} is an {base_name(widths[0])} ControlNet ({widths[0]}-d text) but --base "
                             f"{base_label} is {base} ({ctx}-d text); use {OPENPOSE_HINT.get(base, 'a ControlNet of the base')}")
    from training.sd15 import load_into
    cn = load_into(target, converted, "ControlNet", name, dtype)
    return cn.requires_grad_(False).eval()


# ---------------------------------------------------------------------------------------------------------------
# CLIP ViT-H (FaceID Plus)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VIT_H_HEADS = 16  # ViT-H/14: width 1280, 16 heads of 80


def load_clip_vision(path, dtype: torch.dtype = torch.float32):
    """CLIP ViT-H/14 (``CLIP-ViT-H-14-laion2B-s32B-b79K``) for ``--clip-vision``: a transformers folder
    (``config.json`` + weights, e.g. h94/IP-Adapter ``models/image_encoder``) or one file with transformers names
    (``vision_model.*``, as ComfyUI's ``models/clip_vision`` holds it), architecture read from the weights."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from training import sd15
    p = Path(path)
    if not p.exists():
        raise ModelFileError(f"--clip-vision: {p} does not exist (FaceID Plus needs CLIP ViT-H/14: "
                             "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors from ComfyUI's models/clip_vision, or the "
                             "models/image_encoder folder of h94/IP-Adapter)")
    name = f"--clip-vision {p.name}"
    if p.is_dir():
        try:
            model = CLIPVisionModel.from_pretrained(str(p), local_files_only=True)
        except (OSError, ValueError, RuntimeError) as e:
            raise ModelFileError(f"{name}: cannot load a transformers CLIP vision model ({e})") from None
        width = int(model.config.hidden_size)
    else:
        sd = sd15.read_state_dict(p, "--clip-vision")
        if any(k.startswith("visual.") for k in sd):
            raise ModelFileError(f"{name}: OpenCLIP key names ('visual.*'); give the transformers-layout file "
                                 "(vision_model.*), e.g. ComfyUI's clip_vision CLIP-ViT-H-14-laion2B-s32B-b79K."
                                 "safetensors")
        bare = {k[len("vision_model."):]: v for k, v in sd.items() if k.startswith("vision_model.")}
        pe = bare.get("embeddings.patch_embedding.weight")
        if pe is None:
            raise ModelFileError(f"{name}: no 'vision_model.embeddings.patch_embedding.weight'; not a CLIP vision "
                                 "model")
        width = int(pe.shape[0])
        if width != CLIP_DIM:
            raise ModelFileError(f"{name}: a CLIP vision model {width} wide (ViT-L: 1024, ViT-bigG: 1664); FaceID "
                                 f"Plus reads ViT-H/14 ({CLIP_DIM}) features")
        layers = len({k.split(".")[2] for k in bare if k.startswith("encoder.layers.")})
        positions = int(bare["embeddings.position_embedding.weight"].shape[0])
        patch = int(pe.shape[-1])
        cfg = CLIPVisionConfig(hidden_size=width, intermediate_size=int(bare["encoder.layers.0.mlp.fc1.weight"].shape[0]),
                               num_hidden_layers=layers, num_attention_heads=VIT_H_HEADS, patch_size=patch,
                               image_size=int(round(math.sqrt(positions - 1))) * patch, hidden_act="gelu",
                               layer_norm_eps=1e-5)
        model = sd15._empty(lambda: CLIPVisionModel(cfg))
        own = "vision_model." if any(k.startswith("vision_model.") for k in model.state_dict()) else ""
        state = {own + k: v for k, v in bare.items() if not k.endswith("position_ids")}
        from training.sd15 import load_into
        model = load_into(model, state, "CLIP vision", name)
    if width != CLIP_DIM:
        raise ModelFileError(f"{name}: a CLIP vision model {width} wide; FaceID Plus reads ViT-H/14 ({CLIP_DIM})")
    return model.to(dtype).requires_grad_(False).eval()


@torch.no_grad()
def clip_hidden(model, crops: Sequence[np.ndarray]) -> torch.Tensor:
    """Penultimate hidden states ``(k, 257, 1280)`` of RGB uint8 face crops (CLIPImageProcessor's defaults: the
    224 crop as is, rescale 1/255, CLIP mean/std)."""
    size = int(model.config.image_size)
    x = torch.stack([torch.from_numpy(np.array(c)).permute(2, 0, 1).float() / 255.0 for c in crops])
    if x.shape[-2:] != (size, size):
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", antialias=True).clamp(0, 1)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    p = next(model.parameters())
    x = ((x - mean) / std).to(p.device, p.dtype)
    return model(pixel_values=x, output_hidden_states=True).hidden_states[-2].float().cpu()


@torch.no_grad()
def clip_zero(model) -> torch.Tensor:
    """Hidden states of an all-zero normalised pixel tensor (the reference's uncond input)."""
    size = int(model.config.image_size)
    p = next(model.parameters())
    x = torch.zeros(1, 3, size, size, device=p.device, dtype=p.dtype)
    return model(pixel_values=x, output_hidden_states=True).hidden_states[-2].float().cpu()


# ---------------------------------------------------------------------------------------------------------------
# identities → tokens

def case_tokens(projection: FaceIDProjection, weights: FaceIDWeights, identities: Sequence, clip_model=None,
                s_scale: float = 1.0, zero: Optional[torch.Tensor] = None):
    """``(tokens (N, T, d), uncond (N, T, d), key_valid (N, T) or None)`` of a case's people (Encode Identity
    features, slot order), as *Apply InstantFamily FaceID* makes them."""
    tokens, uncond = [], []
    if weights.is_plus and clip_model is None:
        raise EmbeddingError(f"--clip-vision: {weights.name} is FaceID Plus ({weights.variant}); give CLIP ViT-H/14")
    if weights.is_plus and zero is None:
        zero = clip_zero(clip_model)
    for ident in identities:
        per_photo = ident.extra.get("faceid_embeddings") if getattr(ident, "extra", None) else None
        embeds = torch.stack([torch.as_tensor(e).float() for e in per_photo]) if per_photo else \
            ident.global_embedding[None].float()
        clip = None
        if weights.is_plus:
            crops = ident.extra.get("faceid_crops")
            if not crops:
                raise EmbeddingError(f"{ident.name}: FaceID Plus needs the aligned face crops of Encode Identity")
            hidden = clip_hidden(clip_model, crops)
            if hidden.shape[-2:] != (CLIP_TOKENS, CLIP_DIM):
                raise EmbeddingError(f"--clip-vision: hidden states {tuple(hidden.shape[1:])}, FaceID Plus needs "
                                     f"({CLIP_TOKENS}, {CLIP_DIM}) (ViT-H/14 at 224 px)")
            clip = torch.cat([hidden.mean(0, keepdim=True), zero])
        t, u = person_tokens(projection, weights.variant, ident.name, embeds, clip, s_scale)
        tokens.append(t)
        uncond.append(u)
    return pad_people(tokens, uncond)


def layout_key(key_valid: Optional[torch.Tensor], tokens: torch.Tensor) -> tuple:
    """What rows of one batch must share: people, tokens per person and which are padding."""
    valid = tuple(map(tuple, key_valid.tolist())) if key_valid is not None else None
    return tuple(tokens.shape[:2]), valid


__all__ = ["diffusers_topology", "check_processor_order", "FaceIDFile", "read_faceid", "check_faceid_base",
           "validate_for", "load_faceid_for", "merge_lora", "lora_pairs",
           "FaceIDContext", "FaceIDAttnProcessor", "PlainAttnProcessor", "install_faceid", "load_openpose_controlnet",
           "load_clip_vision", "clip_hidden", "clip_zero", "case_tokens", "layout_key", "KWARG"]
