"""The attn2 hook that puts InstantFamily into ComfyUI's cross-attention — UNet and ControlNet alike.

ComfyUI's ``BasicTransformerBlock`` (comfy/ldm/modules/attention.py) projects the text context with the block's
``to_k``/``to_v`` and hands q, k, v to the ``attn2`` replace patch. The hook appends the identity tokens' keys and
values — the same ``to_k``/``to_v`` applied to the identity tokens, i.e. exactly the stack ``[text; identities]``
— using real tokens on cond rows and the null identity on uncond rows (``cond_or_uncond``), then runs the core
:class:`MaskedCrossAttention` on ComfyUI's active backend with the masks resized to the block's actual
``activations_shape``.

Identities never travel inside CONDITIONING, so ComfyUI's batching of conditionings of different lengths (LCM
repetition) cannot misplace them, and positive and negative always get the same layout. The identity tokens and
the weights are constant during a sampling run, so their keys/values are projected once per block and run (not
at every step); a new run (a new ``sample_sigmas``) projects again, picking up weight patches such as LoRAs.
Outside the start/end range the hook steps aside: plain text attention, exactly as without the patch.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from instantfamily_core.attention import MaskedCrossAttention
from instantfamily_core.errors import MaskError

ASPECT_TOLERANCE = 0.05


def comfy_attention(extra_options: dict) -> Callable:
    """The core's ``attention_fn`` contract on top of ComfyUI's selected backend (read at call time)."""
    import comfy.ldm.modules.attention as attention

    def fn(q, k, v, heads, mask=None):
        return attention.optimized_attention(q, k, v, heads, mask=mask, attn_precision=extra_options.get(
            "attn_precision"), transformer_options=extra_options)
    return fn


class InstantFamilyAttention:
    """Per-apply state shared by the UNet's and the ControlNet's hooks.

    ``tokens``: ``(N, T, D)`` identity tokens; ``null_tokens``: ``(T, D)``; ``attention``: the masked attention
    for these identities' masks and weights; ``sigma_range``: (sigma_start, sigma_end) — active while
    ``sigma_end <= sigma <= sigma_start``; ``attention_fn``: a fixed backend (default: ComfyUI's, per call).
    """

    def __init__(self, tokens: torch.Tensor, null_tokens: torch.Tensor, attention: MaskedCrossAttention,
                 sigma_range: Optional[tuple[float, float]] = None, attention_fn: Optional[Callable] = None):
        self.tokens = tokens.detach()
        self.null_tokens = null_tokens.detach()
        self.attention = attention
        self.mask_hw = tuple(int(v) for v in attention.masks.shape[-2:])
        self.sigma_range = sigma_range
        self.attention_fn = attention_fn
        self._gate: tuple = (None, True)

    def __deepcopy__(self, memo):  # ModelPatcher.clone() deep-copies model_options; this state is shared
        return self

    @property
    def num_identities(self) -> int:
        return int(self.tokens.shape[0])

    def check_latent(self, original_shape) -> None:
        """Masks are resized to each feature map by stretching: their aspect ratio must be the latent's, or faces
        would land beside their masks (and beside the ControlNet's centre-cropped pose image)."""
        if not original_shape or self.num_identities == 0:
            return
        lh, lw = int(original_shape[-2]), int(original_shape[-1])
        mh, mw = self.mask_hw
        if abs((mw / mh) / (lw / lh) - 1) > ASPECT_TOLERANCE:
            raise MaskError(f"masks: {mw}×{mh} px (aspect {mw / mh:.2f}) but the latent is {lw * 8}×{lh * 8} px "
                            f"(aspect {lw / lh:.2f}); make the pose and masks at the generation size (set width and "
                            "height of 'InstantFamily Pose to Masks' to the latent's)")

    def active(self, extra_options: dict) -> bool:
        """Whether identities act at this call's sigma (evaluated once per sigma tensor: one device sync per
        model call, not one per block)."""
        if self.num_identities == 0:
            return False
        sigmas = extra_options.get("sigmas")
        if self.sigma_range is None or sigmas is None:
            return True
        if self._gate[0] is not sigmas:
            sigma = float(sigmas.detach().flatten()[0])
            start, end = self.sigma_range
            self._gate = (sigmas, end <= sigma <= start)
        return self._gate[1]


def attn2_modules(diffusion_model) -> dict:
    """``{(block_name, number, transformer_index): attn2}`` for every cross-attention of a UNet-shaped model
    (``input_blocks``, ``middle_block``, ``output_blocks``), found from the live module tree."""
    from comfy.ldm.modules.attention import SpatialTransformer
    found = {}
    groups = [("input", getattr(diffusion_model, "input_blocks", []))]
    if getattr(diffusion_model, "middle_block", None) is not None:
        groups.append(("middle", [diffusion_model.middle_block]))
    groups.append(("output", getattr(diffusion_model, "output_blocks", [])))
    for name, blocks in groups:
        for number, block in enumerate(blocks):
            for layer in block:
                if isinstance(layer, SpatialTransformer):
                    for idx, tb in enumerate(layer.transformer_blocks):
                        if getattr(tb, "attn2", None) is not None:
                            found[(name, number, idx)] = tb.attn2
    return found


class Attn2Hook:
    """The ``attn2`` replace patch of one model (UNet or ControlNet: their block keys overlap, so each model has
    its own hook bound to its own ``attn2`` modules) sharing an :class:`InstantFamilyAttention`."""

    def __init__(self, state: InstantFamilyAttention, modules: dict):
        self.state = state
        self.modules = modules
        self._run = None
        self._kv: dict = {}
        self._rows: dict = {}

    def __deepcopy__(self, memo):
        return self

    def _identity_kv(self, key, like: torch.Tensor, run, original_shape=None):
        """Keys/values of the identity and null tokens through this block's projections, once per run."""
        if self._run is not run:
            self.state.check_latent(original_shape)
            self._run, self._kv, self._rows = run, {}, {}
        ck = (key, like.device, like.dtype)
        if ck not in self._kv:
            attn, st = self.modules[key], self.state
            real = st.tokens.to(like.device, like.dtype).flatten(0, 1).unsqueeze(0)
            null = st.null_tokens.to(like.device, like.dtype).repeat(st.num_identities, 1).unsqueeze(0)
            self._kv[ck] = (attn.to_k(real)[0], attn.to_v(real)[0], attn.to_k(null)[0], attn.to_v(null)[0])
        return self._kv[ck]

    def _stacked(self, key, k: torch.Tensor, extra_options: dict):
        """``(rows, N·T, C)`` keys and values: real identities on cond rows, null on uncond rows."""
        chunks = tuple(extra_options.get("cond_or_uncond") or (0,))
        rows = k.shape[0]
        ck = (key, chunks, rows, k.device, k.dtype)
        kr, vr, kn, vn = self._identity_kv(key, k, extra_options.get("sample_sigmas"),
                                           extra_options.get("original_shape"))
        if ck not in self._rows:
            per = max(1, rows // len(chunks))
            uncond = [chunks[min(i // per, len(chunks) - 1)] == 1 for i in range(rows)]
            self._rows[ck] = (torch.stack([kn if u else kr for u in uncond]),
                              torch.stack([vn if u else vr for u in uncond]))
        return self._rows[ck]

    def __call__(self, q, k, v, extra_options):
        st = self.state
        fn = st.attention_fn or comfy_attention(extra_options)
        heads = extra_options["n_heads"]
        if not st.active(extra_options):
            return fn(q, k, v, heads)
        key = (extra_options["block"][0], extra_options["block"][1], extra_options["block_index"])
        k_ids, v_ids = self._stacked(key, k, extra_options)
        k = torch.cat([k, k_ids], dim=1)
        v = torch.cat([v, v_ids], dim=1)
        return st.attention(q, k, v, heads, tuple(extra_options["activations_shape"][-2:]), attention_fn=fn)


def patch_model(model, state: InstantFamilyAttention):
    """A clone of ``model`` (ModelPatcher) with the InstantFamily hook on every cross-attention block."""
    m = model.clone()
    hook = Attn2Hook(state, attn2_modules(m.model.diffusion_model))
    for name, number, idx in hook.modules:
        m.set_model_attn2_replace(hook, name, number, idx)
    return m
