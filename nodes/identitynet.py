"""InstantID's IdentityNet for N people in one pass: masked cross-attention inside a stock ComfyUI ControlNet.

The IdentityNet is an SDXL ControlNet whose cross-attention context is the face tokens, not the text. For N people
its context here is the stacked ``[T_1; …; T_N]`` (``T`` tokens each; unconditional rows get the unconditional
tokens), and in each of its cross-attentions token group n is visible only inside person n's region::

    out_i = Σ_n m_n(i) · softmax(q_i K_nᵀ/√d) V_n        (K_n, V_n: the block's to_k/to_v of group n)

— one softmax per person, one batched op (:func:`instantfamily_core.faceid.identity_term` with region weights
``m_n``). For N = 1 and a full mask this is the stock attention over the 16 tokens; positions outside every region
attend to nothing and get 0 (no identity tokens).

ComfyUI's ControlNet forward passes no ``transformer_options`` to its blocks, so attention patches never reach it.
The file is loaded by ComfyUI's own ``ControlNetLoader``; :func:`identitynet_for` makes a copy of that CONTROL_NET
whose control model is a *view* of the loaded one (the same modules and parameters, the class
:class:`.controlnet.MaskedControlNetModel` whose forward passes them) and whose hook runs :class:`IdentityNetRule`.
The loaded ControlNet object and its model are never modified: other graphs using it see the stock ControlNet.

The context is the IdentityNet's own: :class:`IdentityNetControl` gives its control model the stacked tokens (per
row: cond or uncond) instead of the text, while ControlNets chained before or after it (e.g. an SDXL OpenPose)
still read the text — unlike ComfyUI's ``cross_attn_controlnet`` conditioning key, which every ControlNet of a
chain would read. The ADM input (pooled text, size and crop ids) is the UNet's, as in the reference.
"""

from __future__ import annotations

import copy

import torch

from instantfamily_core.errors import BaseModelError, MaskError
from instantfamily_core.faceid import identity_term

from .controlnet import InstantFamilyControlNet, MaskedControlNetModel
from .patch import IdentityState, attn2_modules


class IdentityNetRule(IdentityState):
    """The IdentityNet's base attention rule: ``tokens``/``uncond_tokens`` ``(N, T, D)``, ``masks`` ``(N, H, W)``
    in slot order. Always active (the ControlNet's own start/end percent gates it)."""

    attention_fn = None

    def __init__(self, tokens: torch.Tensor, uncond_tokens: torch.Tensor, masks: torch.Tensor):
        if tokens.ndim != 3 or uncond_tokens.shape != tokens.shape:
            raise MaskError(f"identity tokens: expected (N, T, D) twice, got {tuple(tokens.shape)} and "
                            f"{tuple(uncond_tokens.shape)}")
        super().__init__(tokens, uncond_tokens, masks, None)
        self.tokens_per_person = int(tokens.shape[1])

    def context(self, transformer_options: dict, rows: int, like: torch.Tensor) -> torch.Tensor:
        """``(rows, N·T, D)``: every person's tokens stacked, the uncond tokens on uncond rows."""
        cond = self.tokens.reshape(-1, self.tokens.shape[-1]).to(like.device, like.dtype)
        uncond = self.null_tokens.reshape(-1, self.null_tokens.shape[-1]).to(like.device, like.dtype)
        return self.per_row(("identitynet-context", like.device, like.dtype), transformer_options, rows, cond,
                            uncond)

    def active(self, extra_options: dict) -> bool:
        return self.num_identities > 0

    def __call__(self, attn, q, k, v, extra_options: dict, fn) -> torch.Tensor:
        b, length, c = k.shape
        n, t = self.num_identities, self.tokens_per_person
        if length != n * t:
            raise MaskError(f"IdentityNet: its context has {length} tokens, expected {n} people × {t} tokens; the "
                            "conditioning going into the IdentityNet must come from Apply InstantID")
        hw = tuple(int(s) for s in extra_options["activations_shape"][-2:])
        region = self.region(extra_options, q.shape[0], hw).to(q.device)
        return identity_term(q, k.view(b, n, t, c), v.view(b, n, t, c), extra_options["n_heads"], region)


def _check_identitynet(control_net, name: str = "control_net") -> None:
    """An SDXL-shaped ControlNet with 2048-d cross-attention and an image hint (IdentityNet's architecture; an
    SDXL OpenPose ControlNet has the same shape and cannot be told apart by its weights)."""
    model = getattr(control_net, "control_model", None)
    problems = []
    if model is None or not hasattr(model, "input_blocks"):
        problems.append(f"it is a {type(control_net).__name__}, not a full ControlNet (T2I adapters, "
                        "control-LoRAs and model patches cannot be an IdentityNet)")
    else:
        if getattr(model, "control_add_embedding", None) is not None:
            problems.append("it is a union ControlNet")
        attn = attn2_modules(model)
        widths = {int(a.to_k.weight.shape[1]) for a in attn.values()}
        if not attn or widths != {2048}:
            problems.append(f"its {len(attn)} cross-attentions read {sorted(widths)}-d context (the SDXL "
                            "IdentityNet: 34 reading 2048-d)")
    if problems:
        raise BaseModelError(f"{name}: not an InstantID IdentityNet: {'; '.join(problems)}; load InstantID's "
                             "ControlNetModel/diffusion_pytorch_model.safetensors with Load ControlNet Model")


def masked_view(control_model) -> MaskedControlNetModel:
    """A module object sharing every submodule and parameter with ``control_model`` (a cldm ControlNet) whose
    forward passes ``transformer_options`` to the blocks; ``control_model`` itself is untouched."""
    view = copy.copy(control_model)  # a new object, the same _modules/_parameters/_buffers dicts
    view.__class__ = MaskedControlNetModel
    return view


class _Computed:
    """Stands in for the previous ControlNet of a chain once its output is computed (with the text context)."""

    def __init__(self, value):
        self.value = value

    def get_control(self, *args, **kwargs):
        return self.value


class IdentityNetControl(InstantFamilyControlNet):
    """A copy of a loaded IdentityNet whose cross-attentions run :class:`IdentityNetRule` over its own context."""

    def get_control(self, x_noisy, t, cond, batched_number, transformer_options):
        prev = self.previous_controlnet
        before = None if prev is None else prev.get_control(x_noisy, t, cond, batched_number, transformer_options)
        own = dict(cond)
        own["crossattn_controlnet"] = self.instantfamily.context(transformer_options, x_noisy.shape[0],
                                                                 cond["c_crossattn"])
        self.previous_controlnet = None if prev is None else _Computed(before)
        try:
            return super().get_control(x_noisy, t, own, batched_number, transformer_options)
        finally:
            self.previous_controlnet = prev



def identitynet_for(control_net, rule: IdentityNetRule, name: str = "control_net") -> IdentityNetControl:
    """A copy of the loaded IdentityNet ``control_net`` (ComfyUI's CONTROL_NET) that runs ``rule``: same weights
    (its ModelPatcher, so ComfyUI loads and offloads them as usual), masked attention through a view of its model."""
    _check_identitynet(control_net, name)
    c = IdentityNetControl(None, global_average_pooling=control_net.global_average_pooling,
                           load_device=control_net.load_device, manual_cast_dtype=control_net.manual_cast_dtype)
    c.control_model = masked_view(control_net.control_model)
    c.control_model_wrapped = control_net.control_model_wrapped
    control_net.copy_to(c)
    c.instantfamily = rule
    return c
