"""The public-weights (IP-Adapter-FaceID) identity term as an additive rule of the pack's attn2 hook.

:class:`FaceIDRule` is registered on every cross-attention block through the IPAdapter-style protocol of
:mod:`.patch` (``hook.add(callback, sigma_start=…, sigma_end=…)``; the hook runs the block's base attention, then
adds each callback's result inside its sigma range). Per call it adds, before the block's ``to_out``::

    Σ_n w_n · m_n ⊙ softmax(Q · (W_k^p T_n)ᵀ / √d) · (W_v^p T_n)

in one batched op (:func:`instantfamily_core.faceid.identity_term`), where ``p`` is the FaceID processor of this
transformer in the model's topology (:class:`~instantfamily_core.faceid.Topology`, read from the live model and
checked against the file's: SD1.5's 16 or SDXL's 70 cross-attentions, the middle block included), ``T_n`` person n's tokens on
cond rows and their unconditional tokens on uncond rows, ``m_n`` their mask resized to the block's
``activations_shape``. What it shares with the InstantFamily rule comes from :class:`.patch.IdentityState`: masks
per row (area conditioning), cond/uncond row selection, the latent check and per-run caches.
"""

from __future__ import annotations

from typing import Optional

import torch

from instantfamily_core.errors import BaseModelError
from instantfamily_core.faceid import PUBLISHED, FaceIDWeights, Topology, identity_term

from .patch import IdentityState, install_hooks, live_topology


class FaceIDRule(IdentityState):
    """N people's FaceID tokens, masks and weights for one apply.

    ``tokens``/``uncond_tokens``: ``(N, T, d)``; ``masks``: ``(N, H, W)``; ``weights``: N values ≥ 0;
    ``key_valid``: ``(N, T)`` bool when people have different token counts (Portrait), else ``None``;
    ``topology``: the patched model's (default: the file's).
    """

    def __init__(self, weights_file: FaceIDWeights, tokens: torch.Tensor, uncond_tokens: torch.Tensor,
                 masks: torch.Tensor, weights, key_valid: Optional[torch.Tensor] = None,
                 sigma_range: Optional[tuple[float, float]] = None, topology: Optional[Topology] = None):
        super().__init__(tokens, uncond_tokens, masks, sigma_range)
        self.file = weights_file
        self.topology = topology or weights_file.topology
        self.weights = self.region_scale = torch.as_tensor(list(weights), dtype=torch.float32)
        self.key_valid = key_valid
        self.kv_cache: dict = {}

    def _kv(self, p: int, like: torch.Tensor):
        """Processor ``p``'s keys/values of every person's tokens and unconditional tokens, on ``like``'s device
        and dtype. Kept for the rule's life, not per run: they depend only on the tokens and the adapter file's
        ``to_k_ip``/``to_v_ip`` (no model weight patch reaches those), so the file's weights go to the device once
        per device and dtype, not once per generation."""
        key = (p, like.device, like.dtype)
        if key not in self.kv_cache:
            wk, wv = (w.to(like.device, like.dtype) for w in self.file.kv_weights(p))
            n, t, d = self.tokens.shape
            both = torch.cat([self.tokens, self.null_tokens]).to(like.device, like.dtype).reshape(2 * n * t, d)
            k, v = (both @ wk.T).reshape(2, n, t, -1), (both @ wv.T).reshape(2, n, t, -1)
            self.kv_cache[key] = (k[0], v[0], k[1], v[1])
        return self.kv_cache[key]

    def prepare(self, call) -> None:
        """Once per model call, outside any compiled region: the shared gate and latent check, the keys/values of
        every block's FaceID processor (built on the first call, then kept) and the masks at every feature size."""
        super().prepare(call)
        like = torch.empty(0, device=call.device, dtype=call.dtype)
        for key in {key for hook in call.hooks if self in hook.rules() for key in hook.modules}:
            slot = self.topology.slot(key)
            if slot is not None:
                self._kv(slot.attn2, like)
        for hw in call.feature_sizes:
            self.mask_region(call.run, None, hw)

    def __call__(self, out, q, k, v, extra_options, **kwargs):
        block = extra_options["block"]
        slot = self.topology.slot((block[0], block[1], extra_options.get("block_index", 0)))
        if slot is None:
            raise BaseModelError(f"FaceID: block {tuple(block)}/{extra_options.get('block_index', 0)} is not one "
                                 f"of {self.topology.describe()}")
        rows = q.shape[0]
        kc, vc, ku, vu = self._kv(slot.attn2, q)
        tag = (slot.attn2, q.device, q.dtype)
        k_ids = self.per_row(("faceid-k",) + tag, extra_options, rows, kc, ku)
        v_ids = self.per_row(("faceid-v",) + tag, extra_options, rows, vc, vu)
        hw = tuple(int(s) for s in extra_options["activations_shape"][-2:])
        region = self.region(extra_options, rows, hw).to(q.device)
        return identity_term(q, k_ids, v_ids, extra_options["n_heads"], region, self.key_valid)


def check_topology(model, weights: FaceIDWeights) -> Topology:
    """The model's topology, read from its live modules; it must be the one the file's weights address (same
    text width, cross-attentions and widths), else a :class:`BaseModelError` naming both."""
    try:
        live = live_topology(model)
    except ValueError as e:
        raise BaseModelError(f"model: {e}; the FaceID weights need {weights.topology.describe()}") from None
    problems = weights.topology.differences(live)
    if problems:
        if PUBLISHED.get(live.context_dim) is live:
            fix = f"use a {live.name} file with this model, or a {weights.base} model with this file"
        else:
            fix = f"the weights address every cross-attention of a full {weights.base} UNet"
        kind = "an InstantID" if getattr(weights, "variant", "") == "instantid" else "a FaceID"
        raise BaseModelError(f"model: {weights.name} is {kind} file for {weights.topology.describe()}, but the "
                             f"model is {live.describe()} ({'; '.join(problems[:2])}); {fix}")
    return live


def install_faceid(model, rule: FaceIDRule, sigma_range: tuple[float, float]):
    """``model`` (a clone: modified in place) with the FaceID rule on every cross-attention block."""
    start, end = sigma_range
    return install_hooks(model, None, callbacks=((rule, {"sigma_start": start, "sigma_end": end}),),
                         owner="InstantFamily FaceID")
