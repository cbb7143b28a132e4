"""The pack inside a real ComfyUI host, in-process: tiny SD1.5-architecture UNet and ControlNet built with
ComfyUI's own classes (seeded random weights), the pack loaded through ComfyUI's custom-node loader."""

from __future__ import annotations

import sys

import pytest
import torch

from tools.devkit.comfy_host import HOW_TO_PROVIDE, find_comfyui
from tools.devkit.identities import random_identities

pytestmark = [pytest.mark.skipif(find_comfyui() is None, reason=HOW_TO_PROVIDE),
              pytest.mark.usefixtures("clone_rule")]  # every test under 0.3.64's and 0.38's clone()


@pytest.fixture(scope="module")
def host():
    from tools.devkit.comfy_host import import_host, load_pack
    nodes = import_host()
    pack = load_pack()
    name = pack.__name__
    mods = {m: sys.modules[f"{name}.nodes.{m}"] for m in ("patch", "controlnet", "model_nodes", "pose_nodes",
                                                          "paths", "face_nodes")}
    return nodes, pack, mods


@pytest.fixture(scope="module")
def ifmodel(host, tmp_path_factory):
    from support.comfy_models import write_tiny_checkpoint
    _, _, m = host
    path = tmp_path_factory.mktemp("if") / "tiny_if.safetensors"
    write_tiny_checkpoint(path)
    return m["model_nodes"].load_instantfamily(str(path))


def identities(n, seed=0):
    return random_identities(n, seed, face_pack="tinypack")


def pose_for(n, w=128, h=128):
    from support.poses import frame, person
    return frame([person((i + 0.5) * w / n, h * 0.3, s=w / (6 * n)) for i in range(n)], w=w, h=h)


def cond(seed, length=77):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, length, 768, generator=g), {}]]


def sample(nodes, model, positive, negative, seed=0, steps=2, size=16, cfg=5.0):
    latent = {"samples": torch.zeros(1, 4, size, size)}
    return nodes.common_ksampler(model, seed, steps, cfg, "euler", "normal", positive, negative, latent)[0]["samples"]


def apply(host, ifmodel, model, n, **kw):
    nodes, _, m = host
    ids = kw.pop("ids", None) or identities(n)
    positive = kw.pop("positive", None) or cond(1)
    pose_image, masks, _ = m["pose_nodes"].PoseToMasks().run(ids, "none (use pose_keypoint)", 128, 128, 0.25,
                                                             "auto", pose_keypoint=pose_for(n))
    args = dict(weight=1.0, identity_weights="", controlnet_strength=1.0, start_at=0.0, end_at=1.0,
                mask_mode="checkpoint")
    args.update(kw)
    return m["model_nodes"].ApplyInstantFamily().apply(model, ifmodel, ids, pose_image, masks,
                                                       positive, cond(2), **args)


def test_nodes_and_folders_are_registered(host):
    nodes, pack, m = host
    import folder_paths
    for name in pack.NODE_CLASS_MAPPINGS:
        assert nodes.NODE_CLASS_MAPPINGS[name] is pack.NODE_CLASS_MAPPINGS[name]
        assert pack.NODE_CLASS_MAPPINGS[name].CATEGORY == "InstantFamily"
    for key in ("instantfamily", "insightface"):
        assert key in folder_paths.folder_names_and_paths


def test_folder_registration_merges_extra_model_paths(host, tmp_path):
    _, _, m = host
    import folder_paths
    saved = dict(folder_paths.folder_names_and_paths)
    try:
        folder_paths.folder_names_and_paths["instantfamily"] = ([str(tmp_path)], set())
        m["paths"].register_folders()
        got = folder_paths.folder_names_and_paths["instantfamily"][0]
        assert got[0] == str(tmp_path) and any(p.endswith("instantfamily") for p in got[1:])
        m["paths"].register_folders()
        assert folder_paths.folder_names_and_paths["instantfamily"][0] == got  # idempotent
    finally:
        folder_paths.folder_names_and_paths.clear()
        folder_paths.folder_names_and_paths.update(saved)


def spy_attention(state, record):
    """Wrap ``state``'s masked attention: ``record(q, k, v, heads, feature_hw)`` is called before each call, the
    real attention answers it (and every attribute). Returns the real attention, to put back afterwards."""
    inner = state.attention

    class Spy:
        def __getattr__(self, name):  # everything but the call is the real attention's
            return getattr(inner, name)

        def __call__(self, q, k, v, heads, feature_hw, attention_fn=None):
            record(q, k, v, heads, feature_hw)
            return inner(q, k, v, heads, feature_hw, attention_fn=attention_fn)
    state.attention = Spy()
    return inner


@pytest.mark.parametrize("n", [1, 2, 4])
def test_sampling_runs_with_unet_and_controlnet_patched(host, ifmodel, n):
    from support.comfy_models import tiny_sd15
    nodes, _, m = host
    model = tiny_sd15()
    seen = []
    patched, pos, neg = apply(host, ifmodel, model, n)
    hook = next(iter(patched.model_options["transformer_options"]["patches_replace"]["attn2"].values()))
    spy_attention(hook.state, lambda q, k, v, heads, hw: seen.append((tuple(hw), k.shape[1])))
    out = sample(nodes, patched, pos, neg)
    assert torch.isfinite(out).all()
    assert all(nk == 77 + n * 50 for _, nk in seen)


def test_patch_reaches_every_cross_attention_block_of_unet_and_controlnet(host, ifmodel):
    from support.comfy_models import tiny_sd15
    nodes, _, m = host
    model = tiny_sd15()
    patched, pos, neg = apply(host, ifmodel, model, 2)
    state = next(iter(patched.model_options["transformer_options"]["patches_replace"]["attn2"].values())).state
    calls = []
    hooks = []
    original_call = m["patch"].Attn2Hook.__call__

    def recording_call(self, q, k, v, extra_options):
        key = (extra_options["block"][0], extra_options["block"][1], extra_options["block_index"])
        hooks.append((self.modules[key], key))
        return original_call(self, q, k, v, extra_options)
    inner = spy_attention(state, lambda q, k, v, heads, hw: calls.append(tuple(hw)))
    m["patch"].Attn2Hook.__call__ = recording_call
    try:
        sample(nodes, patched, pos, neg, steps=1)
    finally:
        m["patch"].Attn2Hook.__call__ = original_call
        state.attention = inner
    unet = m["patch"].attn2_modules(model.model.diffusion_model)
    cn = m["patch"].attn2_modules(ifmodel.controlnet.control_model)
    assert unet and cn
    # one euler step = one batched cond+uncond call: every cross-attention of the UNet and of the ControlNet ran
    # our hook exactly once, each with its own model's module
    called = sorted((id(module), key) for module, key in hooks)
    expected = sorted([(id(a), k) for k, a in unet.items()] + [(id(a), k) for k, a in cn.items()])
    assert called == expected
    assert len(calls) == len(unet) + len(cn)  # and each ran the masked attention


def _block_outputs(m, model, state, x_hw=(8, 8), seed=0):
    """Run every cross-attention BasicTransformerBlock of the UNet with ``state``'s hooks; return outputs."""
    from comfy.ldm.modules.attention import SpatialTransformer
    dm = model.model.diffusion_model
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(2, 77, 768, generator=g)
    outs = {}
    groups = [("input", dm.input_blocks), ("middle", [dm.middle_block]), ("output", dm.output_blocks)]
    for name, blocks in groups:
        for number, block in enumerate(blocks):
            for layer in block:
                if not isinstance(layer, SpatialTransformer):
                    continue
                for idx, tb in enumerate(layer.transformer_blocks):
                    c = tb.attn2.to_q.weight.shape[1]
                    x = torch.randn(2, x_hw[0] * x_hw[1], c, generator=g)
                    opts = {"block": (name, number), "block_index": idx, "cond_or_uncond": [0, 1],
                            "activations_shape": [2, c, *x_hw]}
                    if state is not None:
                        hook = m["patch"].Attn2Hook(state, {(name, number, idx): tb.attn2})
                        opts["patches_replace"] = {"attn2": {(name, number, idx): hook}}
                    with torch.no_grad():
                        outs[(name, number, idx)] = (tb(x, context=text, transformer_options=opts), x, text, opts)
    return outs


BACKENDS = ["attention_sub_quad", "attention_pytorch", "attention_basic"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_changing_one_identity_changes_only_its_mask_in_every_block(host, backend):
    from support.comfy_models import tiny_sd15
    import comfy.ldm.modules.attention as A
    from instantfamily_core.attention import MaskedCrossAttention
    _, _, m = host
    fn = getattr(A, backend)

    def attention_fn(q, k, v, heads, mask=None):
        return fn(q, k, v, heads, mask=mask)
    model = tiny_sd15()
    masks = torch.zeros(2, 64, 64)
    masks[0, :, :24] = 1
    masks[1, 16:48, 20:56] = 1  # overlaps identity 0 in columns 20..23
    tokens = torch.randn(2, 50, 768)
    null = torch.randn(50, 768)
    base_state = m["patch"].InstantFamilyAttention(tokens, null, MaskedCrossAttention(masks, 50), None, attention_fn)
    changed = tokens.clone()
    changed[1] += 1.0
    new_state = m["patch"].InstantFamilyAttention(changed, null, MaskedCrossAttention(masks, 50), None, attention_fn)
    a, b = _block_outputs(m, model, base_state), _block_outputs(m, model, new_state)
    from instantfamily_core.masks import resize_masks
    inside = resize_masks(masks, (8, 8))[1].flatten() > 0
    for key in a:
        diff = (a[key][0] - b[key][0]).abs().amax(dim=2)
        assert torch.equal(diff[0] > 0, inside), key  # cond row: only inside mask 1
        assert (diff[1] == 0).all(), key  # uncond row uses null tokens: untouched


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_mask_equals_plain_attention_over_the_stack_in_comfy_blocks(host, backend):
    from support.comfy_models import tiny_sd15
    import comfy.ldm.modules.attention as A
    from instantfamily_core.attention import MaskedCrossAttention
    _, _, m = host
    fn = getattr(A, backend)
    model = tiny_sd15()
    tokens, null = torch.randn(1, 50, 768), torch.randn(50, 768)
    state = m["patch"].InstantFamilyAttention(tokens, null, MaskedCrossAttention(torch.ones(1, 8, 8), 50), None,
                                              lambda q, k, v, heads, mask=None: fn(q, k, v, heads, mask=mask))
    patched = _block_outputs(m, model, state)
    plain = _block_outputs(m, model, None)
    for key, (out, x, text, opts) in patched.items():
        tb = _find_block(model, key)
        ctx = torch.cat([text, torch.stack([tokens[0], null])], dim=1)
        with torch.no_grad():
            ref = _plain_block(tb, x, ctx, fn)
        # identity keys/values are projected apart from the text's (once per run): the same numbers up to
        # float rounding of the matrix products
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(out, plain[key][0], atol=1e-3)  # the identities did change something


def _find_block(model, key):
    dm = model.model.diffusion_model
    name, number, idx = key
    block = {"input": dm.input_blocks, "output": dm.output_blocks}.get(name, [dm.middle_block])[number]
    from comfy.ldm.modules.attention import SpatialTransformer
    return [l for l in block if isinstance(l, SpatialTransformer)][0].transformer_blocks[idx]


def _plain_block(tb, x, ctx, fn):
    """The same BasicTransformerBlock with a plain attn2 over the full stack, through backend ``fn``."""
    def replace(q, k, v, extra):
        return fn(q, k, v, extra["n_heads"], attn_precision=extra.get("attn_precision"))
    return tb(x, context=ctx, transformer_options={"patches_replace": {"attn2": {("x", 0, 0): replace}},
                                                   "block": ("x", 0), "block_index": 0})


def test_zero_identities_patch_is_identical_to_unpatched(host):
    from support.comfy_models import tiny_sd15
    from instantfamily_core.attention import MaskedCrossAttention
    nodes, _, m = host
    model = tiny_sd15()
    state = m["patch"].InstantFamilyAttention(torch.zeros(0, 50, 768), torch.zeros(50, 768),
                                              MaskedCrossAttention(torch.zeros(0, 16, 16), 50))
    patched = m["patch"].patch_model(model, state)
    assert torch.equal(sample(nodes, patched, cond(1), cond(2)), sample(nodes, model, cond(1), cond(2)))


def test_patch_outside_start_end_equals_unpatched_and_the_original_model_is_untouched(host, ifmodel):
    from support.comfy_models import tiny_sd15
    nodes, _, _ = host
    model = tiny_sd15()
    before = sample(nodes, model, cond(1), cond(2))
    active, pos_a, neg_a = apply(host, ifmodel, model, 2)
    idle, pos_i, neg_i = apply(host, ifmodel, model, 2, start_at=1.0, end_at=1.0)
    assert torch.equal(sample(nodes, idle, pos_i, neg_i), before)
    with_ids = sample(nodes, active, pos_a, neg_a)
    assert not torch.equal(with_ids, before)
    # the unpatched model and the loaded ControlNet are untouched by applying
    assert torch.equal(sample(nodes, model, cond(1), cond(2)), before)
    assert ifmodel.controlnet.instantfamily is None
    assert "patches_replace" not in model.model_options.get("transformer_options", {})
    # a second apply with other identities leaves the first patched model's result unchanged
    apply(host, ifmodel, model, 2, ids=identities(2, seed=9))
    assert torch.equal(sample(nodes, active, pos_a, neg_a), with_ids)


def test_controlnet_chains_with_controlnets_before_and_after(host, ifmodel):
    from support.comfy_models import tiny_controlnet_ldm, tiny_sd15
    import comfy.controlnet
    nodes, _, m = host
    model = tiny_sd15()
    sd, cfg = tiny_controlnet_ldm(seed=5)
    other = m["controlnet"].build_controlnet(sd, "ldm", cfg)
    plain_cn = comfy.controlnet.ControlNet(other.control_model, load_device=other.load_device,
                                           manual_cast_dtype=other.manual_cast_dtype)
    hint = torch.rand(1, 128, 128, 3)
    pos, neg = nodes.ControlNetApplyAdvanced().apply_controlnet(cond(1), cond(2), plain_cn, hint, 0.7, 0.0, 1.0)
    patched, pos2, neg2 = apply(host, ifmodel, model, 2, positive=pos)
    first = pos2[0][1]["control"]
    assert isinstance(first, m["controlnet"].InstantFamilyControlNet)
    assert first.previous_controlnet is pos[0][1]["control"]
    pos3, neg3 = nodes.ControlNetApplyAdvanced().apply_controlnet(pos2, neg2, plain_cn, hint, 0.5, 0.0, 1.0)
    assert pos3[0][1]["control"].previous_controlnet is first
    out = sample(nodes, patched, pos3, neg3)
    assert torch.isfinite(out).all()


def test_apply_errors(host, ifmodel):
    from support.comfy_models import tiny_sd15
    from instantfamily_core.errors import BaseModelError, IdentityCountError, MaskError
    import comfy.supported_models
    _, _, m = host
    model = tiny_sd15()
    node = m["model_nodes"].ApplyInstantFamily()
    args = dict(weight=1.0, identity_weights="", controlnet_strength=1.0, start_at=0.0, end_at=1.0,
                mask_mode="checkpoint")
    img = torch.zeros(1, 128, 128, 3)
    with pytest.raises(MaskError, match="3 masks but there are 2"):
        node.apply(model, ifmodel, identities(2), img, torch.zeros(3, 128, 128), cond(1), cond(2), **args)
    with pytest.raises(IdentityCountError, match="empty"):
        node.apply(model, ifmodel, [], img, torch.zeros(0, 128, 128), cond(1), cond(2), **args)
    with pytest.raises(Exception, match="weights"):
        node.apply(model, ifmodel, identities(2), img, torch.zeros(2, 128, 128), cond(1), cond(2),
                   **{**args, "identity_weights": "1"})
    from instantfamily_core.errors import OptionError  # bad option values: OptionError, not IdentityCountError
    with pytest.raises(OptionError, match=r"identity_weights: 1 weights for 2 identities"):
        node.apply(model, ifmodel, identities(2), img, torch.zeros(2, 128, 128), cond(1), cond(2),
                   **{**args, "identity_weights": "1"})
    with pytest.raises(OptionError, match=r"start_at \(0.8\) must not be after end_at \(0.2\)"):
        node.apply(model, ifmodel, identities(2), img, torch.zeros(2, 128, 128), cond(1), cond(2),
                   **{**args, "start_at": 0.8, "end_at": 0.2})
    with pytest.raises(OptionError, match="filename"):
        m["face_nodes"].SaveIdentities().save(identities(1), " .. ")
    sd2 = model.clone()
    sd2.model.model_config = comfy.supported_models.SD20(dict(sd2.model.model_config.unet_config))
    with pytest.raises(BaseModelError, match="Stable Diffusion 1.5"):
        node.apply(sd2, ifmodel, identities(1), img, torch.zeros(1, 128, 128), cond(1), cond(2), **args)


def test_pose_to_masks_node_outputs_and_errors(host):
    from instantfamily_core.errors import IdentityCountError, MaskError, PoseError
    _, _, m = host
    node = m["pose_nodes"].PoseToMasks()
    pose, masks, preview = node.run(identities(3), "none (use pose_keypoint)", 192, 128, 0.25, "auto",
                                    pose_keypoint=pose_for(3, 384, 256))
    assert pose.shape == (1, 128, 192, 3) and masks.shape == (3, 128, 192) and preview.shape == pose.shape
    assert (masks.flatten(1).sum(1) > 0).all()
    with pytest.raises(IdentityCountError, match="only 3 people"):
        node.run(identities(4), "none (use pose_keypoint)", 192, 128, 0.25, "auto", pose_keypoint=pose_for(3))
    with pytest.raises(PoseError, match="no people"):
        node.run(identities(1), "none (use pose_keypoint)", 64, 64, 0.25, "auto",
                 pose_keypoint=[{"canvas_width": 64, "canvas_height": 64, "people": []}])
    with pytest.raises(MaskError, match="2 masks but there are 3"):
        node.run(identities(3), "none (use pose_keypoint)", 64, 64, 0.25, "auto", pose_keypoint=pose_for(3),
                 masks=torch.ones(2, 64, 64))
    with pytest.raises(PoseError, match="template"):
        node.run(identities(1), "none (use pose_keypoint)", 64, 64, 0.25, "auto")
    from instantfamily_core.errors import OptionError
    with pytest.raises(OptionError, match="template: 'nope.json' not found"):
        node.run(identities(1), "nope.json", 64, 64, 0.25, "auto")
    with pytest.raises(OptionError, match="identity_order"):
        node.run(identities(2), "none (use pose_keypoint)", 64, 64, 0.25, "left, right", pose_keypoint=pose_for(2))
    user = torch.zeros(3, 32, 32)
    user[:, :8, :8] = 1
    _, got, _ = node.run(identities(3), "none (use pose_keypoint)", 64, 64, 0.25, "auto",
                         pose_keypoint=pose_for(3), masks=user)
    assert got.shape == (3, 64, 64) and got[:, :16, :16].min() == 1 and got[:, 20:, 20:].max() == 0


def test_masks_of_another_aspect_ratio_than_the_latent_are_refused_at_sampling(host, ifmodel):
    from support.comfy_models import tiny_sd15
    from instantfamily_core.errors import MaskError
    nodes, _, _ = host
    patched, pos, neg = apply(host, ifmodel, tiny_sd15(), 2)  # pose and masks 128×128
    latent = {"samples": torch.zeros(1, 4, 16, 24)}
    with pytest.raises(MaskError, match=r"aspect 1.00\) but the latent is 192×128"):
        nodes.common_ksampler(patched, 0, 1, 5.0, "euler", "normal", pos, neg, latent)
    assert torch.isfinite(sample(nodes, patched, pos, neg, steps=1)).all()  # the same patch at a square latent


def test_identity_keys_go_through_lora_patched_weights(host, ifmodel):
    """LoRA-style weight patches (ModelPatcher.add_patches) reach the identity keys: they are projected during
    sampling, after ComfyUI has patched the weights, and again at the next run."""
    from support.comfy_models import tiny_sd15
    nodes, _, _ = host
    model = tiny_sd15()
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    weight = model.model.state_dict()[key].clone()
    delta = torch.randn(weight.shape, generator=torch.Generator().manual_seed(3)) * 0.05
    lora = model.clone()
    lora.add_patches({key: (delta,)}, 1.0)
    patched, pos, neg = apply(host, ifmodel, lora, 1)
    hook = patched.model_options["transformer_options"]["patches_replace"]["attn2"][("input", 1)]
    sample(nodes, patched, pos, neg, steps=1)
    attn = hook.modules[("input", 1, 0)]
    cached = [v for k, v in hook.state.cache.data.items() if k[0] == "kv" and k[1] is attn]
    assert len(cached) == 1
    tokens = hook.state.tokens.flatten(0, 1)
    torch.testing.assert_close(cached[0][0], tokens @ (weight + delta).t(), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(cached[0][0], tokens @ weight.t(), atol=1e-3)
