"""InstantID's IdentityNet with N people in one pass (``nodes/identitynet.py``), on a reduced SDXL ControlNet in the
real ComfyUI host: N = 1 with a full mask equals ComfyUI's stock ControlNet run with the 16 tokens as its context;
in every IdentityNet cross-attention identity n changes the output only inside region n, positions outside every
region get no identity, swapping identities swaps regions; a ControlNet chained before it still reads the text;
the loaded ControlNet is never modified; wrong ControlNets are refused by name."""

from __future__ import annotations

import sys

import pytest
import torch

from support import sdxl_files as sx
from test_faceid_core import ref_attention
from tools.devkit.comfy_host import HOW_TO_PROVIDE, find_comfyui

pytestmark = pytest.mark.skipif(find_comfyui() is None, reason=HOW_TO_PROVIDE)

T = 16


@pytest.fixture(scope="module")
def host():
    from tools.devkit.comfy_host import import_host, load_pack
    import_host()
    pack = load_pack()
    import importlib
    return (importlib.import_module(f"{pack.__name__}.nodes.identitynet"),
            sys.modules[f"{pack.__name__}.nodes.patch"])


def _tokens(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, T, 2048, generator=g), torch.randn(n, T, 2048, generator=g) * 0.3


def _run(control, x, sigma, cond, rows_uncond):
    import comfy.model_base
    import comfy.supported_models
    cfg = comfy.supported_models.SDXL(dict(sx.TINY_SDXL_UNET))
    c = control
    while c is not None:  # what pre_run sets on every ControlNet of the chain
        c.model_sampling_current = comfy.model_base.model_sampling(cfg, comfy.model_base.ModelType.EPS)
        c = c.previous_controlnet
    opts = {"cond_or_uncond": list(rows_uncond), "sigmas": sigma, "sample_sigmas": torch.tensor([14.6, 1.0, 0.0])}
    return control.get_control(x, sigma, cond, 1, opts)


def _cond(rows, seed=5):
    g = torch.Generator().manual_seed(seed)
    return {"c_crossattn": torch.randn(rows, 77, 2048, generator=g), "y": torch.randn(rows, 2816, generator=g)}


def _hinted(cn, hint):
    c = cn.copy().set_cond_hint(hint, 0.8, (0.0, 1.0))
    return c


def test_one_person_full_mask_equals_the_stock_controlnet_with_the_16_tokens(host):
    ident, _ = host
    loaded = sx.tiny_sdxl_controlnet(1)
    hint = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    tokens, uncond = _tokens(1, 3)
    rule = ident.IdentityNetRule(tokens, uncond, torch.ones(1, 128, 128))
    ours = _hinted(ident.identitynet_for(loaded, rule), hint)
    x, sigma = torch.randn(2, 4, 16, 16), torch.tensor([3.0, 3.0])
    cond = _cond(2)
    got = _run(ours, x, sigma, cond, (1, 0))  # row 0 uncond, row 1 cond
    stock = _hinted(loaded, hint)
    ref_cond = dict(cond, crossattn_controlnet=torch.cat([uncond, tokens]))  # what ComfyUI gives a ControlNet
    want = _run(stock, x, sigma, ref_cond, (1, 0))
    for kind in ("middle", "output"):
        for a, b in zip(got[kind], want[kind]):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)
    assert type(loaded.control_model).__name__ == "ControlNet"  # the loaded model is untouched
    assert type(ours.control_model).__name__ == "MaskedControlNetModel"
    assert dict(ours.control_model.named_parameters()).keys() == dict(loaded.control_model.named_parameters()).keys()
    assert all(a is b for a, b in zip(ours.control_model.parameters(), loaded.control_model.parameters()))


def _halves(n, h=32, w=32, top_free=True):
    masks = torch.zeros(n, h, w)
    for i in range(n):
        masks[i, h // 4 if top_free else 0:, i * w // n:(i + 1) * w // n] = 1
    return masks


def _hook_outputs(host, rule, loaded, seed=4):
    """Each IdentityNet cross-attention's hook output for random q and the stacked context's k, v."""
    ident, patch = host
    control = ident.identitynet_for(loaded, rule)
    hook = control.hook()
    g = torch.Generator().manual_seed(seed)
    ctx = rule.tokens.reshape(1, -1, 2048)
    out = {}
    for key, attn in patch.attn2_modules(control.control_model).items():
        c, heads, hw = attn.to_q.weight.shape[0], attn.heads, (8, 8)
        q = torch.randn(1, 64, c, generator=g)
        k, v = attn.to_k(ctx), attn.to_v(ctx)
        opts = {"block": key[:2], "block_index": key[2], "n_heads": heads, "activations_shape": [1, c, *hw],
                "cond_or_uncond": [0], "sample_sigmas": torch.tensor([14.6, 0.0])}
        out[key] = (hook(q, k, v, opts)[0].double(), q, k, v, heads)
    return out


def test_each_identity_acts_only_inside_its_region_and_nowhere_outside_every_region(host):
    ident, _ = host
    loaded = sx.tiny_sdxl_controlnet(1, wrap=True)
    tokens, uncond = _tokens(2, 6)
    masks = _halves(2)
    base = _hook_outputs(host, ident.IdentityNetRule(tokens, uncond, masks), loaded)
    changed = tokens.clone()
    changed[1] = torch.randn(T, 2048, generator=torch.Generator().manual_seed(9))
    other = _hook_outputs(host, ident.IdentityNetRule(changed, uncond, masks), loaded)
    region = torch.zeros(8, 8, dtype=torch.long)  # 0: no region, 1: person 1, 2: person 2
    region[2:, :4], region[2:, 4:] = 1, 2
    region = region.flatten()
    assert len(base) == 13 and ("middle", 0, 2) in base  # every cross-attention of the reduced IdentityNet
    for key, (out, q, k, v, heads) in base.items():
        diff = (other[key][0] - out).abs().amax(-1)
        assert diff[region != 2].max() == 0 and diff[region == 2].min() > 0, key  # person 2 only inside region 2
        assert out[region == 0].abs().max() == 0, key  # outside every region: no identity tokens at all
        inside = region == 1  # inside region 1: the stock attention over person 1's 16 tokens
        want = ref_attention(q, k[:, :T], v[:, :T], heads)[0]
        torch.testing.assert_close(out[inside], want[inside], atol=1e-5, rtol=1e-5)


def test_swapping_identities_swaps_regions(host):
    ident, _ = host
    loaded = sx.tiny_sdxl_controlnet(1)
    tokens, uncond = _tokens(2, 7)
    masks = _halves(2, top_free=False)
    ab = _hook_outputs(host, ident.IdentityNetRule(tokens, uncond, masks), loaded)
    ba = _hook_outputs(host, ident.IdentityNetRule(tokens.flip(0), uncond.flip(0), masks.flip(0)), loaded)
    swapped = _hook_outputs(host, ident.IdentityNetRule(tokens.flip(0), uncond.flip(0), masks), loaded)
    left = torch.zeros(8, 8, dtype=torch.bool)
    left[:, :4] = True
    left = left.flatten()
    for key in ab:
        torch.testing.assert_close(ab[key][0], ba[key][0], atol=1e-5, rtol=1e-5)  # same people, same places
        assert (swapped[key][0][left] - ab[key][0][left]).abs().max() > 1e-4  # the other face on the left


def test_a_controlnet_chained_before_it_still_reads_the_text(host):
    ident, _ = host
    loaded = sx.tiny_sdxl_controlnet(1)
    openpose = sx.tiny_sdxl_controlnet(11)
    hint = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    tokens, uncond = _tokens(2, 8)
    x, sigma, cond = torch.randn(2, 4, 16, 16), torch.tensor([3.0, 3.0]), _cond(2)
    first = _hinted(openpose, hint)
    ours = _hinted(ident.identitynet_for(loaded, ident.IdentityNetRule(tokens, uncond, _halves(2, 128, 128))), hint)
    ours.set_previous_controlnet(first)
    chained = _run(ours, x, sigma, cond, (1, 0))
    alone_first = _run(_hinted(openpose, hint), x, sigma, cond, (1, 0))
    ours_alone = _hinted(ident.identitynet_for(loaded, ident.IdentityNetRule(tokens, uncond, _halves(2, 128, 128))),
                         hint)
    alone_ours = _run(ours_alone, x, sigma, cond, (1, 0))
    for kind in ("middle", "output"):
        for c, a, b in zip(chained[kind], alone_first[kind], alone_ours[kind]):
            torch.testing.assert_close(c, a + b, atol=2e-5, rtol=2e-5)  # ComfyUI's merge: the sum


def test_wrong_controlnets_are_refused_by_name(host):
    from instantfamily_core.errors import BaseModelError
    from support.comfy_models import tiny_controlnet_ldm
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.ops
    ident, _ = host
    sd, cfg = tiny_controlnet_ldm()
    sd15 = comfy.controlnet.ControlNet(comfy.cldm.cldm.ControlNet(**cfg, operations=comfy.ops.disable_weight_init),
                                       load_device=torch.device("cpu"))
    tokens, uncond = _tokens(1, 1)
    with pytest.raises(BaseModelError, match=r"control_net: not an InstantID IdentityNet: its \d+ cross-attentions "
                                             r"read \[768\]-d context"):
        ident.identitynet_for(sd15, ident.IdentityNetRule(tokens, uncond, torch.ones(1, 8, 8)))
    with pytest.raises(BaseModelError, match="not a full ControlNet"):
        ident.identitynet_for(comfy.controlnet.T2IAdapter(torch.nn.Identity(), 1, 64, torch.device("cpu")),
                              ident.IdentityNetRule(tokens, uncond, torch.ones(1, 8, 8)))
