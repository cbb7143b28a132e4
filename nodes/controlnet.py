"""The InstantFamily ControlNet inside ComfyUI: same [text; identities] context, same masked attention.

ComfyUI's stock ControlNet calls its blocks without ``transformer_options`` (comfy/controlnet.py get_control →
cldm.ControlNet.forward), so attention patches never reach it. :class:`MaskedControlNetModel` is a cldm
ControlNet whose forward passes ``transformer_options`` to every block, and :class:`InstantFamilyControlNet`
hands it the apply node's hooks on each call. Both live only on the objects this pack creates: other graphs and
other ControlNets are untouched, and the object chains with ControlNets applied before or after it.

MaskedControlNetModel.forward mirrors ``comfy/cldm/cldm.py`` ControlNet.forward of ComfyUI 0.3.64 (signature
``(self, x, hint, timesteps, context, y=None, **kwargs)``), minus its union-ControlNet path, which this pack never
builds. tests/test_controlnet_upstream.py pins that upstream method (signature, the blocks it uses, a hash of its
source) and fails when a ComfyUI update changes it.
"""

from __future__ import annotations


import comfy.cldm.cldm
import comfy.controlnet
import comfy.model_detection
import comfy.model_management
import comfy.ops
import comfy.utils
from comfy.ldm.modules.diffusionmodules.util import timestep_embedding

from instantfamily_core.checkpoint import CONTROLNET_HINT_CHANNELS
from instantfamily_core.errors import CheckpointError

from .patch import REGIONS_KEY, Attn2Hook, InstantFamilyAttention, attn2_modules


class MaskedControlNetModel(comfy.cldm.cldm.ControlNet):
    """cldm ControlNet whose blocks receive ``transformer_options`` (and with them the attn2 hooks).

    ``forward`` mirrors ComfyUI 0.3.64's ``comfy.cldm.cldm.ControlNet.forward``; without ``transformer_options``
    it is that method."""

    def forward(self, x, hint, timesteps, context, y=None, transformer_options=None, **kwargs):
        if transformer_options is None:
            return super().forward(x, hint, timesteps, context, y=y, **kwargs)
        opts = transformer_options
        opts["original_shape"] = list(x.shape)
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels, repeat_only=False).to(x.dtype))
        guided_hint = self.input_hint_block(hint, emb, context)
        if self.num_classes is not None:
            emb = emb + self.label_emb(y)
        outputs, h = [], x
        for number, (module, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs)):
            opts["block"] = ("input", number)
            h = module(h, emb, context, opts)
            if guided_hint is not None:
                h = h + guided_hint
                guided_hint = None
            outputs.append(zero_conv(h, emb, context))
        opts["block"] = ("middle", 0)
        h = self.middle_block(h, emb, context, opts)
        return {"middle": [self.middle_block_out(h, emb, context)], "output": outputs}


class InstantFamilyControlNet(comfy.controlnet.ControlNet):
    """A ComfyUI ControlNet carrying InstantFamily's attention state (``self.instantfamily``)."""

    instantfamily: InstantFamilyAttention | None = None
    _hook: Attn2Hook | None = None

    def hook(self) -> Attn2Hook:
        """This copy's attn2 hook, bound to the control model's own attention modules."""
        if self._hook is None or self._hook.state is not self.instantfamily:
            self._hook = Attn2Hook(self.instantfamily, attn2_modules(self.control_model))
        return self._hook

    def get_control(self, x_noisy, t, cond, batched_number, transformer_options):
        state = self.instantfamily
        if state is None:
            return super().get_control(x_noisy, t, cond, batched_number, transformer_options)
        opts = {k: transformer_options[k] for k in ("cond_or_uncond", "uuids", "sigmas", "sample_sigmas",
                                                    REGIONS_KEY) if k in transformer_options}
        hook = self.hook()
        opts["patches_replace"] = {"attn2": {key: hook for key in hook.modules}}
        self.extra_args["transformer_options"] = opts
        try:
            return super().get_control(x_noisy, t, cond, batched_number, transformer_options)
        finally:
            self.extra_args.pop("transformer_options", None)

    def copy(self):
        c = type(self)(None, global_average_pooling=self.global_average_pooling,
                                    load_device=self.load_device, manual_cast_dtype=self.manual_cast_dtype)
        c.control_model = self.control_model
        c.control_model_wrapped = self.control_model_wrapped
        self.copy_to(c)
        c.instantfamily = self.instantfamily
        return c


def ldm_config_from_diffusers(cfg: dict, name: str = "controlnet_config") -> dict:
    """ComfyUI (ldm) ControlNet config from a diffusers ``ControlNetModel`` config."""
    try:
        boc = [int(c) for c in cfg["block_out_channels"]]
        levels, ch = len(boc), boc[0]
        per_level = int(cfg.get("layers_per_block", 2))
        tl = cfg.get("transformer_layers_per_block", 1)
        tl = [int(x) for x in tl] if isinstance(tl, (list, tuple)) else [int(tl)] * levels
        heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
        heads = sorted(set(heads)) if isinstance(heads, (list, tuple)) else [heads]
        depth = []
        for i, kind in enumerate(cfg["down_block_types"]):
            depth += [tl[i] if "CrossAttn" in kind else 0] * per_level
        hint = tuple(cfg.get("conditioning_embedding_out_channels", CONTROLNET_HINT_CHANNELS))
        out = {"image_size": 32, "in_channels": int(cfg.get("in_channels", 4)), "model_channels": ch,
               "num_res_blocks": [per_level] * levels, "channel_mult": [c // ch for c in boc],
               "transformer_depth": depth, "transformer_depth_middle": tl[-1],
               "context_dim": int(cfg["cross_attention_dim"]),
               "use_linear_in_transformer": bool(cfg.get("use_linear_projection", False)),
               "num_heads": int(heads[0]), "num_head_channels": -1, "use_spatial_transformer": True,
               "legacy": False, "adm_in_channels": None, "use_checkpoint": False,
               "hint_channels": int(cfg.get("conditioning_channels", 3))}
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{name}: not a usable diffusers ControlNet config ({e})") from None
    if len(heads) != 1:
        raise CheckpointError(f"{name}: per-level head counts {heads} are not SD1.5's; expected one head count")
    if hint != CONTROLNET_HINT_CHANNELS:
        raise CheckpointError(f"{name}: conditioning_embedding_out_channels {list(hint)} unsupported; ComfyUI's "
                              f"ControlNet uses {list(CONTROLNET_HINT_CHANNELS)}")
    return out


def diffusers_to_ldm_keys(sd: dict, ldm_cfg: dict, name: str = "controlnet") -> dict:
    """Rename a diffusers ControlNet state dict to ComfyUI's ldm layout (every key must map)."""
    mapping = comfy.utils.unet_to_diffusers({**ldm_cfg, "transformer_depth_output": [0] * sum(
        n + 1 for n in ldm_cfg["num_res_blocks"])})
    mapping["controlnet_mid_block.weight"] = "middle_block_out.0.weight"
    mapping["controlnet_mid_block.bias"] = "middle_block_out.0.bias"
    i = 0
    while f"controlnet_down_blocks.{i}.weight" in sd:
        for s in ("weight", "bias"):
            mapping[f"controlnet_down_blocks.{i}.{s}"] = f"zero_convs.{i}.0.{s}"
        i += 1
    blocks = 0
    while f"controlnet_cond_embedding.blocks.{blocks}.weight" in sd:
        blocks += 1
    for s in ("weight", "bias"):
        mapping[f"controlnet_cond_embedding.conv_in.{s}"] = f"input_hint_block.0.{s}"
        for j in range(blocks):
            mapping[f"controlnet_cond_embedding.blocks.{j}.{s}"] = f"input_hint_block.{2 * (j + 1)}.{s}"
        mapping[f"controlnet_cond_embedding.conv_out.{s}"] = f"input_hint_block.{2 * (blocks + 1)}.{s}"
    leftover = sorted(k for k in sd if k not in mapping)
    if leftover:
        raise CheckpointError(f"{name}: ControlNet keys with no ComfyUI counterpart: {leftover[:5]}")
    return {mapping[k]: v for k, v in sd.items()}


def build_controlnet(sd: dict, layout: str, config: dict | None, name: str = "controlnet") -> InstantFamilyControlNet:
    """An :class:`InstantFamilyControlNet` from a checkpoint's ControlNet tensors (diffusers or ldm layout)."""
    if layout == "diffusers":
        if config is None:
            raise CheckpointError(f"{name}: a diffusers-layout ControlNet needs 'controlnet_config' metadata")
        ldm_cfg = ldm_config_from_diffusers(config)
        sd = diffusers_to_ldm_keys(sd, ldm_cfg, name)
    else:
        if config is None:
            detected = comfy.model_detection.model_config_from_unet(sd, "", True)
            if detected is None:
                raise CheckpointError(f"{name}: cannot detect the ControlNet architecture; store its config")
            ldm_cfg = dict(detected.unet_config)
            ldm_cfg.pop("out_channels", None)
            ldm_cfg["hint_channels"] = int(sd["input_hint_block.0.weight"].shape[1])
        else:
            ldm_cfg = dict(config)
    load_device = comfy.model_management.get_torch_device()
    unet_dtype = comfy.model_management.unet_dtype(model_params=-1, weight_dtype=comfy.utils.weight_dtype(sd))
    manual_cast = comfy.model_management.unet_manual_cast(unet_dtype, load_device)
    # as ComfyUI's own ControlNet loaders (0.3.64's diffusers/controlnet-lllite paths, every path since): no fp8
    # matrix-multiply ops for a ControlNet, even under --fast
    operations = comfy.ops.pick_operations(unet_dtype, manual_cast, load_device=load_device, disable_fast_fp8=True)
    model = MaskedControlNetModel(**ldm_cfg, operations=operations, dtype=unet_dtype,
                                  device=comfy.model_management.unet_offload_device())
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{name}: ControlNet weights do not fit its config (missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]})")
    return InstantFamilyControlNet(model, load_device=load_device, manual_cast_dtype=manual_cast)
