"""Reading InstantID's adapter file (``ip-adapter.bin`` of InstantX/InstantID) and refusing files that are not it.

Containers (as the reference and the popular ComfyUI pack read them):

* ``.bin`` (``.pt``/``.pth``/``.ckpt``): a nested pickle ``{"image_proj": {...}, "ip_adapter": {...}}`` of FP32
  tensors (1,691,134,141 B published), read with ``torch.load(weights_only=True)`` — never unrestricted
  unpickling; a flat pickle with ``image_proj.``/``ip_adapter.`` prefixes is accepted too;
* ``.safetensors``: flat, keys prefixed ``image_proj.`` and ``ip_adapter.``.

Layout (checked key by key and shape by shape; the reference loads both parts strictly):

* ``image_proj`` (51 keys): InstantID's ``Resampler(dim=1280, depth=4, dim_head=64, heads=20, num_queries=16,
  embedding_dim=512, output_dim=2048, ff_mult=4)`` — learned ``latents`` (1, 16, 1280), ``proj_in`` 512→1280,
  ``proj_out`` 1280→2048, ``norm_out``, 4 × (PerceiverAttention, FeedForward), see :mod:`.resampler`;
* ``ip_adapter`` (140 keys on SDXL): ``<p>.to_k_ip.weight`` / ``<p>.to_v_ip.weight`` (hidden, 2048), bias-free, at
  every cross-attention processor ``p`` (odd p = 1…139 in diffusers' processor order, :mod:`..faceid.layout`) —
  exactly the ``to_k_ip``/``to_v_ip`` part of an IP-Adapter-FaceID file, so the UNet term is FaceID's rule.

InstantID is SDXL-only; the topology checked against is :data:`..faceid.SDXL`, or one given (reduced test models).
Files that are something else are refused with a message naming what they are: IP-Adapter-FaceID files (MLP
``proj.0``/LoRA keys), SD1.5 adapters (768-d text), ControlNets (InstantID's own IdentityNet included), LoRAs,
checkpoints and CLIP-image IP-Adapters. ``ip-adapter-faceid-portrait_sdxl_unnorm.bin`` is reported to use the
same Resampler layout (unverified); if it does, it cannot be told apart by keys and loads here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from ..errors import InstantIDFileError
from ..faceid.files import EXTENSIONS, ID_DIM, AdapterWeights, check_keys, expected_ip_adapter, load_tensor_file
from ..faceid.layout import SD15, SDXL, Topology

DIM = 1280
DEPTH = 4
DIM_HEAD = 64
HEADS = 20
NUM_TOKENS = 16
FF_MULT = 4
PUBLISHED_BYTES = 1_691_134_141  # ip-adapter.bin, sha256 02b3618e36d8…


@dataclass
class InstantIDWeights(AdapterWeights):
    """A validated InstantID adapter: ``image_proj`` (Resampler) and ``ip_adapter`` (``to_k_ip``/``to_v_ip``)."""

    image_proj: dict = field(repr=False)
    ip_adapter: dict = field(repr=False)
    name: str = ""
    topology: Topology = field(default=None, repr=False)

    variant = "instantid"
    tokens_per_image = NUM_TOKENS

    @property
    def dtype(self) -> torch.dtype:
        return self.ip_adapter[f"{self.topology.attn2_indices[0]}.to_k_ip.weight"].dtype


def expected_image_proj(output_dim: int = 2048) -> dict:
    """``{key: shape}`` of InstantID's Resampler state dict, in registration order (51 keys)."""
    keys = {"latents": (1, NUM_TOKENS, DIM), "proj_in.weight": (DIM, ID_DIM), "proj_in.bias": (DIM,),
            "proj_out.weight": (output_dim, DIM), "proj_out.bias": (output_dim,),
            "norm_out.weight": (output_dim,), "norm_out.bias": (output_dim,)}
    inner = DIM_HEAD * HEADS
    for i in range(DEPTH):
        a, f = f"layers.{i}.0.", f"layers.{i}.1."
        keys.update({a + "norm1.weight": (DIM,), a + "norm1.bias": (DIM,), a + "norm2.weight": (DIM,),
                     a + "norm2.bias": (DIM,), a + "to_q.weight": (inner, DIM), a + "to_kv.weight": (2 * inner, DIM),
                     a + "to_out.weight": (DIM, inner), f + "0.weight": (DIM,), f + "0.bias": (DIM,),
                     f + "1.weight": (FF_MULT * DIM, DIM), f + "3.weight": (DIM, FF_MULT * DIM)})
    return keys


# -- containers ----------------------------------------------------------------------------------------------------

_ADVICE = ("InstantID's adapter is ip-adapter.bin from InstantX/InstantID (ComfyUI: models/instantid), its "
           "IdentityNet ControlNetModel/diffusion_pytorch_model.safetensors goes to models/controlnet")


def _split_flat(flat: dict) -> tuple[dict, dict]:
    image_proj = {k[len("image_proj."):]: v for k, v in flat.items() if k.startswith("image_proj.")}
    ip = {k[len("ip_adapter."):]: v for k, v in flat.items() if k.startswith("ip_adapter.")}
    return image_proj, ip


def _refuse_flat(name: str, flat: dict):
    """A flat state dict without adapter parts: say what it is."""
    keys = [str(k) for k in flat]
    if any("controlnet_cond_embedding" in k or k.startswith(("controlnet_", "control_model.", "zero_convs.",
                                                              "input_hint_block.")) for k in keys):
        raise InstantIDFileError(f"{name}: this is a ControlNet (InstantID's IdentityNet is one), not InstantID's "
                                 f"adapter; load it with a ControlNet loader. {_ADVICE}")
    if any(k.startswith(("lora_unet_", "lora_te", "lora_transformer_")) or ".lora_down." in k or ".lora_up." in k
           or ".lora_A." in k or ".lora_B." in k or "_lora.down." in k or "_lora.up." in k for k in keys):
        raise InstantIDFileError(f"{name}: this is a LoRA, not InstantID's adapter; load it with a LoRA loader. "
                                 f"{_ADVICE}")
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.", "conditioner.", "cond_stage_model."))
           for k in keys):
        raise InstantIDFileError(f"{name}: this is a Stable Diffusion checkpoint, not InstantID's adapter; load it "
                                 f"with a checkpoint loader. {_ADVICE}")
    raise InstantIDFileError(f"{name}: no 'image_proj'/'ip_adapter' parts (found e.g. {keys[:3]}); not an "
                             f"InstantID adapter file. {_ADVICE}")


def read_instantid_container(path: str) -> tuple[dict, dict]:
    """``(image_proj, ip_adapter)`` of a ``.bin`` pickle (weights_only; nested or prefixed) or flat
    ``.safetensors``; raises :class:`InstantIDFileError` naming what an unsuitable file is."""
    base = os.path.basename(path)
    name, flat_file, data = load_tensor_file(path, InstantIDFileError, (
        f"{base}: expected InstantID's ip-adapter.bin (or a .safetensors conversion of it), got a "
        f"{os.path.splitext(base)[1] or 'extension-less'} file"))
    if flat_file:
        image_proj, ip = _split_flat(data)
        if not image_proj and not ip:
            _refuse_flat(name, data)
        return image_proj, ip
    if not isinstance(data, dict):
        raise InstantIDFileError(f"{name}: expected a dict with 'image_proj' and 'ip_adapter', found a "
                                 f"{type(data).__name__}; not an InstantID adapter file")
    if isinstance(data.get("image_proj"), dict) and isinstance(data.get("ip_adapter"), dict):
        return dict(data["image_proj"]), dict(data["ip_adapter"])
    if "image_proj" in data or "ip_adapter" in data:
        raise InstantIDFileError(f"{name}: has {sorted(k for k in data if k in ('image_proj', 'ip_adapter'))} but "
                                 "InstantID's file holds both 'image_proj' and 'ip_adapter' state dicts")
    if isinstance(data.get("state_dict"), dict):  # Lightning-style checkpoints (ControlNet .ckpt, ...)
        data = data["state_dict"]
    image_proj, ip = _split_flat({k: v for k, v in data.items() if isinstance(k, str)})
    if not image_proj and not ip:
        _refuse_flat(name, data)
    return image_proj, ip


# -- what a file is ------------------------------------------------------------------------------------------------

def _text_width(image_proj: dict, ip_adapter: dict) -> int | None:
    """The text width the adapter is for: what ``to_k_ip`` reads, else the projection's output width."""
    for key, v in ip_adapter.items():
        if key.endswith(".to_k_ip.weight") and getattr(v, "ndim", 0) == 2:
            return int(v.shape[1])
    for key in ("norm_out.weight", "norm.weight"):
        v = image_proj.get(key)
        if v is not None and getattr(v, "ndim", 0) == 1:
            return int(v.shape[0])
    return None


def _kind(image_proj: dict) -> str | None:
    """What a non-InstantID adapter is (``None`` when its projection looks like InstantID's Resampler)."""
    lat, pin = image_proj.get("latents"), image_proj.get("proj_in.weight")
    if "latents" in image_proj:
        if getattr(pin, "ndim", 0) == 2 and pin.shape[1] != ID_DIM:
            return f"an IP-Adapter Plus (CLIP image resampler reading {pin.shape[1]}-d CLIP features)"
        if getattr(lat, "ndim", 0) == 3 and lat.shape[1] != NUM_TOKENS:
            return f"an IP-Adapter Plus-style resampler with {lat.shape[1]} tokens"
        return None
    if "proj.weight" in image_proj:
        return "an IP-Adapter (CLIP image projection)"
    if "proj.3.weight" in image_proj:
        return "an IP-Adapter full-face (CLIP)"
    if not image_proj:
        return None  # missing part: reported by the key check
    return f"an adapter with image_proj keys {sorted(image_proj)[:4]}"


def _refuse_other_adapters(image_proj: dict, ip_adapter: dict, name: str, topology: Topology) -> None:
    width = _text_width(image_proj, ip_adapter)
    faceid = ("proj.0.weight" in image_proj or any(k.startswith("perceiver_resampler.") for k in image_proj)
              or any("_lora." in k for k in ip_adapter))
    if faceid:
        w2 = image_proj.get("proj.2.weight")
        if any(k.startswith("perceiver_resampler.") for k in image_proj):
            what = "Plus"
        elif (not any("_lora." in k for k in ip_adapter) and width and getattr(w2, "ndim", 0) == 2
              and w2.shape[0] == 16 * width):
            what = "Portrait"
        else:
            what = "FaceID"
        base = {768: "SD1.5", 2048: "SDXL"}.get(width, f"{width}-d text")
        raise InstantIDFileError(f"{name}: this is an IP-Adapter-FaceID file ({what}, {base}: an MLP projection "
                                 "'proj.0' of the normed embedding and/or LoRA keys), not InstantID; load it with "
                                 f"the FaceID loader. {_ADVICE}")
    kind = _kind(image_proj)
    if width == SD15.context_dim and topology.context_dim != SD15.context_dim:
        raise InstantIDFileError(f"{name}: this is an SD1.5 adapter ({kind or 'InstantID-like resampler'}; it "
                                 f"reads {width}-d text), not InstantID; InstantID is for SDXL "
                                 f"({topology.context_dim}-d text). {_ADVICE}")
    if kind is not None:
        base = {768: " for SD1.5", 2048: " for SDXL"}.get(width, "")
        raise InstantIDFileError(f"{name}: this is {kind}{base}, not InstantID (whose projection is a "
                                 f"{NUM_TOKENS}-token resampler reading the raw {ID_DIM}-d antelopev2 face "
                                 f"embedding); use an IP-Adapter loader for it. {_ADVICE}")
    if width is not None and width != topology.context_dim:
        raise InstantIDFileError(f"{name}: its adapter reads {width}-d text, but InstantID on "
                                 f"{topology.describe()} needs {topology.context_dim}-d")


def validate(image_proj: dict, ip_adapter: dict, name: str = "ip-adapter.bin",
             topology: Topology | None = None) -> InstantIDWeights:
    """Check every key and shape (strict, as the reference loads them) against ``topology`` (default: SDXL), after
    refusing adapters of other kinds by name."""
    topology = topology or SDXL
    for part, sd in (("image_proj", image_proj), ("ip_adapter", ip_adapter)):
        bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise InstantIDFileError(f"{name}: {part}.{bad[0]} is a {type(sd[bad[0]]).__name__}, not a tensor")
    _refuse_other_adapters(image_proj, ip_adapter, name, topology)
    layout = f"{topology.name} InstantID"
    check_keys("image_proj", image_proj, expected_image_proj(topology.context_dim), name, layout, InstantIDFileError)
    check_keys("ip_adapter", ip_adapter, expected_ip_adapter(False, topology), name, layout, InstantIDFileError)
    for k, v in list(image_proj.items()) + list(ip_adapter.items()):
        if not v.is_floating_point():
            raise InstantIDFileError(f"{name}: tensor {k} is {v.dtype}, expected floating point weights")
    for k, v in image_proj.items():  # small; NaN weights in the adapter show up in the output
        if not torch.isfinite(v).all():
            raise InstantIDFileError(f"{name}: tensor image_proj.{k} contains NaN or infinite values")
    return InstantIDWeights(image_proj, ip_adapter, name, topology)


def load_instantid(path: str, topology: Topology | None = None) -> InstantIDWeights:
    """Read and validate InstantID's ``ip-adapter.bin`` (or a flat ``.safetensors`` of it) for SDXL, or for
    ``topology`` (reduced test models)."""
    name = os.path.basename(path)
    image_proj, ip = read_instantid_container(path)
    return validate(image_proj, ip, name, topology)


__all__ = ["InstantIDFileError", "InstantIDWeights", "load_instantid", "validate", "read_instantid_container",
           "expected_image_proj", "ID_DIM", "NUM_TOKENS", "DIM", "DEPTH", "DIM_HEAD", "HEADS", "FF_MULT",
           "EXTENSIONS", "PUBLISHED_BYTES"]
