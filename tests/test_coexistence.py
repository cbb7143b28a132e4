"""Coexistence inside a real ComfyUI host: other packs' attn2 patches, every attention backend, regional
conditioning.

The other pack is the stand-in of ``support/standin_attn2.py`` (the IPAdapter-style protocol, written from its
description). Every test here runs under both clone rules (0.3.64's deep copy, 0.38's dict/list-only copy).
"""

from __future__ import annotations

import logging

import pytest
import torch

from tools.devkit.comfy_host import HOW_TO_PROVIDE, find_comfyui
from support.standin_attn2 import StandInReplace, StyleTokens, block_keys, standin_apply
from test_nodes_inprocess import apply, cond, host, ifmodel, sample, spy_attention  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.skipif(find_comfyui() is None, reason=HOW_TO_PROVIDE),
              pytest.mark.usefixtures("clone_rule")]  # every test under 0.3.64's and 0.38's clone()


def attn2_patches(model):
    return model.model_options["transformer_options"]["patches_replace"]["attn2"]


def block_inputs(patch_mod, model, key, rows=2, hw=(8, 8), seed=0):
    """q, k, v and extra_options for a direct call of one block's attn2 patch."""
    attn = patch_mod.attn2_modules(model.model.diffusion_model)[(*key, 0)]
    g = torch.Generator().manual_seed(seed)
    c = attn.to_q.weight.shape[0]
    q = torch.randn(rows, hw[0] * hw[1], c, generator=g)
    k = torch.randn(rows, 77, c, generator=g)
    v = torch.randn(rows, 77, c, generator=g)
    opts = {"block": key, "block_index": 0, "n_heads": 8, "cond_or_uncond": [0, 1][:rows],
            "activations_shape": [rows, c, *hw], "sigmas": torch.tensor([1.0]),
            "sample_sigmas": torch.tensor([14.6, 1.0, 0.0]), "original_shape": [rows, 4, 16, 16]}
    return q, k, v, opts


@pytest.fixture(scope="module")
def patch_mod(host):
    return host[2]["patch"]


@pytest.mark.parametrize("order", ["instantfamily_first", "other_pack_first"])
def test_other_packs_patch_and_instantfamily_both_act(host, ifmodel, patch_mod, order):
    from support.comfy_models import tiny_sd15
    nodes, _, m = host
    model = tiny_sd15()
    style = StyleTokens()
    if order == "instantfamily_first":
        alone, pos, neg = apply(host, ifmodel, model, 2)
        both = standin_apply(alone, style)
    else:
        other = standin_apply(model, style)
        both, pos, neg = apply(host, ifmodel, other, 2)
        alone, _, _ = apply(host, ifmodel, model, 2)
    other_alone = standin_apply(model, StyleTokens())
    keys = block_keys(model)
    patches = attn2_patches(both)
    assert set(patches) == set(keys), "one hook per block, under the 2-part key the other pack looks up"
    assert all(isinstance(patches[k], patch_mod.Attn2Hook) and patches[k].callback == [style] for k in keys)

    # block level: our output == InstantFamily alone + the other pack's contribution
    for key in keys:
        q, k, v, opts = block_inputs(patch_mod, model, key)
        with torch.no_grad():
            got = patches[key](q, k, v, dict(opts))
            ours = attn2_patches(alone)[key](q, k, v, dict(opts))
            always = {"sigma_start": 1e9, "sigma_end": 0.0}
            theirs = StandInReplace(StyleTokens(), **always)(q, k, v, dict(opts)) - \
                StandInReplace(lambda *a, **kw: 0.0, **always)(q, k, v, dict(opts))
        torch.testing.assert_close(got, ours + theirs, rtol=1e-5, atol=1e-6)
        assert (theirs.abs() > 1e-4).any()

    # sampling: both act in every block, and the result differs from either alone
    seen = []
    state = patches[keys[0]].state
    inner = spy_attention(state, lambda q, k, v, heads, hw: seen.append(tuple(hw)))
    try:
        out_both = sample(nodes, both, pos, neg, steps=1)
    finally:
        state.attention = inner
    assert sorted(set(style.calls)) == sorted(keys)
    assert len(seen) > len(keys)  # the InstantFamily rule ran in every UNet block (plus the ControlNet's)
    out_alone = sample(nodes, alone, pos, neg, steps=1)
    out_other = sample(nodes, other_alone, pos, neg, steps=1)
    assert not torch.allclose(out_both, out_alone, atol=1e-5)
    assert not torch.allclose(out_both, out_other, atol=1e-5)


def test_callbacks_keep_their_own_sigma_range(host, ifmodel, patch_mod):
    from support.comfy_models import tiny_sd15
    model = tiny_sd15()
    alone, _, _ = apply(host, ifmodel, model, 1)
    inside, outside = StyleTokens(seed=1), StyleTokens(seed=2)
    both = standin_apply(standin_apply(alone, inside, sigma_start=2.0, sigma_end=0.5), outside,
                         sigma_start=0.4, sigma_end=0.1)
    key = block_keys(model)[0]
    q, k, v, opts = block_inputs(patch_mod, model, key)  # sigma 1.0
    with torch.no_grad():
        got = attn2_patches(both)[key](q, k, v, dict(opts))
        ours = attn2_patches(alone)[key](q, k, v, dict(opts))
    assert inside.calls and not outside.calls
    assert not torch.allclose(got, ours, atol=1e-5)


def test_a_later_clone_never_reaches_the_earlier_model(host, ifmodel, patch_mod):
    from support.comfy_models import tiny_sd15
    model = tiny_sd15()
    alone, _, _ = apply(host, ifmodel, model, 1)
    standin_apply(alone, StyleTokens())
    assert all(not p.callback for p in attn2_patches(alone).values())
    assert "patches_replace" not in model.model_options.get("transformer_options", {})


def test_the_clone_rule_is_the_one_under_test(host, clone_rule):
    """The fixture really switches clone(): 0.38 shares what is neither dict nor list, 0.3.64 copies everything."""
    from support.comfy_models import tiny_sd15
    model = tiny_sd15().clone()
    leaf = StandInReplace(print)  # a plain object without __deepcopy__
    model.model_options.setdefault("transformer_options", {})["probe"] = {"leaf": leaf, "list": [leaf]}
    probe = model.clone().model_options["transformer_options"]["probe"]
    assert probe is not model.model_options["transformer_options"]["probe"]
    assert probe["list"] is not model.model_options["transformer_options"]["probe"]["list"]
    assert (probe["leaf"] is leaf) == (clone_rule == "0.38")


def test_rerunning_the_other_pack_on_a_cached_model_adds_its_callbacks_once(host, ifmodel, patch_mod):
    """ComfyUI caches the InstantFamily MODEL; re-running the other pack's node on it (new weight) clones it again.
    Each run's model has that run's one callback per block; the cached model has none, and sampling it runs none."""
    from support.comfy_models import tiny_sd15
    nodes, _, _ = host
    model = tiny_sd15()
    alone, pos, neg = apply(host, ifmodel, model, 1)
    styles = [StyleTokens(weight=w) for w in (0.3, 0.5, 0.7)]
    runs = [standin_apply(alone, s) for s in styles]
    for style, run in zip(styles, runs):
        assert all(p.callback == [style] for p in attn2_patches(run).values())
    assert all(not p.callback for p in attn2_patches(alone).values())
    sample(nodes, alone, pos, neg, steps=1)
    assert not any(s.calls for s in styles)
    sample(nodes, runs[-1], pos, neg, steps=1)
    assert styles[-1].calls and not styles[0].calls and not styles[1].calls


def test_without_the_clone_callback_the_0_38_rule_leaks(host, ifmodel, patch_mod, clone_rule):
    """What the ON_CLONE callback prevents, shown on the same host: without it, 0.38's clone lets the other pack's
    ``.add`` reach the upstream model (so the tests above can fail); 0.3.64's deep copy never did."""
    import comfy.patcher_extension as ext
    from support.comfy_models import tiny_sd15
    alone, _, _ = apply(host, ifmodel, tiny_sd15(), 1)
    assert alone.get_callbacks(ext.CallbacksMP.ON_CLONE, patch_mod.CLONE_KEY) == [patch_mod.isolate_hooks]
    alone.remove_callbacks_with_key(ext.CallbacksMP.ON_CLONE, patch_mod.CLONE_KEY)
    standin_apply(alone, StyleTokens())
    leaked = any(p.callback for p in attn2_patches(alone).values())
    assert leaked == (clone_rule == "0.38")


def test_a_clone_of_a_clone_keeps_its_own_hooks(host, ifmodel, patch_mod):
    """The callback travels with clones: A → B = clone(A) → C = clone(B); patching C reaches neither B nor A, and
    hooks on B that nobody patched stay B's (the twins share the rule and modules)."""
    from support.comfy_models import tiny_sd15
    a, _, _ = apply(host, ifmodel, tiny_sd15(), 1)
    b = a.clone()
    c = standin_apply(b, StyleTokens())
    for key, hook in attn2_patches(b).items():
        assert not hook.callback and hook is not attn2_patches(a)[key] and hook is not attn2_patches(c)[key]
        assert hook.state is attn2_patches(a)[key].state and hook.modules is attn2_patches(a)[key].modules
    assert all(not p.callback for p in attn2_patches(a).values())
    assert all(len(p.callback) == 1 for p in attn2_patches(c).values())


def test_unknown_replace_patch_is_replaced_with_a_warning_naming_the_block(host, ifmodel, patch_mod, caplog):
    from support.comfy_models import tiny_sd15
    model = tiny_sd15().clone()
    keys = block_keys(model)

    def opaque(q, k, v, extra_options):
        raise AssertionError("never called")
    model.set_model_attn2_replace(opaque, *keys[0])
    model.set_model_attn2_replace(opaque, *keys[-1], 0)
    with caplog.at_level(logging.WARNING):
        patched, _, _ = apply(host, ifmodel, model, 1)
    text = " ".join(r.getMessage() for r in caplog.records)
    assert str(keys[0]) in text and str((*keys[-1], 0)) in text and "opaque" in text
    assert set(attn2_patches(patched)) == set(keys)


def _locality(patch_mod, model, attention_fn=None, extra=None):
    """Whether changing identity 1 changes the cond rows only inside mask 1 (and never the uncond rows), in every
    UNet block, through the hook's default backend choice (or ``attention_fn``)."""
    from instantfamily_core.attention import MaskedCrossAttention
    from instantfamily_core.masks import resize_masks
    g = torch.Generator().manual_seed(5)
    masks = torch.zeros(2, 64, 64)
    masks[0, :, :24] = 1
    masks[1, 16:48, 20:56] = 1
    tokens, null = torch.randn(2, 50, 768, generator=g), torch.randn(50, 768, generator=g)
    changed = tokens.clone()
    changed[1] += 1.0
    inside = resize_masks(masks, (8, 8))[1].flatten() > 0

    def outputs(toks):
        state = patch_mod.InstantFamilyAttention(toks, null, MaskedCrossAttention(masks, 50), None, attention_fn)
        hook = patch_mod.Attn2Hook(state, patch_mod.attn2_modules(model.model.diffusion_model))
        res = {}
        for key in block_keys(model):
            q, k, v, opts = block_inputs(patch_mod, model, key)
            opts.update(extra or {})
            with torch.no_grad():
                res[key] = hook(q, k, v, opts)
        return res
    a, b = outputs(tokens), outputs(changed)
    return all(torch.equal((a[k] - b[k]).abs().amax(dim=2)[0] > 0, inside)
               and bool(((a[k] - b[k]).abs().amax(dim=2)[1] == 0).all()) for k in a)


def _ignoring(calls):
    import comfy.ldm.modules.attention as A

    def ignoring(q, k, v, heads, mask=None, **kwargs):
        calls.append(mask is not None)
        return A.attention_basic(q, k, v, heads)  # the mask is silently dropped, as sage's **kwargs do
    return ignoring


@pytest.mark.parametrize("backend", ["attention_sub_quad", "attention_pytorch", "attention_split", "attention_basic",
                                     "attention_sage", "attention_flash", "ignores masks"])
def test_masks_hold_whichever_attention_comfyui_selected(host, patch_mod, monkeypatch, backend):
    """The backend ComfyUI selected (sage and flash without their packages fall back inside ComfyUI; a stand-in
    that drops masks): identities stay inside their masks, and unmasked calls keep the selected backend."""
    from support.comfy_models import tiny_sd15
    import comfy.ldm.modules.attention as A
    calls = []
    selected = _ignoring(calls) if backend == "ignores masks" else getattr(A, backend)
    monkeypatch.setattr(A, "optimized_attention", selected)
    model = tiny_sd15()
    assert _locality(patch_mod, model)
    if backend == "ignores masks":
        assert not any(calls)  # it never got a masked call
        from instantfamily_core.attention import MaskedCrossAttention
        none = patch_mod.InstantFamilyAttention(torch.zeros(0, 50, 768), torch.zeros(50, 768),
                                                MaskedCrossAttention(torch.zeros(0, 8, 8), 50))
        hook = patch_mod.Attn2Hook(none, patch_mod.attn2_modules(model.model.diffusion_model))
        hook(*block_inputs(patch_mod, model, block_keys(model)[0]))
        assert calls == [False]  # unmasked calls keep the selected backend
        assert not _locality(patch_mod, model, attention_fn=lambda q, k, v, heads, mask=None: selected(
            q, k, v, heads, mask=mask))  # handing it the masked call does leak: the test can tell


def test_masks_hold_under_an_attention_override_that_drops_them(host, patch_mod):
    """Another pack's ``optimized_attention_override`` (transformer_options) may drop masks: masked calls run
    without it, unmasked ones keep it."""
    from support.comfy_models import tiny_sd15
    calls = []

    def override(func, q, k, v, heads, mask=None, **kwargs):
        calls.append(mask is not None)
        return func(q, k, v, heads, **{k: v for k, v in kwargs.items() if k != "transformer_options"})
    model = tiny_sd15()
    assert _locality(patch_mod, model, extra={"optimized_attention_override": override})
    assert not any(calls)  # no masked call went through it
    from instantfamily_core.attention import MaskedCrossAttention
    none = patch_mod.InstantFamilyAttention(torch.zeros(0, 50, 768), torch.zeros(50, 768),
                                            MaskedCrossAttention(torch.zeros(0, 8, 8), 50))
    hook = patch_mod.Attn2Hook(none, patch_mod.attn2_modules(model.model.diffusion_model))
    q, k, v, opts = block_inputs(patch_mod, model, block_keys(model)[0])
    hook(q, k, v, {**opts, "optimized_attention_override": override})
    assert calls == [False]  # unmasked calls keep it


@pytest.mark.parametrize("how", ["ConditioningSetArea", "ConditioningSetMask mask bounds"])
def test_area_conditioning_gets_each_rows_masks_cropped_to_its_area(host, ifmodel, patch_mod, how):
    """ComfyUI runs an area conditioning on a crop of the latent. The masks used there are the full masks cropped
    to the same area, in the UNet and in the ControlNet; whole-latent calls use them whole."""
    from support.comfy_models import tiny_sd15
    nodes, _, m = host
    model = tiny_sd15()
    if how == "ConditioningSetArea":
        right_half = nodes.ConditioningSetArea().append(cond(3), 64, 128, 64, 0, 1.0)[0]
    else:
        region = torch.zeros(1, 128, 128)
        region[:, :, 64:] = 1.0
        right_half = nodes.ConditioningSetMask().append(cond(3), region, "mask bounds", 1.0)[0]
    positive = nodes.ConditioningCombine().combine(cond(1), right_half)[0]
    patched, pos, neg = apply(host, ifmodel, model, 2, positive=positive)
    state = attn2_patches(patched)[block_keys(model)[0]].state
    full = state.masks
    used = []
    original = patch_mod.InstantFamilyAttention.attention_for

    def recording(self, extra_options, rows):
        attention = original(self, extra_options, rows)
        used.append((tuple(extra_options["original_shape"][-2:]), attention.masks))
        return attention
    patch_mod.InstantFamilyAttention.attention_for = recording
    try:
        out = sample(nodes, patched, pos, neg, steps=1, size=16)
    finally:
        patch_mod.InstantFamilyAttention.attention_for = original
    assert torch.isfinite(out).all()
    cropped = [masks for shape, masks in used if shape == (16, 8)]
    whole = [masks for shape, masks in used if shape == (16, 16)]
    assert cropped and whole
    expected = full[..., :, 64:128]
    for masks in cropped:
        # two rows: the area conditioning and the uncond copy ComfyUI makes for the same area
        assert masks.shape == (2, *expected.shape)
        assert all(torch.equal(row, expected) for row in masks)
    assert all(masks is full for masks in whole)
    n_unet = len(block_keys(model))
    assert len(cropped) > n_unet  # UNet blocks and the ControlNet's


def test_a_crop_of_unknown_area_is_refused(host, ifmodel, patch_mod):
    from instantfamily_core.errors import MaskError
    from support.comfy_models import tiny_sd15
    model = tiny_sd15()
    patched, _, _ = apply(host, ifmodel, model, 1)
    key = block_keys(model)[0]
    q, k, v, opts = block_inputs(patch_mod, model, key)
    opts["original_shape"] = [2, 4, 16, 8]
    opts["uuids"] = ["a", "b"]
    opts[patch_mod.REGIONS_KEY] = {"latent_hw": (16, 16), "areas": {"a": (16, 8, 0, 8)}}  # b: unknown
    with pytest.raises(MaskError, match="area conditioning"):
        attn2_patches(patched)[key](q, k, v, opts)


def test_the_regions_wrapper_runs_once_per_model_call_however_many_applies(host, ifmodel, patch_mod, monkeypatch):
    """Chained applies (InstantFamily twice, with another pack between) register one wrapper; sampling runs it
    as often as for a single apply."""
    import comfy.patcher_extension as ext
    from support.comfy_models import tiny_sd15
    nodes, _, _ = host
    model = tiny_sd15()
    single, pos, neg = apply(host, ifmodel, model, 1)
    chained, _, _ = apply(host, ifmodel, standin_apply(apply(host, ifmodel, model, 1)[0], StyleTokens()), 1)
    for m in (single, chained):
        assert m.get_wrappers(ext.WrappersMP.CALC_COND_BATCH, patch_mod.WRAPPER_KEY) == [patch_mod.regions_wrapper]
    calls = []
    original = patch_mod.ModelCall.__init__
    monkeypatch.setattr(patch_mod.ModelCall, "__init__", lambda self, *a: calls.append(1) or original(self, *a))
    sample(nodes, single, pos, neg, steps=2)
    once = len(calls)
    calls.clear()
    sample(nodes, chained, pos, neg, steps=2)
    assert once >= 2 and len(calls) == once
