"""FaceID on SDXL inside the real ComfyUI host.

* The topology read from ComfyUI's live full-size SDXL UNet (meta device) is the published one: all 70
  cross-attentions, widths, heads and each one's FaceID processor index p, checked against ComfyUI's own
  diffusers → ldm key map and diffusers' processor order (down, up, mid), and against the index table of the
  sdxl-weights note (p = 2·k + 1; middle block 121…139).
* The embedded rank-128 LoRA of ``ip-adapter-faceid_sdxl.bin`` through ComfyUI's LoRA machinery: 560 patches (140
  attentions × q, k, v, out) equal to W + up·down.
* On a reduced SDXL topology (``tiny_sdxl``: cross-attentions at SDXL's places, several transformers per block,
  2048-d text): N = 1 with a full mask equals the reference FaceID SDXL formula written out here in every
  transformer of every block, middle included; disjoint masks keep each identity inside its mask; swapping
  identities swaps regions; masks follow each block's real size at SDXL resolutions; another pack's callbacks
  act beside the FaceID term in both orders; a file of the other base is refused naming both.
"""

from __future__ import annotations

import sys

import pytest
import torch

from support import faceid_files as ff
from support import sdxl_files as sx
from test_faceid_core import ref_attention
from tools.devkit.comfy_host import HOW_TO_PROVIDE, find_comfyui
from tools.devkit.identities import random_identities

pytestmark = pytest.mark.skipif(find_comfyui() is None, reason=HOW_TO_PROVIDE)
BOTH_CLONE_RULES = pytest.mark.usefixtures("clone_rule")  # under 0.3.64's and 0.38's clone()


@pytest.fixture(scope="module")
def host():
    from tools.devkit.comfy_host import import_host, load_pack
    import_host()
    pack = load_pack()
    return {m: sys.modules[f"{pack.__name__}.nodes.{m}"] for m in ("patch", "faceid_nodes", "faceid_patch")}


@pytest.fixture(scope="module")
def meta(host):
    return sx.meta_sdxl()


@pytest.fixture(scope="module")
def tiny(host):
    return sx.tiny_sdxl(0)


def _tiny_faceid(host, tiny, variant="faceid", seed=0, unet_config=None):
    """A FaceID model for the reduced topology of ``tiny`` (UNet config ``unet_config``, default the tiny SDXL's):
    file parts by diffusers' order and ComfyUI's key map, validated against the topology read from the live model."""
    from instantfamily_core.faceid import validate
    m = host
    shapes = {k: v.shape for k, v in tiny.model.diffusion_model.state_dict().items()}
    unet_config = unet_config or sx.TINY_SDXL_UNET
    widths = ff.diffusers_block_widths(unet_config, shapes)
    image_proj, ip = ff.reduced_parts(widths, variant, seed, unet_config["context_dim"])
    weights = validate(image_proj, ip, "ip-adapter-faceid_tiny_sdxl.bin", topology=m["patch"].live_topology(tiny))
    return m["faceid_nodes"].FaceIDModel(weights, {}, "")


def _apply(host, model, faceid, ids, masks, **kw):
    args = dict(weight=1.0, identity_weights="", lora_strength=1.0, start_at=0.0, end_at=1.0, s_scale=1.0)
    args.update(kw)
    return host["faceid_nodes"].ApplyFaceID().apply(model, faceid, ids, masks, **args)[0]


def _call(hook, q, k, v, key, hw, heads, cond_or_uncond=(0,)):
    opts = {"block": key[:2], "block_index": key[2], "n_heads": heads,
            "activations_shape": [q.shape[0], q.shape[2], *hw], "cond_or_uncond": list(cond_or_uncond),
            "sigmas": torch.tensor([5.0]), "sample_sigmas": torch.tensor([14.6, 1.0, 0.0]),
            "original_shape": [q.shape[0], 4, hw[0], hw[1]]}
    return hook(q, k, v, opts)


def _replace(model):
    return model.model_options["transformer_options"]["patches_replace"]["attn2"]


# -- the full-size topology ----------------------------------------------------------------------------------------

def test_topology_read_from_the_live_sdxl_unet_is_the_published_one(host, meta):
    import comfy.utils
    from instantfamily_core.faceid import SDXL
    live = host["patch"].attn2_modules(meta.model.diffusion_model)
    assert len(live) == 70 and {("middle", 0, j) for j in range(10)} <= set(live)
    assert host["patch"].live_topology(meta) is SDXL
    to_ldm = comfy.utils.unet_to_diffusers(sx.SDXL_UNET)  # ComfyUI's own diffusers → ldm key map
    group = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}
    diffusers_order = sorted({k[:-len(".attn2.to_k.weight")] for k in to_ldm if k.endswith(".attn2.to_k.weight")},
                             key=lambda p: (group[p.split(".")[0]],) + tuple(int(x) for x in p.split(".") if x.isdigit()))
    assert len(diffusers_order) == 70
    modules = dict(meta.model.diffusion_model.named_modules())
    for b, path in enumerate(diffusers_order):
        slot = SDXL.slots[b]
        assert slot.diffusers == path and slot.attn2 == 2 * b + 1
        ldm = to_ldm[f"{path}.attn2.to_k.weight"][:-len(".to_k.weight")]
        attn = live[slot.block]
        assert modules[ldm] is attn, (path, slot.block)
        assert (attn.to_q.weight.shape[0], attn.heads, attn.to_k.weight.shape[1]) == (slot.hidden, slot.heads, 2048)
    # the note's index table (p = 2·k + 1 over input 4, 5, 7, 8, output 0…5, middle)
    table = {("input", 4, 0): 1, ("input", 5, 1): 7, ("input", 7, 0): 9, ("input", 8, 9): 47,
             ("output", 0, 0): 49, ("output", 2, 9): 107, ("output", 3, 0): 109, ("output", 5, 1): 119,
             ("middle", 0, 0): 121, ("middle", 0, 9): 139}
    assert {k: SDXL.slot(k).attn2 for k in table} == table
    widths = {k: SDXL.slot(k).hidden for k in (("input", 4, 0), ("input", 7, 0), ("middle", 0, 5), ("output", 4, 1))}
    assert widths == {("input", 4, 0): 640, ("input", 7, 0): 1280, ("middle", 0, 5): 1280, ("output", 4, 1): 640}


def test_sdxl_lora_through_comfy_is_w_plus_up_down_on_all_140_attentions(host, meta, tmp_path):
    import comfy.lora
    import comfy.utils
    from instantfamily_core.faceid import SDXL
    parts = ff.faceid_parts("sdxl")
    ff.write_bin(tmp_path / "ip-adapter-faceid_sdxl.bin", parts)
    faceid = host["faceid_nodes"].load_faceid_model(str(tmp_path / "ip-adapter-faceid_sdxl.bin"), "auto (file name)",
                                                    host["faceid_nodes"].EMBEDDED_LORA)
    assert faceid.weights.base == "SDXL" and len(faceid.lora) == 1120
    patched = host["faceid_nodes"].apply_lora(meta, faceid.lora, 1.0, "embedded")
    assert len(patched.patches) == 560 and not meta.patches  # 140 attentions × q, k, v, out; the input untouched
    assert all(k.startswith("diffusion_model.") and ".attn" in k for k in patched.patches)
    to_ldm = comfy.utils.unet_to_diffusers(sx.SDXL_UNET)
    sd = meta.model.state_dict()
    g = torch.Generator().manual_seed(3)
    for p in (0, 3, 46, 108, 119, 120, 139):  # attn1/attn2 in input, output and middle blocks
        path = SDXL.slots[p // 2].attention_path(1 + p % 2)
        for t, suffix in (("to_q", "to_q"), ("to_k", "to_k"), ("to_v", "to_v"), ("to_out", "to_out.0")):
            key = "diffusion_model." + to_ldm[f"{path}.{suffix}.weight"]
            w = torch.randn(sd[key].shape, generator=g)
            got = comfy.lora.calculate_weight(patched.patches[key], w.clone(), key)
            up, down = parts[1][f"{p}.{t}_lora.up.weight"].float(), parts[1][f"{p}.{t}_lora.down.weight"].float()
            torch.testing.assert_close(got, w + up @ down, atol=1e-4, rtol=1e-4)


def test_a_file_of_the_other_base_is_refused_naming_both(host, meta, tmp_path):
    from instantfamily_core.errors import BaseModelError
    m = host["faceid_nodes"]
    ff.write_bin(tmp_path / "ip-adapter-faceid_sd15.bin", ff.faceid_parts("faceid"))
    sd15_file = m.load_faceid_model(str(tmp_path / "ip-adapter-faceid_sd15.bin"), "auto (file name)", m.NO_LORA)
    with pytest.raises(BaseModelError, match=r"ip-adapter-faceid_sd15.bin is a FaceID file for SD1.5 .*but the "
                                             r"model is SDXL \(70 cross-attentions.*use a SDXL file"):
        _apply(host, meta, sd15_file, random_identities(1, 0), torch.ones(1, 64, 64))
    ff.write_bin(tmp_path / "ip-adapter-faceid_sdxl.bin", ff.faceid_parts("sdxl-nolora"))
    sdxl_file = m.load_faceid_model(str(tmp_path / "ip-adapter-faceid_sdxl.bin"), "auto (file name)", m.NO_LORA)
    with pytest.raises(BaseModelError, match=r"ip-adapter-faceid_sdxl.bin is a FaceID file for SDXL .*but the "
                                             r"model is SD1.5 \(16 cross-attentions"):
        _apply(host, ff.meta_sd15(), sdxl_file, random_identities(1, 0), torch.ones(1, 64, 64))


# -- the rule on a reduced SDXL topology ---------------------------------------------------------------------------

@BOTH_CLONE_RULES
def test_one_person_full_mask_is_the_reference_faceid_sdxl_formula_in_every_transformer(host, tiny):
    faceid = _tiny_faceid(host, tiny)
    ids = random_identities(1, 0)
    model = _apply(host, tiny, faceid, ids, torch.ones(1, 32, 32), weight=0.7)
    replace = _replace(model)
    live = host["patch"].attn2_modules(tiny.model.diffusion_model)
    assert set(replace) == {k[:2] for k in live} and ("middle", 0) in replace
    rule = replace[("middle", 0)].callback[-1]
    g = torch.Generator().manual_seed(0)
    for key, attn in live.items():  # every transformer of every block, middle included
        slot = rule.topology.slot(key)
        c, heads, hw = attn.to_q.weight.shape[0], attn.heads, (4, 4)
        q = torch.randn(2, 16, c, generator=g)
        k, v = torch.randn(2, 77, c, generator=g), torch.randn(2, 77, c, generator=g)
        got = _call(replace[key[:2]], q, k, v, key, hw, heads, cond_or_uncond=(1, 0)).double()
        wk, wv = (w.float() for w in faceid.weights.kv_weights(slot.attn2))
        text = ref_attention(q, k, v, heads)
        for row, toks in ((0, rule.null_tokens[0]), (1, rule.tokens[0])):
            # IPAttnProcessor: text attention + scale · softmax(q (W_k T)ᵀ/√d) (W_v T), separate softmax
            want = text[row] + 0.7 * ref_attention(q[row:row + 1], toks[None] @ wk.T, toks[None] @ wv.T, heads)[0]
            torch.testing.assert_close(got[row], want, atol=2e-4, rtol=2e-4)


def _halves(n, h=32, w=32):
    masks = torch.zeros(n, h, w)
    for i in range(n):
        masks[i, :, i * w // n:(i + 1) * w // n] = 1
    return masks


@BOTH_CLONE_RULES
def identities_stay_in_their_masks(host, tiny, apply_ids, ids) -> None:
    """``apply_ids(model, identities, masks) -> patched model`` with two people in the left/right halves, in
    blocks across SDXL's levels (middle included): person 1 acts only in the left half (the right half is the
    text attention when person 1 is alone), person 2 changes the right half, and swapping the people swaps what
    each half gets."""
    live = host["patch"].attn2_modules(tiny.model.diffusion_model)
    g = torch.Generator().manual_seed(1)
    masks = _halves(2)
    ab = _replace(apply_ids(tiny, ids, masks))
    ba = _replace(apply_ids(tiny, ids[::-1], masks))
    only_a = _replace(apply_ids(tiny, ids[:1], masks[:1]))
    only_b = _replace(apply_ids(tiny, ids[1:], masks[:1]))
    for key in (("input", 4, 1), ("middle", 0, 2), ("output", 1, 0), ("output", 5, 1)):
        attn = live[key]
        c, heads, hw = attn.to_q.weight.shape[0], attn.heads, (8, 8)
        q = torch.randn(1, 64, c, generator=g)
        k, v = torch.randn(1, 77, c, generator=g), torch.randn(1, 77, c, generator=g)
        text = ref_attention(q, k, v, heads)[0]
        left = torch.zeros(8, 8, dtype=torch.bool)
        left[:, :4] = True
        left = left.flatten()
        out_ab = _call(ab[key[:2]], q, k, v, key, hw, heads)[0].double()
        out_a = _call(only_a[key[:2]], q, k, v, key, hw, heads)[0].double()
        out_ba = _call(ba[key[:2]], q, k, v, key, hw, heads)[0].double()
        # identity 1 only inside its mask (left half), identity 2 only inside the right half
        torch.testing.assert_close(out_ab[left], out_a[left], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out_a[~left], text[~left], atol=1e-5, rtol=1e-5)
        assert (out_ab[~left] - text[~left]).abs().max() > 1e-3
        # swapping the identities swaps what each half gets
        swapped_left = _call(only_b[key[:2]], q, k, v, key, hw, heads)[0].double()
        torch.testing.assert_close(out_ba[left], swapped_left[left], atol=1e-5, rtol=1e-5)
        assert (out_ba[left] - out_ab[left]).abs().max() > 1e-3


def test_disjoint_masks_keep_each_identity_inside_its_mask_and_swapping_swaps_regions(host, tiny):
    faceid = _tiny_faceid(host, tiny)
    identities_stay_in_their_masks(host, tiny, lambda m, ids, masks: _apply(host, m, faceid, ids, masks),
                                   random_identities(2, 1))


@pytest.mark.parametrize("width, height", [(1024, 1024), (1216, 832), (832, 1216)])
def test_masks_follow_each_blocks_real_size_at_sdxl_resolutions(host, tiny, width, height):
    """A real ComfyUI sampling step of the reduced SDXL model at SDXL resolutions: at every block's feature size
    the region of identity 1 is exactly the left half, of identity 2 the right half, and nothing else."""
    import comfy.sample
    faceid = _tiny_faceid(host, tiny)
    model = _apply(host, tiny, faceid, random_identities(2, 2), _halves(2, height // 8, width // 8))
    rule = _replace(model)[("middle", 0)].callback[-1]
    seen = {}
    original = rule.region

    def spy(extra_options, rows, hw):
        r = original(extra_options, rows, hw)
        seen[(extra_options["block"][0], hw)] = r
        return r
    rule.region = spy
    lh, lw = height // 8, width // 8
    cond = [[torch.randn(1, 77, 2048), {"pooled_output": torch.randn(1, 1280)}]]
    neg = [[torch.zeros(1, 77, 2048), {"pooled_output": torch.zeros(1, 1280)}]]
    comfy.sample.sample(model, torch.randn(1, 4, lh, lw), 1, 5.0, "euler", "normal", cond, neg,
                        torch.zeros(1, 4, lh, lw), disable_pbar=True, seed=0)
    sizes = {hw for _, hw in seen}
    assert sizes == {(lh // 2, lw // 2), (lh // 4, lw // 4)}  # SDXL's attention levels: 1/2 and 1/4 of the latent
    assert ("middle", (lh // 4, lw // 4)) in seen
    for (_, (h, w)), region in seen.items():
        grid = region[0].reshape(h, w, 2)
        left = torch.arange(w) < w // 2
        assert (grid[:, left, 0] == 1).all() and (grid[:, ~left, 0] == 0).all()
        assert (grid[:, ~left, 1] == 1).all() and (grid[:, left, 1] == 0).all()


def other_pack_acts_beside(host, tiny, apply_ours, order: str) -> None:
    """``apply_ours(model) -> patched model`` and the stand-in pack (``support/standin_attn2``) applied in ``order``
    (``ours_first`` / ``other_first``): in every live cross-attention of ``tiny`` the output is text attention + our
    term + the other pack's term, each measured alone; ``tiny`` is left untouched; the other pack saw the middle
    block."""
    from support.standin_attn2 import StyleTokens, standin_apply
    style = StyleTokens(seed=5)
    both = standin_apply(apply_ours(tiny), style) if order == "ours_first" else apply_ours(standin_apply(tiny, style))
    only_ours, only_style = _replace(apply_ours(tiny)), _replace(standin_apply(tiny, style))
    assert not tiny.model_options.get("transformer_options", {}).get("patches_replace")  # the input untouched
    live = host["patch"].attn2_modules(tiny.model.diffusion_model)
    g = torch.Generator().manual_seed(4)
    style.calls.clear()
    for key, attn in live.items():
        c, heads = attn.to_q.weight.shape[0], attn.heads
        q = torch.randn(1, 16, c, generator=g)
        k, v = torch.randn(1, 77, c, generator=g), torch.randn(1, 77, c, generator=g)
        text = ref_attention(q, k, v, heads)[0]
        got = _call(_replace(both)[key[:2]], q, k, v, key, (4, 4), heads)[0].double()
        f = _call(only_ours[key[:2]], q, k, v, key, (4, 4), heads)[0].double() - text
        s = _call(only_style[key[:2]], q, k, v, key, (4, 4), heads)[0].double() - text
        assert f.abs().max() > 1e-3 and s.abs().max() > 1e-3
        torch.testing.assert_close(got, text + f + s, atol=1e-5, rtol=1e-5)
    assert {b for b in style.calls if b[0] == "middle"} == {("middle", 0)}


@BOTH_CLONE_RULES
@pytest.mark.parametrize("order", ["ours_first", "other_first"])
def test_another_packs_callbacks_act_beside_the_faceid_term_in_both_orders(host, tiny, order):
    faceid = _tiny_faceid(host, tiny)
    ids, masks = random_identities(1, 3), torch.ones(1, 32, 32)
    other_pack_acts_beside(host, tiny, lambda model: _apply(host, model, faceid, ids, masks), order)


@BOTH_CLONE_RULES
def test_adapter_weights_go_to_the_device_once_not_per_generation(host, tiny):
    """The rule's keys/values depend only on its tokens and the file's to_k_ip/to_v_ip: a second generation with
    the same patched model reads no adapter weight again and gives the same result."""
    import comfy.sample
    faceid = _tiny_faceid(host, tiny)
    model = _apply(host, tiny, faceid, random_identities(2, 3), torch.ones(2, 32, 32))
    reads = []
    original = faceid.weights.kv_weights
    faceid.weights.kv_weights = lambda p: reads.append(p) or original(p)
    try:
        cond = [[torch.randn(1, 77, 2048, generator=torch.Generator().manual_seed(1)),
                 {"pooled_output": torch.zeros(1, 1280)}]]
        neg = [[torch.zeros(1, 77, 2048), {"pooled_output": torch.zeros(1, 1280)}]]

        def generate():
            return comfy.sample.sample(model, torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)),
                                       2, 5.0, "euler", "normal", cond, neg, torch.zeros(1, 4, 8, 8),
                                       disable_pbar=True, seed=0)
        first = generate()
        slots = len(set(reads))
        assert slots == len(host["patch"].attn2_modules(tiny.model.diffusion_model)) and len(reads) == slots
        second = generate()
        assert len(reads) == slots  # nothing read again
        torch.testing.assert_close(first, second)
    finally:
        del faceid.weights.kv_weights
