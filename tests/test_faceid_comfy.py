"""Public-weights mode inside the real ComfyUI host: the FaceID processor index → block mapping and widths checked
against ComfyUI's live full-size SD1.5 UNet, the embedded LoRA through ComfyUI's own LoRA machinery, and the
Apply node's attn2 rule (middle block included) against explicit reference math written here."""

from __future__ import annotations

import sys

import pytest
import torch

from support import faceid_files as ff
from test_faceid_core import ref_attention
from tools.devkit.comfy_host import HOW_TO_PROVIDE, find_comfyui
from tools.devkit.identities import random_identities

pytestmark = [pytest.mark.skipif(find_comfyui() is None, reason=HOW_TO_PROVIDE),
              pytest.mark.usefixtures("clone_rule")]  # every test under 0.3.64's and 0.38's clone()

DIFFUSERS_ORDER = ([f"down_blocks.{l}.attentions.{i}" for l in range(3) for i in range(2)]
                   + [f"up_blocks.{l}.attentions.{i}" for l in (1, 2, 3) for i in range(3)] + ["mid_block.attentions.0"])


@pytest.fixture(scope="module")
def host():
    from tools.devkit.comfy_host import import_host, load_pack
    nodes = import_host()
    pack = load_pack()
    mods = {m: sys.modules[f"{pack.__name__}.nodes.{m}"] for m in ("patch", "faceid_nodes", "faceid_patch")}
    return nodes, pack, mods


@pytest.fixture(scope="module")
def sd15(host):
    return ff.meta_sd15()


@pytest.fixture(scope="module")
def faceid(host, tmp_path_factory):
    _, _, m = host
    path = tmp_path_factory.mktemp("ipadapter") / "ip-adapter-faceid_sd15.bin"
    ff.write_bin(path, ff.faceid_parts("faceid"))
    return m["faceid_nodes"].load_faceid_model(str(path), "auto (file name)", m["faceid_nodes"].EMBEDDED_LORA)


def test_processor_index_maps_to_the_live_sd15_blocks_and_widths(host, sd15):
    import comfy.utils
    from instantfamily_core.faceid import SD15
    _, _, m = host
    live = m["patch"].attn2_modules(sd15.model.diffusion_model)
    assert len(live) == 16 and ("middle", 0, 0) in live
    to_ldm = comfy.utils.unet_to_diffusers(ff.SD15_UNET)  # ComfyUI's own diffusers → ldm key map
    kip = ff.ip_adapter(lora=False)
    for b, path in enumerate(DIFFUSERS_ORDER):  # diffusers' processor order: p = 2b (attn1), 2b + 1 (attn2)
        ldm = to_ldm[f"{path}.transformer_blocks.0.attn2.to_k.weight"]  # e.g. input_blocks.4.1.transformer_…
        parts = ldm.split(".")
        block = ("middle", 0) if parts[0] == "middle_block" else (parts[0].split("_")[0], int(parts[1]))
        slot = SD15.slot(block + (0,))
        assert slot is not None and slot.attn2 == 2 * b + 1 and slot.diffusers == path + ".transformer_blocks.0", \
            (path, block)
        attn = live[block + (0,)]
        assert attn.to_k.weight.shape[0] == kip[f"{2 * b + 1}.to_k_ip.weight"].shape[0] == slot.hidden
        assert attn.to_k.weight.shape[1] == 768
    assert {s.block for s in SD15.slots} == set(live)
    assert m["patch"].live_topology(sd15) is SD15  # the topology read from the live model is the published one


def test_embedded_lora_through_comfy_is_w_plus_up_down_at_strength_one(host, sd15, faceid):
    import comfy.lora
    import comfy.sd
    parts = ff.faceid_parts("faceid")
    patched = comfy.sd.load_lora_for_models(sd15, None, faceid.lora, 1.0, 0)[0]
    assert len(patched.patches) == 128  # 32 attentions × q, k, v, out — every attention of the UNet
    assert all(k.startswith("diffusion_model.") and ".attn" in k for k in patched.patches)
    to_ldm = comfy.utils.unet_to_diffusers(ff.SD15_UNET)
    g = torch.Generator().manual_seed(3)
    for p in (0, 5, 17, 30, 31):  # attn1/attn2 in input, output and middle blocks
        path = f"{DIFFUSERS_ORDER[p // 2]}.transformer_blocks.0.attn{1 + p % 2}"
        for t, suffix in (("to_q", "to_q"), ("to_k", "to_k"), ("to_v", "to_v"), ("to_out", "to_out.0")):
            key = "diffusion_model." + to_ldm[f"{path}.{suffix}.weight"]
            shape = sd15.model.state_dict()[key].shape
            w = torch.randn(shape, generator=g)
            got = comfy.lora.calculate_weight(patched.patches[key], w.clone(), key)
            up = parts[1][f"{p}.{t}_lora.up.weight"].float()
            down = parts[1][f"{p}.{t}_lora.down.weight"].float()
            torch.testing.assert_close(got, w + up @ down, atol=1e-4, rtol=1e-4)
    kohya = comfy.sd.load_lora_for_models(sd15, None, ff.kohya_lora(parts), 1.0, 0)[0]  # companion file naming
    assert set(kohya.patches) == set(patched.patches)


def _ids(n, seed=0, pack="buffalo_l"):
    return random_identities(n, seed, face_pack=pack)


def halves(n, h=64, w=64):
    """n vertical stripes (disjoint) plus nothing in the top 16 rows."""
    masks = torch.zeros(n, h, w)
    for i in range(n):
        masks[i, 16:, i * w // n:(i + 1) * w // n] = 1
    return masks


def apply(host, sd15, faceid, ids, masks, **kw):
    _, _, m = host
    args = dict(weight=1.0, identity_weights="", lora_strength=1.0, start_at=0.0, end_at=1.0, s_scale=1.0)
    args.update(kw)
    return m["faceid_nodes"].ApplyFaceID().apply(sd15, faceid, ids, masks, **args)[0]


def call(hook, q, k, v, block, hw, cond_or_uncond=(0,), heads=8):
    sample_sigmas = torch.tensor([14.6, 1.0, 0.0])
    opts = {"block": block[:2], "block_index": 0, "n_heads": heads, "activations_shape": [q.shape[0], q.shape[2],
            *hw], "cond_or_uncond": list(cond_or_uncond), "sigmas": torch.tensor([5.0]), "sample_sigmas": sample_sigmas,
            "original_shape": [q.shape[0], 4, 8, 8]}
    return hook(q, k, v, opts)


def test_apply_patches_all_16_blocks_incl_middle_and_matches_reference(host, sd15, faceid):
    from instantfamily_core.faceid import SD15
    ids = _ids(2)
    model = apply(host, sd15, faceid, ids, halves(2), identity_weights="1.0, 0.5")
    replace = model.model_options["transformer_options"]["patches_replace"]["attn2"]
    assert set(replace) == {s[:2] for s in host[2]["patch"].attn2_modules(sd15.model.diffusion_model)}
    assert ("middle", 0) in replace
    rule = replace[("middle", 0)].callback[-1]
    assert all(rule in h.callback for h in replace.values())
    g = torch.Generator().manual_seed(0)
    for block, hw in ((("middle", 0), (8, 8)), (("input", 1), (8, 8)), (("output", 7), (4, 4))):
        c = SD15.slot(block).hidden
        q = torch.randn(2, hw[0] * hw[1], c, generator=g)
        k, v = torch.randn(2, 77, c, generator=g), torch.randn(2, 77, c, generator=g)
        got = call(replace[block], q, k, v, block, hw, cond_or_uncond=(1, 0)).double()  # row 0 uncond, row 1 cond
        p = SD15.slot(block).attn2
        wk, wv = (w.float() for w in faceid.weights.kv_weights(p))
        text = ref_attention(q, k, v, 8)
        for row, toks in ((0, rule.null_tokens), (1, rule.tokens)):
            want = text[row].clone()
            for n, weight in enumerate((1.0, 0.5)):
                inside = torch.zeros(hw)
                inside[hw[0] // 4:, n * hw[1] // 2:(n + 1) * hw[1] // 2] = weight
                term = ref_attention(q[row:row + 1], toks[n][None] @ wk.T, toks[n][None] @ wv.T, 8)[0]
                want += inside.flatten()[:, None].double() * term
            torch.testing.assert_close(got[row], want, atol=2e-4, rtol=1e-4)
        top = torch.arange(hw[0] * hw[1]) < hw[0] // 4 * hw[1]  # no mask there: text attention only
        torch.testing.assert_close(got[:, top], text[:, top], atol=1e-5, rtol=1e-5)


def test_swapping_identities_swaps_regions_and_no_identity_outside_masks(host, sd15, faceid):
    ids = _ids(2, seed=4)
    masks = halves(2)
    a = apply(host, sd15, faceid, ids, masks)
    b = apply(host, sd15, faceid, ids[::-1], masks.flip(0))
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 64, 1280, generator=g)
    k, v = torch.randn(1, 77, 1280, generator=g), torch.randn(1, 77, 1280, generator=g)
    blk = ("middle", 0)
    oa = call(a.model_options["transformer_options"]["patches_replace"]["attn2"][blk], q, k, v, blk, (8, 8))
    ob = call(b.model_options["transformer_options"]["patches_replace"]["attn2"][blk], q, k, v, blk, (8, 8))
    torch.testing.assert_close(oa, ob, atol=1e-5, rtol=1e-5)
    solo = apply(host, sd15, faceid, ids[:1], masks[:1])
    os_ = call(solo.model_options["transformer_options"]["patches_replace"]["attn2"][blk], q, k, v, blk, (8, 8))
    left = torch.zeros(8, 8, dtype=torch.bool)
    left[:, :4] = True
    torch.testing.assert_close(oa[:, left.flatten()], os_[:, left.flatten()], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(oa[:, ~left.flatten()], os_[:, ~left.flatten()], atol=1e-3)


def test_outside_start_end_is_plain_attention_and_lora_strength_zero_adds_no_patches(host, sd15, faceid):
    ids = _ids(1)
    model = apply(host, sd15, faceid, ids, halves(1), start_at=0.9, end_at=1.0, lora_strength=0.0)
    assert not model.patches
    hook = model.model_options["transformer_options"]["patches_replace"]["attn2"][("middle", 0)]
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, n, 1280, generator=g) for n in (64, 77, 77))
    got = call(hook, q, k, v, ("middle", 0), (8, 8))  # sigma 5.0: not in the last 10 % of the schedule
    torch.testing.assert_close(got.double(), ref_attention(q, k, v, 8), atol=1e-5, rtol=1e-5)


def test_bad_inputs_are_typed_errors(host, sd15, faceid, tmp_path):
    from instantfamily_core.errors import BaseModelError, EmbeddingError, IdentityCountError, MaskError
    from support.comfy_models import tiny_sd15
    with pytest.raises(BaseModelError, match=r"ip-adapter-faceid_sd15.bin is a FaceID file for SD1.5 \(16 "
                                             r"cross-attentions at 320/640/1280, 768-d text\), but the model is a "
                                             r"non-standard SD1.5 UNet \(7 cross-attentions at 32/64, .*full SD1.5 UNet"):
        apply(host, tiny_sd15(), faceid, _ids(1), halves(1))
    with pytest.raises(MaskError):
        apply(host, sd15, faceid, _ids(2), halves(1))
    with pytest.raises(IdentityCountError, match="empty"):
        apply(host, sd15, faceid, [], halves(1))
    _, _, m = host
    ff.write_bin(tmp_path / "ip-adapter-faceid-plusv2_sd15.bin", ff.faceid_parts("plus"))
    plus = m["faceid_nodes"].load_faceid_model(str(tmp_path / "ip-adapter-faceid-plusv2_sd15.bin"), "auto (file name)",
                                               m["faceid_nodes"].EMBEDDED_LORA)
    assert plus.weights.variant == "plusv2"
    with pytest.raises(EmbeddingError, match="clip_vision: .*ViT-H"):
        apply(host, sd15, plus, _ids(1), halves(1))


def test_a_pack_other_than_buffalo_l_is_warned_about(host, sd15, faceid, caplog):
    with caplog.at_level("WARNING"):
        apply(host, sd15, faceid, _ids(1, pack="antelopev2"), halves(1))
    assert "antelopev2" in caplog.text and "buffalo_l" in caplog.text


def test_a_skipped_identity_keeps_its_slot_and_acts_nowhere(host, sd15, faceid):
    from instantfamily_core.identity import SkippedIdentity
    ids = _ids(2, seed=6)
    masks = halves(2)
    both = apply(host, sd15, faceid, [ids[0], SkippedIdentity("p1")], masks)
    solo = apply(host, sd15, faceid, ids[:1], masks[:1])
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, n, 1280, generator=g) for n in (64, 77, 77))
    blk = ("middle", 0)
    get = lambda m: call(m.model_options["transformer_options"]["patches_replace"]["attn2"][blk], q, k, v, blk,  # noqa
                         (8, 8))
    torch.testing.assert_close(get(both), get(solo), atol=1e-5, rtol=1e-5)  # right half: text only in both


@pytest.fixture(scope="module")
def clip_vision_h2(host, tmp_path_factory):
    """ComfyUI's own CLIP_VISION object with ViT-H's width (1280, 257 tokens at 224 px) but 2 layers, random."""
    import json
    import comfy.clip_vision
    from support.comfy_models import randomise
    cfg = json.loads((find_comfyui() / "comfy" / "clip_vision_config_h.json").read_text())
    cfg["num_hidden_layers"] = 2
    path = tmp_path_factory.mktemp("clipvision") / "vit_h_2layers.json"
    path.write_text(json.dumps(cfg))
    cv = comfy.clip_vision.ClipVisionModel(str(path))
    randomise(cv.model, 9, std=0.02)
    return cv


def test_plus_v2_through_comfys_clip_vision_uses_rgb_crops_and_zero_pixel_uncond(host, sd15, tmp_path, clip_vision_h2):
    import numpy as np
    from instantfamily_core.faceid import person_tokens
    from instantfamily_core.identity import IdentityFeatures
    _, _, m = host
    ff.write_bin(tmp_path / "ip-adapter-faceid-plusv2_sd15.bin", ff.faceid_parts("plus"))
    plus = m["faceid_nodes"].load_faceid_model(str(tmp_path / "ip-adapter-faceid-plusv2_sd15.bin"),
                                               "auto (file name)", m["faceid_nodes"].EMBEDDED_LORA)
    g = np.random.default_rng(0)
    crops = [g.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(2)]
    base = _ids(1)[0]
    ident = IdentityFeatures(base.global_embedding, base.local_map, name="ann", face_pack="buffalo_l",
                             extra={"faceid_embeddings": [base.global_embedding], "faceid_crops": crops})
    model = apply(host, sd15, plus, [ident], halves(1), clip_vision=clip_vision_h2, s_scale=0.8)
    rule = model.model_options["transformer_options"]["patches_replace"]["attn2"][("middle", 0)].callback[-1]
    with torch.no_grad():  # independent path: normalise by hand (CLIP mean/std), call the vision model directly
        mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
        std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
        px = torch.stack([torch.from_numpy(c).permute(2, 0, 1).float() / 255 for c in crops])
        hid = clip_vision_h2.model(pixel_values=(px - mean) / std, intermediate_output=-2)[1].float()
        zero = clip_vision_h2.model(pixel_values=torch.zeros(1, 3, 224, 224), intermediate_output=-2)[1].float()
    assert hid.shape == (2, 257, 1280)
    want, want_u = person_tokens(plus.projection, "plusv2", "ann", base.global_embedding,
                                 torch.cat([hid.mean(0, keepdim=True), zero]), 0.8)
    torch.testing.assert_close(rule.tokens[0], want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rule.null_tokens[0], want_u, atol=1e-4, rtol=1e-4)
    black = clip_vision_h2.encode_image(torch.zeros(1, 224, 224, 3)).penultimate_hidden_states.float()
    assert not torch.allclose(black, zero, atol=1e-3)  # a black image is not the reference's uncond input


def test_both_modes_share_one_hook_per_block_in_either_order(host, sd15, faceid, tmp_path):
    from support.comfy_models import write_tiny_checkpoint
    nodes, pack, _ = host
    mn = sys.modules[f"{pack.__name__}.nodes.model_nodes"]
    write_tiny_checkpoint(tmp_path / "if.safetensors")
    ifmodel = mn.load_instantfamily(str(tmp_path / "if.safetensors"))
    ids = _ids(2)
    cond = [[torch.zeros(1, 77, 768), {}]]

    def instantfamily(model):
        return mn.ApplyInstantFamily().apply(model, ifmodel, ids, torch.zeros(1, 64, 64, 3), halves(2), cond, cond,
                                             1.0, "", 0.0, 0.0, 1.0, "checkpoint")[0]
    import comfy.patcher_extension as ext
    patch = host[2]["patch"]
    for model in (apply(host, instantfamily(sd15), faceid, ids, halves(2)),
                  instantfamily(apply(host, sd15, faceid, ids, halves(2)))):
        replace = model.model_options["transformer_options"]["patches_replace"]["attn2"]
        assert len(replace) == 16 and all(len(k) == 2 for k in replace)
        for hook in replace.values():
            assert hook.state is not None  # InstantFamily's joint attention as the base rule …
            assert [type(c).__name__ for c in hook.callback] == ["FaceIDRule"]  # … plus the FaceID term
    # one regions wrapper and one clone callback per model, however many rules are chained, in every order
    chains = {"if→faceid": apply(host, instantfamily(sd15), faceid, ids, halves(2)),
              "faceid→if": instantfamily(apply(host, sd15, faceid, ids, halves(2))),
              "if→faceid→if→faceid": apply(host, instantfamily(apply(host, instantfamily(sd15), faceid, ids,
                                                                        halves(2))), faceid, ids, halves(2)),
              "faceid→faceid": apply(host, apply(host, sd15, faceid, ids, halves(2)), faceid, ids, halves(2))}
    for name, model in chains.items():
        assert model.get_wrappers(ext.WrappersMP.CALC_COND_BATCH, patch.WRAPPER_KEY) == [patch.regions_wrapper], name
        assert len(model.get_all_wrappers(ext.WrappersMP.CALC_COND_BATCH)) == 1, name
        assert model.get_all_callbacks(ext.CallbacksMP.ON_CLONE) == [patch.isolate_hooks], name
    assert not sd15.get_all_wrappers(ext.WrappersMP.CALC_COND_BATCH)  # the input model is never touched
