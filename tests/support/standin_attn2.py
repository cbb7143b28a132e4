"""A stand-in for another pack's attn2 patches, written from the *description* of the protocol IPAdapter-style
packs follow (no code from those packs): a replace patch under the 2-part key ``(block, number)`` holding lists
``callback`` and ``kwargs``; a later pack calls ``.add(callback, **kwargs)`` on the patch it finds there; at run
time each callback's result, within its sigma range, is added to the plain attention's output.

Used in-process (``tests/test_coexistence.py``) and inside a ComfyUI server as a node (``standin_pack/``)."""

from __future__ import annotations

import torch


class StandInReplace:
    """Another pack's attn2 replace patch: plain attention plus its callbacks."""

    def __init__(self, callback, **kwargs):
        self.callback = [callback]
        self.kwargs = [kwargs]

    def add(self, callback, **kwargs):
        self.callback.append(callback)
        self.kwargs.append(kwargs)

    def __call__(self, q, k, v, extra_options):
        import comfy.ldm.modules.attention as A
        out = A.optimized_attention(q, k, v, extra_options["n_heads"])
        sigma = float(extra_options["sigmas"].flatten()[0]) if "sigmas" in extra_options else 1e9
        for callback, kw in zip(self.callback, self.kwargs):
            if kw["sigma_end"] <= sigma <= kw["sigma_start"]:
                out = out + callback(out, q, k, v, extra_options, **kw)
        return out


class StyleTokens:
    """A callback adding ``weight · attention(q, K_style, V_style)``, recording the blocks it ran in."""

    def __init__(self, seed=7, weight=0.5):
        g = torch.Generator().manual_seed(seed)
        self.tokens = torch.randn(4, 1280, generator=g)
        self.weight = weight
        self.calls = []

    def __deepcopy__(self, memo):  # like the plain function such packs register: clones share it
        return self

    def __call__(self, out, q, k, v, extra_options, **kwargs):
        import comfy.ldm.modules.attention as A
        self.calls.append((extra_options["block"][0], extra_options["block"][1]))
        kv = self.tokens[:, :q.shape[-1]].to(q).expand(q.shape[0], -1, -1)
        return self.weight * A.attention_basic(q, kv, kv, extra_options["n_heads"])


def standin_apply(model, callback, sigma_start=1e9, sigma_end=0.0):
    """What an IPAdapter-style node does: a clone, then per 2-part key ``.add`` or a new patch."""
    m = model.clone()
    to = m.model_options.get("transformer_options", {}).copy()
    to["patches_replace"] = dict(to.get("patches_replace", {}))
    to["patches_replace"]["attn2"] = dict(to["patches_replace"].get("attn2", {}))
    for key in block_keys(m):
        kw = {"sigma_start": sigma_start, "sigma_end": sigma_end}
        if key in to["patches_replace"]["attn2"]:
            to["patches_replace"]["attn2"][key].add(callback, **kw)
        else:
            to["patches_replace"]["attn2"][key] = StandInReplace(callback, **kw)
    m.model_options["transformer_options"] = to
    return m


def block_keys(model):
    from comfy.ldm.modules.attention import SpatialTransformer
    dm = model.model.diffusion_model
    keys = []
    for name, blocks in (("input", dm.input_blocks), ("middle", [dm.middle_block]), ("output", dm.output_blocks)):
        for number, block in enumerate(blocks):
            if any(isinstance(layer, SpatialTransformer) for layer in block):
                keys.append((name, number))
    return keys
