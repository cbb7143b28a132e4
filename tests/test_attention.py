"""Exactness properties of the one masked cross-attention implementation."""

import math

import numpy as np
import pytest
import torch

from instantfamily_core.attention import MaskedCrossAttention, paper_attention, sdpa_attention
from instantfamily_core.errors import IdentityCountError, MaskError, OptionError
from instantfamily_core.stack import SlotLayout

HEADS, DH, T, TEXT = 2, 8, 3, 5


def _qkv(n_ids, hw=(4, 6), batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    nq, nk = hw[0] * hw[1], TEXT + n_ids * T
    q = torch.randn(batch, nq, HEADS * DH, generator=g)
    k = torch.randn(batch, nk, HEADS * DH, generator=g)
    v = torch.randn(batch, nk, HEADS * DH, generator=g)
    return q, k, v


def _masks(hw=(4, 6)):
    m = torch.zeros(2, *hw)
    m[0, :, :3] = 1  # left half
    m[1, 1:3, 2:5] = 1  # overlaps the left half in column 2
    return m


def test_no_identities_equals_plain_text_attention_bit_for_bit():
    q, k, v = _qkv(0)
    attn = MaskedCrossAttention(torch.zeros(0, 4, 6), T)
    assert torch.equal(attn(q, k, v, HEADS, (4, 6)), sdpa_attention(q, k, v, HEADS))
    attn_paper = MaskedCrossAttention(torch.zeros(0, 4, 6), T, mode="paper")
    assert torch.equal(attn_paper(q, k, v, HEADS, (4, 6)), sdpa_attention(q, k, v, HEADS))


def test_full_mask_at_weight_one_equals_plain_attention_over_the_stack():
    q, k, v = _qkv(1)
    attn = MaskedCrossAttention(torch.ones(1, 16, 24), T)
    assert torch.equal(attn(q, k, v, HEADS, (4, 6)), sdpa_attention(q, k, v, HEADS))


def test_full_mask_equals_plain_attention_with_a_custom_backend():
    calls = []

    def backend(q, k, v, heads, mask=None):
        calls.append(mask)
        return sdpa_attention(q, k, v, heads, mask)

    q, k, v = _qkv(2)
    attn = MaskedCrossAttention(torch.ones(2, 4, 6), T)
    assert torch.equal(attn(q, k, v, HEADS, (4, 6), attention_fn=backend), sdpa_attention(q, k, v, HEADS))
    assert calls == [None]


@pytest.mark.parametrize("n", [0, 1])
def test_changing_identity_n_changes_output_only_inside_mask_n(n):
    masks = _masks()
    attn = MaskedCrossAttention(masks, T)
    q, k, v = _qkv(2)
    base = attn(q, k, v, HEADS, (4, 6))
    layout = SlotLayout.for_key_length(k.shape[1], T, 2)
    k2, v2 = k.clone(), v.clone()
    k2[:, layout.identity_slice(n)] += 3.0
    v2[:, layout.identity_slice(n)] -= 5.0
    changed = (attn(q, k2, v2, HEADS, (4, 6)) - base).abs().amax(dim=(0, 2)) > 0
    inside = masks[n].flatten() > 0
    assert torch.equal(changed, inside)


def test_overlapping_masks_see_both_identities():
    masks = _masks()
    attn = MaskedCrossAttention(masks, T)
    q, k, v = _qkv(2)
    base = attn(q, k, v, HEADS, (4, 6))
    layout = SlotLayout.for_key_length(k.shape[1], T, 2)
    overlap = ((masks[0] > 0) & (masks[1] > 0)).flatten()
    assert overlap.any()
    for n in range(2):
        v2 = v.clone()
        v2[:, layout.identity_slice(n)] += 1.0
        changed = (attn(q, k, v2, HEADS, (4, 6)) - base).abs().amax(dim=(0, 2)) > 0
        assert changed[overlap].all()


def test_weight_zero_switches_an_identity_off_and_weights_scale_it():
    masks = _masks()
    q, k, v = _qkv(2)
    layout = SlotLayout.for_key_length(k.shape[1], T, 2)
    off = MaskedCrossAttention(masks, T, weights=[0.0, 1.0])
    v2 = v.clone()
    v2[:, layout.identity_slice(0)] += 7.0
    assert torch.equal(off(q, k, v, HEADS, (4, 6)), off(q, k, v2, HEADS, (4, 6)))
    # weight w on identity n equals adding log(w) to its logits inside the mask
    w = 2.5
    attn = MaskedCrossAttention(masks, T, weights=[w, 1.0])
    ref = sdpa_attention(q, k, v, HEADS, _reference_bias(masks, [w, 1.0], k.shape[1]))
    torch.testing.assert_close(attn(q, k, v, HEADS, (4, 6)), ref)


def _reference_bias(masks, weights, nk):
    m = masks.flatten(1).t()
    bias = torch.zeros(m.shape[0], nk)
    for n, w in enumerate(weights):
        s = slice(TEXT + n * T, TEXT + (n + 1) * T)
        bias[:, s] = torch.where(m[:, n:n + 1] > 0, math.log(w), -1e30).expand(-1, T)
    return bias


def _numpy_paper_reference(q, k, v, masks, weights):
    """Eq. 6 written out: logits = (M ⊙ QKᵀ)/√d with M = 1 on text keys and m_n on identity n's keys, then
    + log w_n on identity n's keys; identities with weight 0 or an all-zero mask are left out of the softmax."""
    qn, kn, vn = (t.double().numpy() for t in (q, k, v))
    m = masks.flatten(1).t().double().numpy()
    M = np.ones((qn.shape[0], kn.shape[0]))
    add = np.zeros(kn.shape[0])
    for n, w in enumerate(weights):
        s = slice(TEXT + n * T, TEXT + (n + 1) * T)
        M[:, s] = m[:, n][:, None]
        add[s] = math.log(w) if w > 0 and m[:, n].max() > 0 else -np.inf
    ref = []
    for h in range(HEADS):
        s = slice(h * DH, (h + 1) * DH)
        logits = (M * (qn[:, s] @ kn[:, s].T)) / math.sqrt(DH) + add
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        ref.append(p @ vn[:, s])
    return np.concatenate(ref, 1)


def test_paper_mode_matches_a_numpy_transcription_of_eq6():
    masks = _masks()
    q, k, v = _qkv(2, batch=1)
    out = MaskedCrossAttention(masks, T, mode="paper")(q, k, v, HEADS, (4, 6))
    # weight 1: the printed equation and nothing else
    qn, kn, vn = (t[0].double().numpy() for t in (q, k, v))
    m = masks.flatten(1).t().double().numpy()
    M = np.ones((qn.shape[0], kn.shape[0]))
    for n in range(2):
        M[:, TEXT + n * T:TEXT + (n + 1) * T] = m[:, n][:, None]
    ref = []
    for h in range(HEADS):
        s = slice(h * DH, (h + 1) * DH)
        logits = (M * (qn[:, s] @ kn[:, s].T)) / math.sqrt(DH)
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        ref.append(p @ vn[:, s])
    np.testing.assert_allclose(out[0].double().numpy(), np.concatenate(ref, 1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("weights", [[0.7, 1.3], [0.0, 1.0], [2.0, 0.0]])
def test_paper_mode_weights_multiply_the_attention_mass(weights):
    # Changed with issue 9: a weight used to multiply M (a softmax temperature; weight 0 set the logits to 0 and
    # spread the identity over the image). Now it multiplies the identity's unnormalised softmax weights.
    masks = _masks()
    q, k, v = _qkv(2, batch=1)
    out = MaskedCrossAttention(masks, T, weights=weights, mode="paper")(q, k, v, HEADS, (4, 6))
    np.testing.assert_allclose(out[0].double().numpy(), _numpy_paper_reference(q[0], k[0], v[0], masks, weights),
                               rtol=1e-5, atol=1e-6)


def test_weight_zero_removes_the_identity_in_both_modes():
    masks = _masks()
    q, k, v = _qkv(2)
    layout = SlotLayout.for_key_length(k.shape[1], T, 2)
    for mode in ("additive", "paper"):
        attn = MaskedCrossAttention(masks, T, weights=[0.0, 1.0], mode=mode)
        k2, v2 = k.clone(), v.clone()
        k2[:, layout.identity_slice(0)] -= 4.0
        v2[:, layout.identity_slice(0)] += 7.0
        assert torch.equal(attn(q, k, v, HEADS, (4, 6)), attn(q, k2, v2, HEADS, (4, 6))), mode
        # and equals attention over the text and identity 1 alone
        keep = torch.cat([torch.arange(TEXT), torch.arange(layout.identity_slice(1).start, k.shape[1])])
        alone = MaskedCrossAttention(masks[1:], T, mode=mode)(q, k[:, keep], v[:, keep], HEADS, (4, 6))
        torch.testing.assert_close(attn(q, k, v, HEADS, (4, 6)), alone)


def test_padding_slots_are_invisible_in_paper_mode_training_equals_inference():
    """A training row with 1 face in slot 2 of 4 (3 padding slots with null tokens) gives exactly what inference
    with that one identity gives; before issue 9, paper mode let the 3×T padding keys take attention."""
    g = torch.Generator().manual_seed(3)
    hw = (4, 6)
    face = torch.zeros(*hw)
    face[1:3, 1:4] = 1
    q = torch.randn(1, 24, HEADS * DH, generator=g)
    text_k, text_v = torch.randn(1, TEXT, HEADS * DH, generator=g), torch.randn(1, TEXT, HEADS * DH, generator=g)
    id_k, id_v = torch.randn(1, T, HEADS * DH, generator=g), torch.randn(1, T, HEADS * DH, generator=g)
    null_k, null_v = torch.randn(1, T, HEADS * DH, generator=g), torch.randn(1, T, HEADS * DH, generator=g)
    for mode in ("additive", "paper"):
        infer = MaskedCrossAttention(face[None], T, mode=mode)(
            q, torch.cat([text_k, id_k], 1), torch.cat([text_v, id_v], 1), HEADS, hw)
        masks = torch.zeros(1, 4, *hw)
        masks[0, 2] = face
        ks = torch.cat([text_k, null_k, null_k, id_k, null_k], 1)
        vs = torch.cat([text_v, null_v, null_v, id_v, null_v], 1)
        train = MaskedCrossAttention(masks, T, mode=mode)(q, ks, vs, HEADS, hw)
        torch.testing.assert_close(train, infer, rtol=1e-5, atol=1e-6)


def test_paper_mode_leaks_outside_the_mask_as_printed():
    masks = _masks()
    attn = MaskedCrossAttention(masks, T, mode="paper")
    q, k, v = _qkv(2)
    layout = SlotLayout.for_key_length(k.shape[1], T, 2)
    v2 = v.clone()
    v2[:, layout.identity_slice(0)] += 1.0
    changed = (attn(q, k, v2, HEADS, (4, 6)) - attn(q, k, v, HEADS, (4, 6))).abs().amax(dim=(0, 2)) > 0
    assert changed[masks[0].flatten() == 0].any()


def test_paper_attention_with_all_ones_equals_plain_attention():
    q, k, v = _qkv(1)
    torch.testing.assert_close(paper_attention(q, k, v, HEADS, torch.ones(q.shape[1], k.shape[1])),
                               sdpa_attention(q, k, v, HEADS))


def test_bias_built_once_per_size_key_length_dtype_device():
    attn = MaskedCrossAttention(_masks((16, 24)), T)
    b1 = attn.bias((4, 6), TEXT + 2 * T, torch.float32, torch.device("cpu"))
    assert attn.bias((4, 6), TEXT + 2 * T, torch.float32, torch.device("cpu")) is b1
    b2 = attn.bias((2, 3), TEXT + 2 * T, torch.float32, torch.device("cpu"))
    assert b2.shape == (6, TEXT + 2 * T) and b2 is not b1
    assert attn.bias((4, 6), TEXT + 2 * T, torch.float16, torch.device("cpu")).dtype == torch.float16
    assert len(attn._cache) == 3


def test_bias_is_float_and_finite_for_all_dtypes():
    attn = MaskedCrossAttention(_masks(), T)
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        b = attn.bias((4, 6), TEXT + 2 * T, dt, torch.device("cpu"))
        assert b.dtype == dt and torch.isfinite(b).all()
        assert (b[:, :TEXT] == 0).all()


def test_many_identities_up_to_16():
    n = 16
    masks = torch.zeros(n, 4, 8)
    for i in range(n):
        masks[i].view(-1)[i * 2:i * 2 + 2] = 1
    attn = MaskedCrossAttention(masks, T)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 32, HEADS * DH, generator=g)
    k = torch.randn(1, TEXT + n * T, HEADS * DH, generator=g)
    v = torch.randn(1, TEXT + n * T, HEADS * DH, generator=g)
    base = attn(q, k, v, HEADS, (4, 8))
    layout = SlotLayout.for_key_length(k.shape[1], T, n)
    v2 = v.clone()
    v2[:, layout.identity_slice(11)] += 1
    changed = (attn(q, k, v2, HEADS, (4, 8)) - base).abs().amax(dim=(0, 2)) > 0
    assert torch.equal(changed, masks[11].flatten() > 0)


def test_bad_inputs_raise_typed_errors():
    with pytest.raises(MaskError, match="mask mode"):
        MaskedCrossAttention(_masks(), T, mode="multiply")
    with pytest.raises(OptionError, match="2 weights"):
        MaskedCrossAttention(_masks(), T, weights=[1.0])
    with pytest.raises(OptionError, match="≥ 0"):
        MaskedCrossAttention(_masks(), T, weights=[1.0, -1.0])
    attn = MaskedCrossAttention(_masks(), T)
    q, k, v = _qkv(2)
    with pytest.raises(MaskError, match="positions"):
        attn(q, k, v, HEADS, (3, 6))
    with pytest.raises(IdentityCountError, match="text"):
        attn(q, k[:, :2 * T], v[:, :2 * T], HEADS, (4, 6))
    with pytest.raises(MaskError, match=r"\[0, 1\]"):
        MaskedCrossAttention(_masks() * 2, T)


def test_per_row_masks_and_padding_slots():
    masks = torch.zeros(2, 2, 4, 6)
    masks[0, 0, :, :3] = 1  # row 0: identity 0 on the left, slot 1 is padding
    masks[1, 0, :, 3:] = 1  # row 1: identity 0 on the right
    masks[1, 1, 2:, :] = 1  # row 1: identity 1 at the bottom
    q, k, v = _qkv(2)
    layout = SlotLayout.for_key_length(k.shape[1], T, 2)
    for mode in ("additive", "paper"):
        attn = MaskedCrossAttention(masks, T, mode=mode)
        base = attn(q, k, v, HEADS, (4, 6))
        v2 = v.clone()
        v2[:, layout.identity_slice(0)] += 2.0
        changed = (attn(q, k, v2, HEADS, (4, 6)) - base).abs().amax(dim=2) > 0
        if mode == "additive":
            assert torch.equal(changed, masks[:, 0].flatten(1) > 0)
        else:
            assert changed.all()  # the literal equation leaks everywhere
    for mode in ("additive", "paper"):
        attn = MaskedCrossAttention(masks, T, mode=mode)
        base = attn(q, k, v, HEADS, (4, 6))
        v3, k3 = v.clone(), k.clone()
        v3[0, layout.identity_slice(1)] += 9.0  # padding slot of row 0: nobody sees it, in either mode
        k3[0, layout.identity_slice(1)] -= 3.0
        assert torch.equal(attn(q, k3, v3, HEADS, (4, 6))[0], base[0]), mode
    attn = MaskedCrossAttention(masks, T)
    assert attn.bias((4, 6), k.shape[1], torch.float32, torch.device("cpu")).shape == (2, 24, k.shape[1])
