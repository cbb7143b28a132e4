"""The diffusers attention processors route every attn2 of the UNet and the ControlNet through the core's masked
attention, with the contract the ComfyUI nodes rely on."""

import pytest
import torch

from instantfamily_core.attention import MaskedCrossAttention
from support.training_fixtures import training_workspace
from training import model as M
from training.processors import MaskContext, MaskedCrossAttnProcessor, PlainSelfAttnProcessor, install_processors

T = 50


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return training_workspace(tmp_path_factory).setup


def _inputs(b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 4, 8, 8, generator=g), torch.tensor([100, 700][:b]), torch.randn(b, 77, 768, generator=g),
            torch.rand(b, 3, 64, 64, generator=g))


def test_every_cross_attention_is_masked_and_self_attention_plain(setup):
    for model, expected in ((setup.components.unet, 7), (setup.controlnet, 3)):
        M.ensure_processors(model)
        procs = model.attn_processors
        assert sum(isinstance(p, MaskedCrossAttnProcessor) for k, p in procs.items() if "attn2" in k) == expected
        assert all(isinstance(p, PlainSelfAttnProcessor) for k, p in procs.items() if "attn1" in k)


def test_without_identities_matches_diffusers_default_processors(setup):
    from diffusers.models.attention_processor import AttnProcessor2_0
    unet = setup.components.unet
    lat, t, text, _ = _inputs()
    install_processors(unet)
    ours = M.predict_noise(unet, setup.controlnet, setup.projector, lat, t, text, torch.zeros(0, T, 768),
                           torch.zeros(0, 64, 64), None)
    unet.set_attn_processor(AttnProcessor2_0())
    try:
        ref = unet(lat, t, encoder_hidden_states=text).sample
    finally:
        install_processors(unet)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_identity_tokens_act_only_inside_their_mask():
    from diffusers.models.attention_processor import Attention
    torch.manual_seed(0)
    attn = Attention(query_dim=32, cross_attention_dim=768, heads=4, dim_head=8)
    attn.set_processor(MaskedCrossAttnProcessor())
    masks = torch.zeros(2, 64, 64)
    masks[0, :, :32] = 1
    masks[1, :, 32:] = 1
    hidden, text = torch.randn(1, 64, 32), torch.randn(1, 77, 768)
    ids = torch.randn(2, T, 768)
    ctx = MaskContext(MaskedCrossAttention(masks, T), (8, 8))
    run = lambda i: attn(hidden, encoder_hidden_states=torch.cat([text, i.reshape(1, -1, 768)], 1),  # noqa: E731
                         instantfamily=ctx)
    changed = ids.clone()
    changed[0] = torch.randn(T, 768)
    diff = (run(ids) - run(changed)).abs().sum(-1).reshape(8, 8)
    assert diff[:, :4].min() > 0  # identity 0 lives in the left half
    assert diff[:, 4:].max() == 0  # and does nothing in the right half


@pytest.mark.parametrize("mode", ["additive", "paper"])
@pytest.mark.parametrize("with_control", [True, False])
def test_all_zero_mask_makes_a_padding_slot_invisible(setup, with_control, mode):
    # paper mode added with issue 9: its padding slots used to take attention (50 null keys at logit 0 each)
    lat, t, text, ctl = _inputs()
    ids = torch.randn(2, 1, T, 768)
    masks = torch.zeros(2, 1, 64, 64)
    masks[0, 0, 8:40, 8:40] = 1
    masks[1, 0, 20:60, 4:30] = 1
    control = ctl if with_control else None
    one = M.predict_noise(setup.components.unet, setup.controlnet, setup.projector, lat, t, text, ids, masks, control,
                          mask_mode=mode)
    padded_ids = torch.cat([ids, torch.randn(2, 3, T, 768)], 1)
    padded_masks = torch.cat([masks, torch.zeros(2, 3, 64, 64)], 1)
    four = M.predict_noise(setup.components.unet, setup.controlnet, setup.projector, lat, t, text, padded_ids,
                           padded_masks, control, mask_mode=mode)
    torch.testing.assert_close(four, one, rtol=1e-5, atol=1e-6)


def test_masks_reach_the_controlnet(setup):
    lat, t, text, ctl = _inputs(1)
    ids = torch.randn(1, T, 768)
    a, b = torch.zeros(1, 64, 64), torch.zeros(1, 64, 64)
    a[0, :32] = 1
    b[0, 32:] = 1
    down = {}
    for name, m in (("a", a), ("b", b)):
        context = torch.cat([text, ids.reshape(1, -1, 768)], 1)
        state = MaskContext(MaskedCrossAttention(m, T), (8, 8))
        down[name] = setup.controlnet(lat, t, encoder_hidden_states=context, controlnet_cond=ctl,
                                      cross_attention_kwargs=state.as_kwargs(), return_dict=False)[1]
    assert not torch.allclose(down["a"], down["b"])


def test_identity_features_and_dropout_use_the_projector_and_null_tokens(setup):
    proj = setup.projector
    g = torch.randn(2, 3, 512)
    loc = torch.randn(2, 3, 512, 7, 7)
    present = torch.tensor([[True, True, False], [True, False, False]])
    drop = torch.tensor([False, True])
    tokens = M.batch_tokens(proj, M.IdentityBatch(g, loc, present, drop))
    null = proj.null_tokens
    torch.testing.assert_close(tokens[0, 0], proj(g[0, :1], loc[0, :1])[0])
    assert torch.equal(tokens[0, 2], null) and torch.equal(tokens[1, 0], null) and torch.equal(tokens[1, 1], null)


def test_paper_mode_runs_and_differs_from_additive(setup):
    lat, t, text, ctl = _inputs(1)
    ids = torch.randn(1, T, 768)
    m = torch.zeros(1, 64, 64)
    m[0, 10:30, 10:30] = 1
    outs = [M.predict_noise(setup.components.unet, setup.controlnet, setup.projector, lat, t, text, ids, m, ctl,
                            mask_mode=mode) for mode in ("additive", "paper")]
    assert torch.isfinite(outs[1]).all() and not torch.allclose(outs[0], outs[1])
