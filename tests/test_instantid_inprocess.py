"""Apply InstantFamily InstantID in the real ComfyUI host, on a reduced SDXL topology (UNet and IdentityNet with
cross-attentions at SDXL's places, 2048-d context): the UNet term with one person and a full mask equals the
reference ``IPAttnProcessor`` formula written out here in every transformer (middle block included); a real sampling
step with the IdentityNet runs, the identities change the result and reversing them changes it again; the input
model and ControlNet are left untouched; each identity acts only inside its mask and swapping swaps regions;
another pack's attn2 patch acts beside the term in both orders; wrong inputs are typed errors."""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch

from support import faceid_files as ff
from support import instantid_files as iif
from support import sdxl_files as sx
from test_faceid_core import ref_attention
from tools.devkit.comfy_host import HOW_TO_PROVIDE, find_comfyui
from tools.devkit.identities import random_identities

pytestmark = [pytest.mark.skipif(find_comfyui() is None, reason=HOW_TO_PROVIDE),
              pytest.mark.usefixtures("clone_rule")]


@pytest.fixture(scope="module")
def host():
    from tools.devkit.comfy_host import import_host, load_pack
    import_host()
    pack = load_pack()
    return {m: importlib.import_module(f"{pack.__name__}.nodes.{m}") for m in ("patch", "instantid_nodes")}


@pytest.fixture(scope="module")
def tiny(host):
    return sx.tiny_sdxl(0)


@pytest.fixture(scope="module")
def instantid(host, tiny):
    from instantfamily_core.instantid import validate
    shapes = {k: v.shape for k, v in tiny.model.diffusion_model.state_dict().items()}
    image_proj, ip = iif.reduced_parts(ff.diffusers_block_widths(sx.TINY_SDXL_UNET, shapes), seed=3)
    weights = validate(image_proj, ip, "ip-adapter.bin", topology=host["patch"].live_topology(tiny))
    return host["instantid_nodes"].InstantIDModel(weights)


def _ids(n, seed):
    g = torch.Generator().manual_seed(seed + 100)
    return [dataclasses.replace(i, extra={**i.extra, "raw_embeddings": [torch.randn(512, generator=g) * 20]})
            for i in random_identities(n, seed, face_pack="antelopev2")]


def _apply(host, model, instantid, ids, masks, control=None, **kw):
    args = dict(ip_weight=0.8, cn_strength=0.8, identity_weights="", start_at=0.0, end_at=1.0, noise=0.0)
    args.update(kw)
    cond = [[torch.randn(1, 77, 2048, generator=torch.Generator().manual_seed(1)), {"pooled_output": torch.zeros(1, 1280)}]]
    neg = [[torch.zeros(1, 77, 2048), {"pooled_output": torch.zeros(1, 1280)}]]
    kps = torch.rand(1, masks.shape[-2], masks.shape[-1], 3, generator=torch.Generator().manual_seed(2))
    return host["instantid_nodes"].ApplyInstantID().apply(model, instantid, control or sx.tiny_sdxl_controlnet(1),
                                                           ids, masks, kps, cond, neg, **args)


def test_unet_term_is_the_reference_ip_attention_in_every_transformer(host, tiny, instantid):
    ids = _ids(1, 0)
    model, _, _ = _apply(host, tiny, instantid, ids, torch.ones(1, 32, 32), ip_weight=0.6)
    replace = model.model_options["transformer_options"]["patches_replace"]["attn2"]
    rule = replace[("middle", 0)].callback[-1]
    tokens = instantid.resampler.tokens(ids[0].extra["raw_embeddings"])
    torch.testing.assert_close(rule.tokens[0], tokens)
    torch.testing.assert_close(rule.null_tokens[0], instantid.resampler.uncond_tokens(0.0))
    g = torch.Generator().manual_seed(0)
    live = host["patch"].attn2_modules(tiny.model.diffusion_model)
    assert ("middle", 0, 2) in live and len(live) == len(rule.topology.slots)
    for key, attn in live.items():
        c, heads = attn.to_q.weight.shape[0], attn.heads
        q = torch.randn(2, 16, c, generator=g)
        k, v = torch.randn(2, 77, c, generator=g), torch.randn(2, 77, c, generator=g)
        opts = {"block": key[:2], "block_index": key[2], "n_heads": heads, "activations_shape": [2, c, 4, 4],
                "cond_or_uncond": [1, 0], "sigmas": torch.tensor([5.0]),
                "sample_sigmas": torch.tensor([14.6, 1.0, 0.0]), "original_shape": [2, 4, 4, 4]}
        got = replace[key[:2]](q, k, v, opts).double()
        wk, wv = (w.float() for w in instantid.weights.kv_weights(rule.topology.slot(key).attn2))
        text = ref_attention(q, k, v, heads)
        for row, toks in ((0, rule.null_tokens[0]), (1, tokens)):  # IPAttnProcessor: text + scale · ip attention
            want = text[row] + 0.6 * ref_attention(q[row:row + 1], toks[None] @ wk.T, toks[None] @ wv.T, heads)[0]
            torch.testing.assert_close(got[row], want, atol=2e-4, rtol=2e-4)


def test_sampling_with_the_identitynet_runs_and_the_identities_act(host, tiny, instantid):
    import comfy.sample
    control = sx.tiny_sdxl_controlnet(1)
    before = {k: v.clone() for k, v in control.control_model.state_dict().items()}
    masks = torch.zeros(2, 64, 64)
    masks[0, :, :32], masks[1, :, 32:] = 1, 1
    ids = _ids(2, 4)

    def run(people, weight=0.8):
        model, pos, neg = _apply(host, tiny, instantid, people, masks, control, ip_weight=weight, cn_strength=weight)
        return comfy.sample.sample(model, torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), 2,
                                   5.0, "euler", "normal", pos, neg, torch.zeros(1, 4, 8, 8), disable_pbar=True,
                                   seed=0)
    forward, reversed_, off = run(ids), run(ids[::-1]), run(ids, 0.0)
    assert torch.isfinite(forward).all()
    assert (forward - off).abs().max() > 1e-4 and (forward - reversed_).abs().max() > 1e-4
    assert type(control.control_model).__name__ == "ControlNet"  # the loaded IdentityNet is untouched
    assert all(torch.equal(v, control.control_model.state_dict()[k]) for k, v in before.items())
    assert not tiny.model_options.get("transformer_options", {}).get("patches_replace")


def test_unet_term_keeps_each_identity_inside_its_mask_and_swapping_swaps_regions(host, tiny, instantid):
    from test_faceid_sdxl import identities_stay_in_their_masks
    identities_stay_in_their_masks(host, tiny, lambda m, ids, masks: _apply(host, m, instantid, ids, masks)[0],
                                   _ids(2, 6))


@pytest.mark.parametrize("order", ["ours_first", "other_first"])
def test_another_packs_callbacks_act_beside_the_instantid_term_in_both_orders(host, tiny, instantid, order):
    """Another pack's attn2 patch (IPAdapter-style, with callbacks) on the same model, before or after Apply
    InstantID: both terms act in every cross-attention, neither is dropped."""
    from test_faceid_sdxl import other_pack_acts_beside
    ids, masks = _ids(1, 3), torch.ones(1, 32, 32)
    other_pack_acts_beside(host, tiny, lambda model: _apply(host, model, instantid, ids, masks)[0], order)


def test_bad_inputs_are_typed_errors(host, tiny, instantid):
    from instantfamily_core.errors import BaseModelError, EmbeddingError, MaskError
    with pytest.raises(MaskError):
        _apply(host, tiny, instantid, _ids(2, 0), torch.ones(1, 32, 32))
    with pytest.raises(EmbeddingError, match="raw face embedding"):
        _apply(host, tiny, instantid, random_identities(1, 0), torch.ones(1, 32, 32))
    with pytest.raises(BaseModelError, match="InstantID needs a SDXL model"):
        _apply(host, ff.meta_sd15(), instantid, _ids(1, 0), torch.ones(1, 32, 32))
