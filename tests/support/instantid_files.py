"""Random-valued InstantID adapter files (``ip-adapter.bin`` of InstantX/InstantID) in the published layout,
written key by key from the public description (sdxl-weights note §1.2: InstantID's ``Resampler`` registration
order and the ``to_k_ip``/``to_v_ip`` widths per processor) — not from the pack's own layout code, so a mistake
there cannot hide behind a matching fixture.

FP32 like the published file; ``.bin`` = nested pickle ``{"image_proj": OrderedDict, "ip_adapter": OrderedDict}``
(the published pickle imports ``collections.OrderedDict`` and ``torch.FloatStorage``), ``.safetensors`` = flat
with ``image_proj.``/``ip_adapter.`` prefixes. Generated at test time, never committed.

Size: the full file written by :func:`write_bin` (torch 2.14, archive named ``ip-adapter``) is
**1,691,121,360 B** against the published **1,691,134,141 B**: 12,781 B (0.00076 %) smaller. The tensor data
(422,765,824 FP32 parameters = 1,691,063,296 B) is identical; the difference is the torch zip container only
(191 records, their names and alignment padding, the pickle), so the layout — keys, shapes, dtype — matches.
"""

from __future__ import annotations

import functools
from collections import OrderedDict

import torch

PUBLISHED_BYTES = 1_691_134_141
WRITTEN_BYTES = 1_691_121_360  # what write_bin(..., instantid_parts()) gives here (see the module docstring)
DATA_BYTES = 422_765_824 * 4
CONTEXT = 2048  # SDXL's text width (what to_k_ip reads, proj_out's output)


def sdxl_hidden(p: int) -> int:
    """Width of attn2 processor ``p`` (odd, 1…139) as the note states it: 640 for p ∈ {1..7, 109..119}, else
    1280."""
    return 640 if 1 <= p <= 7 or 109 <= p <= 119 else 1280


SDXL_ATTN2 = tuple(range(1, 140, 2))


def _randn(shape, g, std):
    return torch.randn(shape, generator=g).mul_(std)


def image_proj(seed: int = 0, output_dim: int = CONTEXT) -> OrderedDict:
    """InstantID's ``Resampler(dim=1280, depth=4, dim_head=64, heads=20, num_queries=16, embedding_dim=512,
    output_dim=2048, ff_mult=4)`` state dict, 51 keys in registration order: ``latents``, ``proj_in``,
    ``proj_out``, ``norm_out``, then per layer PerceiverAttention (norm1, norm2, to_q, to_kv, to_out; no biases)
    and FeedForward (LayerNorm ``1.0``, ``1.1`` 1280→5120, GELU, ``1.3`` 5120→1280; no biases)."""
    g = torch.Generator().manual_seed(seed)

    def norm(n):
        return 1 + _randn((n,), g, 0.1)
    sd = OrderedDict()
    sd["latents"] = _randn((1, 16, 1280), g, 1280 ** -0.5)  # the reference's init: randn / sqrt(dim)
    sd["proj_in.weight"], sd["proj_in.bias"] = _randn((1280, 512), g, 0.05), _randn((1280,), g, 0.02)
    sd["proj_out.weight"], sd["proj_out.bias"] = _randn((output_dim, 1280), g, 0.03), _randn((output_dim,), g, 0.02)
    sd["norm_out.weight"], sd["norm_out.bias"] = norm(output_dim), _randn((output_dim,), g, 0.02)
    for i in range(4):
        a, f = f"layers.{i}.0.", f"layers.{i}.1."
        sd[a + "norm1.weight"], sd[a + "norm1.bias"] = norm(1280), _randn((1280,), g, 0.02)
        sd[a + "norm2.weight"], sd[a + "norm2.bias"] = norm(1280), _randn((1280,), g, 0.02)
        sd[a + "to_q.weight"] = _randn((1280, 1280), g, 0.03)
        sd[a + "to_kv.weight"] = _randn((2560, 1280), g, 0.03)
        sd[a + "to_out.weight"] = _randn((1280, 1280), g, 0.02)
        sd[f + "0.weight"], sd[f + "0.bias"] = norm(1280), _randn((1280,), g, 0.02)
        sd[f + "1.weight"] = _randn((5120, 1280), g, 0.02)
        sd[f + "3.weight"] = _randn((1280, 5120), g, 0.02)
    return sd


def ip_adapter(seed: int = 1, widths=None, context_dim: int = CONTEXT) -> OrderedDict:
    """``<p>.to_k_ip.weight`` / ``<p>.to_v_ip.weight`` ``(hidden, 2048)`` at every odd p: SDXL's 70 (p = 1…139,
    widths :func:`sdxl_hidden`) or, with ``widths`` (per transformer block in diffusers' processor order, e.g.
    ``faceid_files.diffusers_block_widths`` of a reduced model), ``p = 2b + 1``."""
    g = torch.Generator().manual_seed(seed)
    pairs = ([(p, sdxl_hidden(p)) for p in SDXL_ATTN2] if widths is None
             else [(2 * b + 1, int(w)) for b, w in enumerate(widths)])
    sd = OrderedDict()
    for p, hidden in pairs:
        sd[f"{p}.to_k_ip.weight"] = _randn((hidden, context_dim), g, 0.02)
        sd[f"{p}.to_v_ip.weight"] = _randn((hidden, context_dim), g, 0.02)
    return sd


def _full(seed: int) -> tuple[OrderedDict, OrderedDict]:
    return _image_proj(seed), ip_adapter(seed + 1)


def instantid_parts(seed: int = 0) -> tuple[OrderedDict, OrderedDict]:
    """``(image_proj, ip_adapter)`` of a full-size SDXL file (1.69 GB of FP32, made anew each call: not held by
    the test process)."""
    a, b = _full(seed)
    return OrderedDict(a), OrderedDict(b)


@functools.lru_cache(maxsize=4)
def _image_proj(seed: int) -> OrderedDict:
    return image_proj(seed)


def reduced_parts(widths, seed: int = 0) -> tuple[OrderedDict, OrderedDict]:
    """``(image_proj, ip_adapter)`` for a reduced topology: the full Resampler (its size is fixed by the file;
    cached) and ``to_k_ip``/``to_v_ip`` for ``widths`` (per transformer block in diffusers order)."""
    return OrderedDict(_image_proj(seed)), ip_adapter(seed + 1, list(widths))


def write_bin(path, parts) -> None:
    """The published container: a nested pickle of the two state dicts."""
    torch.save({"image_proj": parts[0], "ip_adapter": parts[1]}, str(path))


def write_safetensors(path, parts) -> None:
    """A flat conversion (``image_proj.``/``ip_adapter.`` prefixes), as the popular ComfyUI pack also reads."""
    from safetensors.torch import save_file
    flat = {f"image_proj.{k}": v.contiguous() for k, v in parts[0].items()}
    flat.update({f"ip_adapter.{k}": v.contiguous() for k, v in parts[1].items()})
    save_file(flat, str(path))
