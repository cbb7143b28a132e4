"""Public-weights mode, core: FaceID files (both containers, every variant, clear refusals), the projection
models against reference math written out here, and the N-person decoupled masked attention against an
explicit per-person softmax reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from instantfamily_core.errors import EmbeddingError, InstantFamilyError
from instantfamily_core.faceid import (FaceIDFileError, FaceIDProjection, decoupled_masked_attention, identity_term,
                                       load_faceid, pad_people, person_tokens)
from support import faceid_files as ff


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("faceid")
    out = {}
    for variant, name in (("faceid", "ip-adapter-faceid_sd15"), ("plus", "ip-adapter-faceid-plusv2_sd15"),
                          ("plus", "ip-adapter-faceid-plus_sd15"), ("portrait", "ip-adapter-faceid-portrait-v11_sd15")):
        parts = ff.faceid_parts(variant)
        ff.write_bin(d / f"{name}.bin", parts)
        out[name] = (d / f"{name}.bin", parts)
    ff.write_safetensors(d / "ip-adapter-faceid_sd15.safetensors", out["ip-adapter-faceid_sd15"][1])
    out["flat"] = (d / "ip-adapter-faceid_sd15.safetensors", out["ip-adapter-faceid_sd15"][1])
    return d, out


# -- files ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, variant, tokens, lora", [
    ("ip-adapter-faceid_sd15", "faceid", 4, True), ("ip-adapter-faceid-plusv2_sd15", "plusv2", 4, True),
    ("ip-adapter-faceid-plus_sd15", "plus", 4, True), ("ip-adapter-faceid-portrait-v11_sd15", "portrait", 16, False),
    ("flat", "faceid", 4, True)])
def test_published_layouts_load_and_are_detected(files, name, variant, tokens, lora):
    path, parts = files[1][name]
    w = load_faceid(str(path))
    assert (w.variant, w.tokens_per_image, w.has_lora) == (variant, tokens, lora)
    assert len(w.image_proj) == (56 if "plus" in variant else 6)
    assert len(w.ip_adapter) == (288 if lora else 32)
    for k, v in parts[1].items():  # values come through unchanged
        assert torch.equal(w.ip_adapter[k], v)


def test_plus_version_override_wins_over_the_file_name(files):
    path, _ = files[1]["ip-adapter-faceid-plusv2_sd15"]
    assert load_faceid(str(path), "v1").variant == "plus"
    path, _ = files[1]["ip-adapter-faceid-plus_sd15"]
    assert load_faceid(str(path), "v2").variant == "plusv2"
    assert load_faceid(str(path)).shortcut is False


def test_pickles_are_loaded_with_weights_only(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("should never run",))
    path = tmp_path / "evil.bin"
    torch.save({"image_proj": {"x": Evil()}, "ip_adapter": {}}, str(path))
    with pytest.raises(FaceIDFileError, match="weights_only"):
        load_faceid(str(path))


@pytest.mark.parametrize("variant, name, want, tokens, lora, published", [
    ("sdxl", "ip-adapter-faceid_sdxl.bin", "faceid", 4, True, 1_071_149_741),
    ("sdxl-plusv2", "ip-adapter-faceid-plusv2_sdxl.bin", "plusv2", 4, True, 1_487_555_181),
    ("sdxl-portrait", "ip-adapter-faceid-portrait_sdxl.bin", "portrait", 16, False, 750_000_000)])
def test_sdxl_published_layouts_load_with_the_sdxl_topology(tmp_path, variant, name, want, tokens, lora, published):
    """The fixtures (fp16, published key names and shapes) come within 0.05 % of the published byte sizes (the data
    bytes are identical; the torch zip container differs: +271 KB / +291 KB; Portrait is published as "750 MB")."""
    from instantfamily_core.faceid import SDXL
    ff.write_bin(tmp_path / name, ff.faceid_parts(variant))
    size = (tmp_path / name).stat().st_size
    assert abs(size - published) / published < 5e-4, (size, published)
    w = load_faceid(str(tmp_path / name))
    assert (w.variant, w.tokens_per_image, w.has_lora, w.base, w.context_dim) == (want, tokens, lora, "SDXL", 2048)
    assert w.topology is SDXL and len(w.ip_adapter) == (1260 if lora else 140)
    assert len(w.lora_state_dict()) == (1120 if lora else 0)
    model = FaceIDProjection.from_weights(w)
    if want != "plusv2":
        assert model(torch.randn(1, 512)).shape == (1, tokens, 2048)


def test_sdxl_file_with_sd15_widths_names_the_sdxl_layout(tmp_path):
    image_proj, ip = ff.faceid_parts("sdxl-nolora")
    ip["121.to_k_ip.weight"] = ip["1.to_k_ip.weight"]  # 640 where the middle block's 1280 belongs
    ff.write_bin(tmp_path / "x_sdxl.bin", (image_proj, ip))
    with pytest.raises(FaceIDFileError, match=r"SDXL FaceID layout: wrong shapes: \['121.to_k_ip.weight \(640, "
                                              r"2048\) \(expected \(1280, 2048\)"):
        load_faceid(str(tmp_path / "x_sdxl.bin"))
    image_proj, ip = ff.faceid_parts("faceid")
    ip = {k: v for k, v in ip.items() if k.startswith("1.")}
    ip["1.to_k_ip.weight"] = torch.zeros(320, 1024, dtype=torch.float16)
    ff.write_bin(tmp_path / "sd2.bin", (image_proj, ip))
    with pytest.raises(FaceIDFileError, match=r"reads 1024-d text; .*SD1.5 \(768\) or SDXL \(2048\)"):
        load_faceid(str(tmp_path / "sd2.bin"))


def test_non_faceid_adapters_are_refused(tmp_path):
    plain = ({"proj.weight": torch.zeros(3072, 1024), "proj.bias": torch.zeros(3072),
              "norm.weight": torch.ones(768), "norm.bias": torch.zeros(768)}, ff.ip_adapter(False))
    ff.write_bin(tmp_path / "ip-adapter_sd15.bin", plain)
    with pytest.raises(FaceIDFileError, match=r"not an IP-Adapter-FaceID file \(IP-Adapter \(CLIP image"):
        load_faceid(str(tmp_path / "ip-adapter_sd15.bin"))
    plus_face = ({"latents": torch.zeros(1, 16, 768), "proj_in.weight": torch.zeros(768, 1280)}, ff.ip_adapter(False))
    ff.write_bin(tmp_path / "ip-adapter-plus-face_sd15.bin", plus_face)
    with pytest.raises(FaceIDFileError, match="IP-Adapter Plus"):
        load_faceid(str(tmp_path / "ip-adapter-plus-face_sd15.bin"))


def test_lora_file_chosen_as_adapter_and_broken_layouts_name_the_problem(tmp_path):
    from safetensors.torch import save_file
    parts = ff.faceid_parts("faceid")
    save_file({k: v.contiguous() for k, v in ff.kohya_lora(parts).items()}, str(tmp_path / "x_lora.safetensors"))
    with pytest.raises(FaceIDFileError, match="this is a LoRA"):
        load_faceid(str(tmp_path / "x_lora.safetensors"))
    image_proj, ip = ff.faceid_parts("faceid")
    del ip["31.to_v_ip.weight"]
    ff.write_bin(tmp_path / "missing.bin", (image_proj, ip))
    with pytest.raises(FaceIDFileError, match=r"ip_adapter does not match .*1 missing .*31.to_v_ip"):
        load_faceid(str(tmp_path / "missing.bin"))
    image_proj, ip = ff.faceid_parts("faceid")
    ip["13.to_k_ip.weight"] = ip["1.to_k_ip.weight"]  # 320 where 1280 belongs
    ff.write_bin(tmp_path / "shape.bin", (image_proj, ip))
    with pytest.raises(FaceIDFileError, match=r"wrong shapes: \['13.to_k_ip.weight \(320, 768\) \(expected \(1280, 768\)"):
        load_faceid(str(tmp_path / "shape.bin"))
    image_proj, ip = ff.faceid_parts("faceid")
    del ip["0.to_q_lora.up.weight"]  # a partial LoRA
    ff.write_bin(tmp_path / "partial.bin", (image_proj, ip))
    with pytest.raises(FaceIDFileError, match="1 missing"):
        load_faceid(str(tmp_path / "partial.bin"))
    (tmp_path / "junk.bin").write_bytes(b"not a pickle")
    with pytest.raises(FaceIDFileError, match="junk.bin: cannot read"):
        load_faceid(str(tmp_path / "junk.bin"))
    with pytest.raises(FaceIDFileError, match="file not found"):
        load_faceid(str(tmp_path / "nope.bin"))
    assert issubclass(FaceIDFileError, InstantFamilyError)


# -- projection ----------------------------------------------------------------------------------------------------

def ref_mlp(sd, e, tokens):
    h = F.gelu(e @ sd["proj.0.weight"].float().T + sd["proj.0.bias"].float())
    x = (h @ sd["proj.2.weight"].float().T + sd["proj.2.bias"].float()).reshape(-1, tokens, 768)
    return F.layer_norm(x, (768,), sd["norm.weight"].float(), sd["norm.bias"].float())


def ref_perceiver(sd, latents, clip):
    g = lambda k: sd["perceiver_resampler." + k].float()  # noqa: E731
    x = clip @ g("proj_in.weight").T + g("proj_in.bias")
    for i in range(4):
        a, f = f"layers.{i}.0.", f"layers.{i}.1."
        xn = F.layer_norm(x, (768,), g(a + "norm1.weight"), g(a + "norm1.bias"))
        ln = F.layer_norm(latents, (768,), g(a + "norm2.weight"), g(a + "norm2.bias"))
        q = ln @ g(a + "to_q.weight").T
        kv = torch.cat([xn, ln], 1) @ g(a + "to_kv.weight").T
        k, v = kv[..., :768], kv[..., 768:]
        outs = []
        for h in range(12):  # head by head, explicit softmax
            sl = slice(64 * h, 64 * h + 64)
            w = torch.softmax(q[..., sl] @ k[..., sl].transpose(-1, -2) / 8.0, -1)
            outs.append(w @ v[..., sl])
        latents = torch.cat(outs, -1) @ g(a + "to_out.weight").T + latents
        y = F.layer_norm(latents, (768,), g(f + "0.weight"), g(f + "0.bias"))
        latents = F.gelu(y @ g(f + "1.weight").T) @ g(f + "3.weight").T + latents
    return F.layer_norm(latents @ g("proj_out.weight").T + g("proj_out.bias"), (768,), g("norm_out.weight"),
                        g("norm_out.bias"))


def test_faceid_tokens_and_uncond_are_the_reference_mlp(files):
    w = load_faceid(str(files[1]["ip-adapter-faceid_sd15"][0]))
    model = FaceIDProjection.from_weights(w)
    e = F.normalize(torch.randn(512), dim=0)
    cond, uncond = person_tokens(model, w.variant, "p", e)
    assert cond.shape == uncond.shape == (4, 768)
    torch.testing.assert_close(cond, ref_mlp(w.image_proj, e[None], 4)[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(uncond, ref_mlp(w.image_proj, torch.zeros(1, 512), 4)[0], atol=1e-5, rtol=1e-4)


def test_portrait_concatenates_16_tokens_per_photo_up_to_five(files):
    w = load_faceid(str(files[1]["ip-adapter-faceid-portrait-v11_sd15"][0]))
    model = FaceIDProjection.from_weights(w)
    e = F.normalize(torch.randn(3, 512), dim=1)
    cond, uncond = person_tokens(model, w.variant, "p", e)
    assert cond.shape == (48, 768)
    torch.testing.assert_close(cond[16:32], ref_mlp(w.image_proj, e[1:2], 16)[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(uncond[32:], ref_mlp(w.image_proj, torch.zeros(1, 512), 16)[0], atol=1e-5, rtol=1e-4)
    with pytest.raises(EmbeddingError, match="6 reference photos.*at most 5"):
        person_tokens(model, w.variant, "p", F.normalize(torch.randn(6, 512), dim=1))


@pytest.mark.parametrize("name", ["ip-adapter-faceid-plusv2_sd15", "ip-adapter-faceid-plus_sd15"])
def test_plus_tokens_are_the_reference_perceiver_with_v2_shortcut(files, name):
    w = load_faceid(str(files[1][name][0]))
    model = FaceIDProjection.from_weights(w)
    e = F.normalize(torch.randn(512), dim=0)
    clip = torch.randn(2, 257, 1280)  # face crop, zero image
    cond, uncond = person_tokens(model, w.variant, "p", e, clip)
    x = ref_mlp(w.image_proj, torch.stack([e, torch.zeros(512)]), 4)
    per = ref_perceiver(w.image_proj, x, clip)
    want = x + per if w.variant == "plusv2" else per
    torch.testing.assert_close(torch.stack([cond, uncond]), want, atol=2e-4, rtol=1e-3)
    if w.variant == "plusv2":  # out(s) = x + s·perceiver: affine in s
        o0, o1, o2 = (model(e[None], clip[:1], s) for s in (0.0, 1.0, 2.0))
        torch.testing.assert_close(o0, x[:1], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(o2 - o1, o1 - o0, atol=1e-4, rtol=1e-3)
    with pytest.raises(EmbeddingError, match="257, 1280"):
        model(e[None], torch.randn(1, 257, 1024))
    with pytest.raises(EmbeddingError, match="CLIP_VISION"):
        person_tokens(model, w.variant, "p", e, None)


# -- attention -----------------------------------------------------------------------------------------------------

def ref_attention(q, k, v, heads):
    """Explicit multi-head softmax(q kᵀ/√d) v, head by head, in float64."""
    b, nq, c = q.shape
    d = c // heads
    out = torch.zeros(b, nq, c, dtype=torch.float64)
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        w = torch.softmax(q[..., sl].double() @ k[..., sl].double().transpose(-1, -2) / math.sqrt(d), -1)
        out[..., sl] = w @ v[..., sl].double()
    return out


def rand_case(n=3, t=4, b=2, hw=(6, 8), c=64, heads=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hw[0] * hw[1], c, generator=g)
    kt, vt = torch.randn(b, 77, c, generator=g), torch.randn(b, 77, c, generator=g)
    ki, vi = torch.randn(b, n, t, c, generator=g), torch.randn(b, n, t, c, generator=g)
    return q, kt, vt, ki, vi, heads


def test_one_person_full_mask_is_the_decoupled_attention_of_the_reference():
    q, kt, vt, ki, vi, heads = rand_case(n=1)
    scale = 0.7
    region = torch.full((1, q.shape[1], 1), scale)
    got = decoupled_masked_attention(q, kt, vt, ki, vi, heads, region)
    want = ref_attention(q, kt, vt, heads) + scale * ref_attention(q, ki[:, 0], vi[:, 0], heads)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_disjoint_masks_each_person_acts_only_inside_their_own_mask():
    q, kt, vt, ki, vi, heads = rand_case(n=3, hw=(6, 9))
    nq = q.shape[1]
    owner = torch.arange(nq) % 9 // 3  # columns 0-2 → person 0, 3-5 → 1, 6-8 → 2 …
    owner[:9] = -1  # … and the first row belongs to nobody
    weights = torch.tensor([1.0, 0.5, 2.0])
    region = torch.zeros(1, nq, 3)
    for i in range(nq):
        if owner[i] >= 0:
            region[0, i, owner[i]] = weights[owner[i]]
    got = decoupled_masked_attention(q, kt, vt, ki, vi, heads, region).double()
    text = ref_attention(q, kt, vt, heads)
    for n in range(3):
        inside = owner == n
        want = text + float(weights[n]) * ref_attention(q, ki[:, n], vi[:, n], heads)
        torch.testing.assert_close(got[:, inside], want[:, inside], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[:, owner < 0], text[:, owner < 0], atol=1e-6, rtol=1e-6)


def test_overlapping_soft_masks_add_per_person_terms():
    q, kt, vt, ki, vi, heads = rand_case(n=2, b=1)
    region = torch.rand(1, q.shape[1], 2)
    got = identity_term(q, ki, vi, heads, region).double()
    want = sum(region[..., n:n + 1].double() * ref_attention(q, ki[:, n], vi[:, n], heads) for n in range(2))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_swapping_identities_swaps_regions():
    q, kt, vt, ki, vi, heads = rand_case(n=2, b=1)
    region = torch.zeros(1, q.shape[1], 2)
    region[0, :20, 0] = 1
    region[0, 28:, 1] = 1
    a = decoupled_masked_attention(q, kt, vt, ki, vi, heads, region)
    b = decoupled_masked_attention(q, kt, vt, ki.flip(1), vi.flip(1), heads, region.flip(-1))
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    swapped = decoupled_masked_attention(q, kt, vt, ki.flip(1), vi.flip(1), heads, region)
    solo = lambda n, r: decoupled_masked_attention(q, kt, vt, ki[:, n:n + 1], vi[:, n:n + 1], heads,  # noqa: E731
                                                   region[..., r:r + 1])
    torch.testing.assert_close(a[:, :20], solo(0, 0)[:, :20], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(a[:, 28:], solo(1, 1)[:, 28:], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(swapped[:, :20], solo(1, 0)[:, :20], atol=1e-6, rtol=1e-6)  # person 1 now left
    torch.testing.assert_close(swapped[:, 28:], solo(0, 1)[:, 28:], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(a[:, :20], swapped[:, :20], atol=1e-3)


def test_padded_token_groups_equal_unpadded_people():
    q, kt, vt, _, _, heads = rand_case(n=1, b=1)
    g = torch.Generator().manual_seed(5)
    toks = [torch.randn(16, 64, generator=g), torch.randn(48, 64, generator=g)]
    k_all, v_all, valid = pad_people(toks, [t * 2 for t in toks])
    assert k_all.shape == (2, 48, 64) and valid.sum(1).tolist() == [16, 48]
    region = torch.rand(1, q.shape[1], 2)
    got = identity_term(q, k_all[None], k_all[None], heads, region, valid).double()
    want = sum(region[..., n:n + 1].double() * ref_attention(q, toks[n][None], toks[n][None], heads) for n in range(2))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_bad_shapes_are_typed_errors():
    q, kt, vt, ki, vi, heads = rand_case(n=2)
    with pytest.raises(InstantFamilyError, match="region weights"):
        identity_term(q, ki, vi, heads, torch.ones(1, q.shape[1], 3))
    with pytest.raises(InstantFamilyError, match="identity keys/values"):
        identity_term(q, ki[..., :10], vi, heads, torch.ones(1, q.shape[1], 2))
