"""Reading IP-Adapter-FaceID files (SD1.5 and SDXL) and telling their variants apart.

Containers (as tencent-ailab/IP-Adapter writes and reads them):

* ``.bin`` (``.pt``/``.pth``/``.ckpt``): a nested pickle ``{"image_proj": {...}, "ip_adapter": {...}}`` of fp16
  tensors, read with ``torch.load(weights_only=True)`` — never unrestricted unpickling;
* ``.safetensors``: flat, keys prefixed ``image_proj.`` and ``ip_adapter.`` (``adapter_modules.`` accepted too).

Variants, from keys and shapes (the reference loads both parts strictly, so the key sets are exact):

=============  ==========================================  ==================  =============================
variant        ``image_proj`` (``d`` = 768 SD1.5, 2048 SDXL)  tokens per image    ``ip_adapter``
=============  ==========================================  ==================  =============================
``faceid``     MLP ``proj.0`` 512→1024, ``proj.2`` →4×d     4                   ``to_k_ip``/``to_v_ip`` + LoRA
``plus``       same + ``perceiver_resampler.*`` (50 keys)   4                   same
``plusv2``     identical keys to ``plus``                   4                   same
``portrait``   MLP with ``proj.2`` → 16×d                   16 (×≤5 photos)     ``to_k_ip``/``to_v_ip`` only
=============  ==========================================  ==================  =============================

The base is told by the text width ``to_k_ip`` reads (768: SD1.5, 32 processors; 2048: SDXL, 140 processors,
:data:`.layout.PUBLISHED`); every key and shape is then checked against that base's topology (or one given, for
reduced test topologies). Plus v1 and v2 have identical layouts: v2 (``out = x + s_scale·perceiver``) is told by
``plusv2`` in the file name, or by an explicit override. The embedded LoRA (rank 128, 8 keys per processor: 256
on SD1.5, 1120 on SDXL) may be absent (then the companion ``*_lora.safetensors`` is needed); a partial LoRA is an
error. IP-Adapters that are not FaceID (CLIP-only ``proj.weight``/``latents``/full-face projections) are refused
with a message naming what the file looks like.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from ..errors import FaceIDFileError
from .layout import LORA_RANK, LORA_TARGETS, PUBLISHED, Topology, lora_to_comfy

VARIANTS = ("faceid", "plus", "plusv2", "portrait")
PLUS_VERSIONS = ("auto (file name)", "v1", "v2")
ID_DIM = 512
CLIP_DIM = 1280
CLIP_TOKENS = 257
PERCEIVER_DEPTH = 4
MAX_PORTRAIT_IMAGES = 5
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
EXTENSIONS = PICKLE_SUFFIXES + (".safetensors",)


class AdapterWeights:
    """What the decoupled-attention rule reads of any IP-Adapter-style file (FaceID, InstantID): its base's
    topology and the ``to_k_ip``/``to_v_ip`` weights of each attn2 processor."""

    ip_adapter: dict
    topology: Topology

    @property
    def context_dim(self) -> int:
        return self.topology.context_dim

    @property
    def base(self) -> str:
        """What the file is for, e.g. ``"SD1.5"``, ``"SDXL"``."""
        return self.topology.name

    def kv_weights(self, p: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``to_k_ip`` / ``to_v_ip`` weights ``(hidden, context)`` of attn2 processor ``p``."""
        return self.ip_adapter[f"{p}.to_k_ip.weight"], self.ip_adapter[f"{p}.to_v_ip.weight"]


@dataclass
class FaceIDWeights(AdapterWeights):
    """A validated FaceID file: ``image_proj`` / ``ip_adapter`` state dicts and what they are."""

    variant: str
    tokens_per_image: int
    image_proj: dict
    ip_adapter: dict = field(repr=False)
    name: str = ""
    topology: Topology = field(default=None, repr=False)

    @property
    def has_lora(self) -> bool:
        return any("_lora." in k for k in self.ip_adapter)

    @property
    def is_plus(self) -> bool:
        return self.variant in ("plus", "plusv2")

    @property
    def shortcut(self) -> bool:
        return self.variant == "plusv2"

    def lora_state_dict(self) -> dict:
        """The embedded LoRA under keys ComfyUI's LoRA loader maps onto the UNet (empty without one)."""
        return lora_to_comfy(self.ip_adapter, self.topology)

def expected_image_proj(variant: str, tokens: int, d: int) -> dict:
    """``{key: shape}`` of the projection model of a variant for ``d``-wide tokens (the reference's state dict)."""
    keys = {"proj.0.weight": (2 * ID_DIM, ID_DIM), "proj.0.bias": (2 * ID_DIM,),
            "proj.2.weight": (d * tokens, 2 * ID_DIM), "proj.2.bias": (d * tokens,),
            "norm.weight": (d,), "norm.bias": (d,)}
    if variant in ("plus", "plusv2"):
        pr = "perceiver_resampler."
        keys.update({pr + "proj_in.weight": (d, CLIP_DIM), pr + "proj_in.bias": (d,),
                     pr + "proj_out.weight": (d, d), pr + "proj_out.bias": (d,),
                     pr + "norm_out.weight": (d,), pr + "norm_out.bias": (d,)})
        for i in range(PERCEIVER_DEPTH):
            a, f = f"{pr}layers.{i}.0.", f"{pr}layers.{i}.1."
            keys.update({a + "norm1.weight": (d,), a + "norm1.bias": (d,), a + "norm2.weight": (d,),
                         a + "norm2.bias": (d,), a + "to_q.weight": (d, d), a + "to_kv.weight": (2 * d, d),
                         a + "to_out.weight": (d, d), f + "0.weight": (d,), f + "0.bias": (d,),
                         f + "1.weight": (4 * d, d), f + "3.weight": (d, 4 * d)})
    return keys


def expected_ip_adapter(lora: bool, topology: Topology) -> dict:
    """``{key: shape}`` of the ``ip_adapter`` part: ``to_k_ip``/``to_v_ip`` of every attn2, optionally the LoRA."""
    keys = {}
    for p in topology.attn2_indices:
        hidden = topology.processor_width(p)[1]
        keys[f"{p}.to_k_ip.weight"] = (hidden, topology.context_dim)
        keys[f"{p}.to_v_ip.weight"] = (hidden, topology.context_dim)
    if lora:
        for p in range(topology.num_processors):
            kv_in, hidden = topology.processor_width(p)
            for t in LORA_TARGETS:
                fan_in = kv_in if t in ("to_k", "to_v") else hidden
                keys[f"{p}.{t}_lora.down.weight"] = (LORA_RANK, fan_in)
                keys[f"{p}.{t}_lora.up.weight"] = (hidden, LORA_RANK)
    return keys


def load_tensor_file(path: str, error: type, wrong_suffix: str) -> tuple[str, bool, object]:
    """``(name, is_safetensors, data)`` of an IP-Adapter-style file: a ``.safetensors`` file's flat dict, or a
    pickle (``.bin``/``.pt``/``.pth``/``.ckpt``) read with ``torch.load(weights_only=True)`` — never unrestricted
    unpickling. Every failure is an ``error`` naming the file; ``wrong_suffix``: the message for other suffixes."""
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise error(f"{name}: file not found ({path})")
    lower = name.lower()
    if lower.endswith(".safetensors"):
        from safetensors.torch import load_file
        try:
            return name, True, load_file(path, device="cpu")
        except Exception as e:
            raise error(f"{name}: cannot read the safetensors file ({type(e).__name__}: {e})") from None
    if not lower.endswith(PICKLE_SUFFIXES):
        raise error(wrong_suffix)
    try:
        return name, False, torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for anything beyond tensors/dicts, corrupt files
        raise error(f"{name}: cannot read it as a tensors-only pickle (torch.load(weights_only=True): "
                    f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); only files that contain "
                    "nothing but tensors are loaded") from None


def read_container(path: str) -> tuple[dict, dict]:
    """``(image_proj, ip_adapter)`` state dicts of a ``.bin`` pickle (weights_only) or flat ``.safetensors``."""
    name, flat_file, data = load_tensor_file(path, FaceIDFileError, f"{os.path.basename(path)}: expected a .bin or "
                                             ".safetensors IP-Adapter-FaceID file")
    if flat_file:
        image_proj = {k[len("image_proj."):]: v for k, v in data.items() if k.startswith("image_proj.")}
        ip = {}
        for prefix in ("ip_adapter.", "adapter_modules."):
            ip.update({k[len(prefix):]: v for k, v in data.items() if k.startswith(prefix)})
        if not image_proj and not ip:
            _refuse_flat(name, data)
        return image_proj, ip
    if not isinstance(data, dict) or not isinstance(data.get("image_proj"), dict) or not isinstance(
            data.get("ip_adapter"), dict):
        keys = sorted(data)[:5] if isinstance(data, dict) else type(data).__name__
        if isinstance(data, dict) and all(isinstance(v, torch.Tensor) for v in data.values()):
            _refuse_flat(name, data)
        raise FaceIDFileError(f"{name}: expected a dict with 'image_proj' and 'ip_adapter' (an IP-Adapter file), "
                              f"found {keys}")
    return dict(data["image_proj"]), dict(data["ip_adapter"])


def _refuse_flat(name: str, flat: dict):
    keys = list(flat)
    if any(k.startswith(("lora_unet_", "unet.", "lora_te")) for k in keys):
        raise FaceIDFileError(f"{name}: this is a LoRA, not an IP-Adapter-FaceID file; choose it as the loader's "
                              "'lora' (or load it with a LoRA loader) and pick the matching "
                              "ip-adapter-faceid*_sd15.bin / *_sdxl.bin as the adapter")
    raise FaceIDFileError(f"{name}: no 'image_proj.'/'ip_adapter.' keys (found e.g. {keys[:3]}); not an "
                          "IP-Adapter file")


def _plus_from_name(name: str, plus_version: str) -> str:
    if plus_version in ("v1", "v2"):
        return "plus" if plus_version == "v1" else "plusv2"
    if plus_version not in PLUS_VERSIONS:
        raise FaceIDFileError(f"plus_version: expected one of {PLUS_VERSIONS}, got {plus_version!r}")
    return "plusv2" if "plusv2" in name.lower() else "plus"


def base_topology(image_proj: dict, ip_adapter: dict, name: str = "ip-adapter") -> Topology:
    """The published base a file is for, from the text width its ``to_k_ip`` (or projection) reads."""
    kip = ip_adapter.get("1.to_k_ip.weight")
    norm = image_proj.get("norm.weight")
    width = int(kip.shape[1]) if kip is not None and kip.ndim == 2 else (
        int(norm.shape[0]) if norm is not None and norm.ndim == 1 else None)
    if width is None:
        raise FaceIDFileError(f"{name}: no ip_adapter 1.to_k_ip.weight and no image_proj norm.weight; not an "
                              "IP-Adapter-FaceID file")
    if width not in PUBLISHED:
        raise FaceIDFileError(f"{name}: its adapter reads {width}-d text; the published FaceID files are for "
                              f"{' or '.join(f'{t.name} ({d})' for d, t in PUBLISHED.items())}")
    return PUBLISHED[width]


def detect_variant(image_proj: dict, ip_adapter: dict, name: str = "ip-adapter",
                   plus_version: str = PLUS_VERSIONS[0], d: int = 768) -> tuple[str, int]:
    """``(variant, tokens_per_image)`` for ``d``-wide tokens; refuses non-FaceID IP-Adapters."""
    w0, w2 = image_proj.get("proj.0.weight"), image_proj.get("proj.2.weight")
    if w0 is None or w2 is None or "norm.weight" not in image_proj or w0.ndim != 2 or w0.shape[1] != ID_DIM:
        if "latents" in image_proj:
            kind = "IP-Adapter Plus (CLIP image resampler)"
        elif "proj.weight" in image_proj:
            kind = "IP-Adapter (CLIP image projection)"
        elif "proj.3.weight" in image_proj:
            kind = "IP-Adapter full-face (CLIP)"
        elif w0 is not None and w0.ndim == 2:
            kind = f"a projection reading {w0.shape[1]}-d inputs"
        else:
            kind = f"image_proj keys {sorted(image_proj)[:4]}"
        raise FaceIDFileError(f"{name}: not an IP-Adapter-FaceID file ({kind}); FaceID projects a 512-d "
                              "insightface embedding. Use ip-adapter-faceid*_sd15.bin / *_sdxl.bin here, and an "
                              "IP-Adapter pack for CLIP-image adapters")
    if w2.ndim != 2 or w2.shape[0] % d:
        raise FaceIDFileError(f"{name}: image_proj.proj.2.weight has shape {tuple(w2.shape)}; expected "
                              f"({d}·tokens, 1024)")
    tokens = int(w2.shape[0]) // d
    plus = any(k.startswith("perceiver_resampler.") for k in image_proj)
    if plus:
        return _plus_from_name(name, plus_version), tokens
    lora = any("_lora." in k for k in ip_adapter)
    if tokens == 16 and not lora:
        return "portrait", tokens
    return "faceid", tokens


def check_keys(part: str, got: dict, want: dict, name: str, layout: str, error: type = FaceIDFileError) -> None:
    """Strict key and shape check of one part of a file against ``want`` (``{key: shape}``): an ``error`` naming the
    file, the part, the ``layout`` (e.g. "SD1.5 FaceID") and the first missing, unexpected and mis-shaped keys."""
    def shape(k):
        return tuple(getattr(got[k], "shape", ()))
    missing = [k for k in want if k not in got]
    extra = [k for k in got if k not in want]
    bad = [f"{k} {shape(k)} (expected {tuple(want[k])})" for k in want if k in got and shape(k) != tuple(want[k])]
    if missing or extra or bad:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if extra:
            parts.append(f"{len(extra)} unexpected (e.g. {extra[:3]})")
        if bad:
            parts.append(f"wrong shapes: {bad[:3]}")
        raise error(f"{name}: {part} does not match the {layout} layout: {'; '.join(parts)}")


def validate(image_proj: dict, ip_adapter: dict, name: str = "ip-adapter", plus_version: str = PLUS_VERSIONS[0],
             topology: Topology | None = None) -> FaceIDWeights:
    """Detect the base and variant and check every key and shape (strict, as the reference loads them) against
    the base's published topology, or ``topology`` when given (reduced test models)."""
    topology = topology or base_topology(image_proj, ip_adapter, name)
    variant, tokens = detect_variant(image_proj, ip_adapter, name, plus_version, topology.context_dim)
    base = topology.name
    check_keys("image_proj", image_proj, expected_image_proj(variant, tokens, topology.context_dim), name,
               f"{base} FaceID")
    lora_keys = [k for k in ip_adapter if "_lora." in k]
    if variant == "portrait" and lora_keys:
        raise FaceIDFileError(f"{name}: a 16-token (Portrait) projection with LoRA keys is not a published layout")
    check_keys("ip_adapter", ip_adapter, expected_ip_adapter(bool(lora_keys), topology), name, f"{base} FaceID")
    for k, v in list(image_proj.items()) + list(ip_adapter.items()):
        if not v.is_floating_point():
            raise FaceIDFileError(f"{name}: tensor {k} is {v.dtype}, expected floating point weights")
    for k, v in image_proj.items():  # small; NaN weights anywhere show up in the tokens or the output
        if not torch.isfinite(v).all():
            raise FaceIDFileError(f"{name}: tensor image_proj.{k} contains NaN or infinite values")
    return FaceIDWeights(variant, tokens, image_proj, ip_adapter, name, topology)


def load_faceid(path: str, plus_version: str = PLUS_VERSIONS[0], topology: Topology | None = None) -> FaceIDWeights:
    """Read and validate an IP-Adapter-FaceID file (SD1.5 or SDXL)."""
    name = os.path.basename(path)
    image_proj, ip = read_container(path)
    return validate(image_proj, ip, name, plus_version, topology)


__all__ = ["FaceIDFileError", "FaceIDWeights", "load_faceid", "validate", "detect_variant", "read_container",
           "expected_image_proj", "expected_ip_adapter", "VARIANTS", "PLUS_VERSIONS", "MAX_PORTRAIT_IMAGES",
           "base_topology", "CLIP_TOKENS", "CLIP_DIM", "ID_DIM"]
