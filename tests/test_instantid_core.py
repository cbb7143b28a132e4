"""InstantID, core: the adapter file (published full-size layout, flat safetensors, reduced topologies), files of
other kinds refused by name, the Resampler against the reference math written out here, the unconditional tokens,
several photos, and Encode Identity keeping each photo's raw embedding (what InstantID reads)."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from instantfamily_core.errors import EmbeddingError, InstantFamilyError, ModelFileError, OptionError
from instantfamily_core.faceid import SDXL, Topology
from instantfamily_core.instantid import (InstantIDFileError, InstantIDResampler, load_instantid, raw_embeddings,
                                          validate)
from support import faceid_files as ff
from support import instantid_files as iid

# a reduced SDXL-like topology: one transformer in input 4 (640), output 3 (640) and the middle (1280); in
# diffusers' processor order (down, up, mid) its attn2 processors are p = 1 (640), 3 (640), 5 (1280)
TINY = Topology("tiny SDXL", 2048, {("input", 4): (640, 1, 10), ("output", 3): (640, 1, 10),
                                    ("middle", 0): (1280, 1, 20)})
TINY_WIDTHS = [640, 640, 1280]


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """The one full-size file of this module: written, measured, loaded once, deleted."""
    path = tmp_path_factory.mktemp("instantid") / "ip-adapter.bin"
    parts = iid.instantid_parts()
    iid.write_bin(path, parts)
    size = os.path.getsize(path)
    weights = load_instantid(str(path))
    path.unlink()
    return weights, parts, size


@pytest.fixture(scope="module")
def resampler(full):
    return InstantIDResampler.from_weights(full[0])


# -- files ---------------------------------------------------------------------------------------------------------

def test_published_file_loads_with_the_sdxl_layout(full):
    w, (image_proj, ip), size = full
    assert (w.base, w.context_dim, w.name, w.tokens_per_image, w.dtype) == ("SDXL", 2048, "ip-adapter.bin", 16,
                                                                            torch.float32)
    assert w.topology is SDXL
    assert len(w.image_proj) == 51 and len(w.ip_adapter) == 140
    assert sum(v.numel() for v in w.image_proj.values()) == 81_978_624
    assert sum(v.numel() for v in w.ip_adapter.values()) == 340_787_200
    assert list(w.image_proj) == list(image_proj) and list(w.ip_adapter) == list(ip)
    for k, v in list(image_proj.items()) + list(ip.items()):  # values through unchanged
        assert torch.equal((w.image_proj | w.ip_adapter)[k], v), k
    # kv_weights(p) as FaceIDWeights has it, at the note's p table, which is also the layout's order
    assert SDXL.attn2_indices == iid.SDXL_ATTN2
    for slot in SDXL.slots:
        k, v = w.kv_weights(slot.attn2)
        assert k.shape == v.shape == (iid.sdxl_hidden(slot.attn2), 2048) == (slot.hidden, 2048)
        assert k is w.ip_adapter[f"{slot.attn2}.to_k_ip.weight"] and v is w.ip_adapter[f"{slot.attn2}.to_v_ip.weight"]
    # byte size of the fixture against the published file: same data bytes, container within 0.001 %
    assert size - iid.DATA_BYTES < 100_000
    assert abs(size - iid.PUBLISHED_BYTES) / iid.PUBLISHED_BYTES < 1e-5, size


def test_flat_safetensors_flat_pickle_and_reduced_topology(tmp_path):
    parts = iid.reduced_parts(TINY_WIDTHS, seed=3)
    iid.write_safetensors(tmp_path / "ip-adapter_instant_id_sdxl.safetensors", parts)
    torch.save({f"{part}.{k}": v for part, sd in zip(("image_proj", "ip_adapter"), parts) for k, v in sd.items()},
               str(tmp_path / "flat.bin"))
    iid.write_bin(tmp_path / "nested.bin", parts)
    for name in ("ip-adapter_instant_id_sdxl.safetensors", "flat.bin", "nested.bin"):
        w = load_instantid(str(tmp_path / name), topology=TINY)
        assert (w.base, w.context_dim, w.topology) == ("tiny SDXL", 2048, TINY)
        assert sorted(w.ip_adapter) == sorted(f"{p}.to_{t}_ip.weight" for p in (1, 3, 5) for t in "kv")
        assert w.kv_weights(5)[0].shape == (1280, 2048) and w.kv_weights(3)[1].shape == (640, 2048)
        assert torch.equal(w.kv_weights(5)[1], parts[1]["5.to_v_ip.weight"])
        assert torch.equal(w.image_proj["layers.2.0.to_kv.weight"], parts[0]["layers.2.0.to_kv.weight"])
    with pytest.raises(InstantIDFileError, match=r"ip_adapter does not match the SDXL InstantID layout: 134 missing"):
        load_instantid(str(tmp_path / "nested.bin"))  # a reduced file is not an SDXL file


def _ip(*pairs, ctx=2048):
    return {f"{p}.to_{t}_ip.weight": torch.zeros(h, ctx, dtype=torch.float16) for p, h in pairs for t in "kv"}


def _z(*shape):
    return torch.zeros(*shape, dtype=torch.float16)


WRONG = {
    "ip-adapter-faceid_sdxl.bin": ((ff.image_proj(4, d=2048), {**_ip((1, 640)), "0.to_q_lora.down.weight": _z(128, 640)}),
                                   r"this is an IP-Adapter-FaceID file \(FaceID, SDXL.*load it with the FaceID loader"),
    "ip-adapter-faceid-plusv2_sdxl.bin": (({"proj.0.weight": _z(1024, 512), "perceiver_resampler.proj_in.weight":
                                            _z(2048, 1280)}, _ip((1, 640))),
                                          r"IP-Adapter-FaceID file \(Plus, SDXL.*FaceID loader"),
    "ip-adapter-faceid-portrait_sd15.bin": ((ff.image_proj(16), _ip((1, 320), ctx=768)),
                                            r"IP-Adapter-FaceID file \(Portrait, SD1.5.*FaceID loader"),
    "ip-adapter-plus-face_sd15.bin": (({"latents": _z(1, 16, 768), "proj_in.weight": _z(768, 1280)},
                                       _ip((1, 320), ctx=768)),
                                      r"SD1.5 adapter \(an IP-Adapter Plus \(CLIP image resampler reading 1280-d CLIP "
                                      r"features\); it reads 768-d text\), not InstantID; InstantID is for SDXL"),
    "instantid_sd15.bin": (({"latents": _z(1, 16, 768), "proj_in.weight": _z(768, 512)}, _ip((1, 320), ctx=768)),
                           r"SD1.5 adapter \(InstantID-like resampler; it reads 768-d text\)"),
    "ip-adapter-plus_sdxl_vit-h.bin": (({"latents": _z(1, 16, 1280), "proj_in.weight": _z(1280, 1280),
                                         "proj_out.weight": _z(2048, 1280)}, _ip((1, 640))),
                                       r"this is an IP-Adapter Plus \(CLIP image resampler reading 1280-d CLIP "
                                       r"features\) for SDXL, not InstantID"),
    "ip-adapter_sdxl.bin": (({"proj.weight": _z(8192, 1280), "norm.weight": _z(2048)}, _ip((1, 640))),
                            r"this is an IP-Adapter \(CLIP image projection\) for SDXL, not InstantID"),
    "instantid_sd2.bin": (({"latents": _z(1, 16, 1280), "proj_in.weight": _z(1280, 512)}, _ip((1, 320), ctx=1024)),
                          r"reads 1024-d text, but InstantID on SDXL .* needs 2048-d"),
}


@pytest.mark.parametrize("name", list(WRONG))
def test_other_adapters_are_refused_by_name(tmp_path, name):
    parts, message = WRONG[name]
    iid.write_bin(tmp_path / name, parts)
    with pytest.raises(InstantIDFileError, match=message):
        load_instantid(str(tmp_path / name))


FLAT = {
    "diffusion_pytorch_model.safetensors": ({"controlnet_cond_embedding.conv_in.weight": _z(16, 3, 3, 3),
                                             "controlnet_down_blocks.0.weight": _z(320, 320, 1, 1)},
                                            r"this is a ControlNet \(InstantID's IdentityNet is one\).*ControlNet "
                                            r"loader.*ip-adapter.bin from InstantX/InstantID"),
    "control_v11p_sd15_openpose.pth": ({"control_model.zero_convs.0.0.weight": _z(320, 320, 1, 1)},
                                       "this is a ControlNet"),
    "ip-adapter-faceid_sdxl_lora.safetensors": (
        {"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": _z(128, 2048)},
        "this is a LoRA, not InstantID's adapter; load it with a LoRA loader"),
    "pytorch_lora_weights.bin": (
        {"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora.down.weight": _z(4, 2048)},
        "this is a LoRA"),
    "sd_xl_base_1.0.safetensors": ({"model.diffusion_model.input_blocks.0.0.weight": _z(320, 4, 3, 3)},
                                   "this is a Stable Diffusion checkpoint"),
    "something.safetensors": ({"foo.weight": _z(3)}, r"no 'image_proj'/'ip_adapter' parts \(found e.g. \['foo"),
}


@pytest.mark.parametrize("name", list(FLAT))
def test_controlnets_loras_and_checkpoints_are_refused_by_name(tmp_path, name):
    from safetensors.torch import save_file
    sd, message = FLAT[name]
    path = tmp_path / name
    save_file(sd, str(path)) if name.endswith(".safetensors") else torch.save(sd, str(path))
    with pytest.raises(InstantIDFileError, match=message):
        load_instantid(str(path))


def test_broken_files_and_layouts_name_the_problem(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("should never run",))
    torch.save({"image_proj": {"x": Evil()}, "ip_adapter": {}}, str(tmp_path / "evil.bin"))
    with pytest.raises(InstantIDFileError, match="weights_only"):
        load_instantid(str(tmp_path / "evil.bin"))
    (tmp_path / "junk.bin").write_bytes(b"not a pickle")
    with pytest.raises(InstantIDFileError, match="junk.bin: cannot read"):
        load_instantid(str(tmp_path / "junk.bin"))
    with pytest.raises(InstantIDFileError, match="file not found"):
        load_instantid(str(tmp_path / "nope.bin"))
    (tmp_path / "ip-adapter.onnx").write_bytes(b"x")
    with pytest.raises(InstantIDFileError, match=r"expected InstantID's ip-adapter.bin .* got a .onnx file"):
        load_instantid(str(tmp_path / "ip-adapter.onnx"))
    image_proj, ip = iid.reduced_parts(TINY_WIDTHS)
    torch.save({"image_proj": image_proj}, str(tmp_path / "half.bin"))
    with pytest.raises(InstantIDFileError, match=r"has \['image_proj'\] but .* both"):
        load_instantid(str(tmp_path / "half.bin"))

    def refused(image_proj, ip, message):
        with pytest.raises(InstantIDFileError, match=message):
            validate(image_proj, ip, "x.bin", TINY)
    refused({k: v for k, v in image_proj.items() if k != "layers.3.1.3.weight"}, ip,
            r"x.bin: image_proj does not match the tiny SDXL InstantID layout: 1 missing \(e.g. \['layers.3.1.3.weight")
    refused(image_proj | {"layers.4.0.norm1.weight": torch.ones(1280)}, ip, r"1 unexpected \(e.g. \['layers.4.0")
    refused(image_proj, ip | {"5.to_k_ip.weight": ip["1.to_k_ip.weight"]},
            r"ip_adapter does not match .* wrong shapes: \['5.to_k_ip.weight \(640, 2048\) \(expected \(1280, 2048\)")
    refused(image_proj, {k: v for k, v in ip.items() if k != "3.to_v_ip.weight"}, r"1 missing \(e.g. \['3.to_v_ip")
    refused(image_proj | {"latents": torch.zeros(1, 8, 1280)}, ip, "resampler with 8 tokens")
    nan = image_proj["proj_in.bias"].clone()
    nan[3] = float("nan")
    refused(image_proj | {"proj_in.bias": nan}, ip, "image_proj.proj_in.bias contains NaN")
    refused(image_proj, ip | {"1.to_k_ip.weight": torch.zeros(640, 2048, dtype=torch.int8)}, "int8, expected floating")
    assert issubclass(InstantIDFileError, ModelFileError) and issubclass(InstantIDFileError, InstantFamilyError)


# -- resampler -----------------------------------------------------------------------------------------------------

def ref_resampler(sd, x):
    """InstantID's Resampler, written out (float64): latents repeat, proj_in, per layer PerceiverAttention (q from
    norm2(latents), k/v from cat(norm1(x), norm2(latents)), q and k each × 64^-¼, softmax per head) + residual,
    FeedForward + residual; norm_out(proj_out(latents))."""
    g = lambda k: sd[k].double()  # noqa: E731
    latents = g("latents").repeat(x.shape[0], 1, 1)
    x = x.double() @ g("proj_in.weight").T + g("proj_in.bias")
    for i in range(4):
        a, f = f"layers.{i}.0.", f"layers.{i}.1."
        xn = F.layer_norm(x, (1280,), g(a + "norm1.weight"), g(a + "norm1.bias"))
        ln = F.layer_norm(latents, (1280,), g(a + "norm2.weight"), g(a + "norm2.bias"))
        q = ln @ g(a + "to_q.weight").T
        kv = torch.cat([xn, ln], 1) @ g(a + "to_kv.weight").T
        k, v = kv[..., :1280], kv[..., 1280:]
        s = 64 ** -0.25
        outs = []
        for h in range(20):
            sl = slice(64 * h, 64 * h + 64)
            w = torch.softmax((q[..., sl] * s) @ (k[..., sl] * s).transpose(-1, -2), -1)
            outs.append(w @ v[..., sl])
        latents = torch.cat(outs, -1) @ g(a + "to_out.weight").T + latents
        y = F.layer_norm(latents, (1280,), g(f + "0.weight"), g(f + "0.bias"))
        latents = F.gelu(y @ g(f + "1.weight").T) @ g(f + "3.weight").T + latents
    out = latents @ g("proj_out.weight").T + g("proj_out.bias")
    return F.layer_norm(out, (2048,), g("norm_out.weight"), g("norm_out.bias"))


def _close(a, b):
    torch.testing.assert_close(a.double(), b, atol=2e-4, rtol=1e-4)


def test_resampler_loads_strictly_and_is_the_reference_math(full, resampler):
    w = full[0]
    assert sorted(resampler.state_dict()) == sorted(w.image_proj)
    e = torch.randn(2, 512, generator=torch.Generator().manual_seed(1)) * 1.5  # raw: norm ≈ 34
    _close(resampler(e[:, None]), ref_resampler(w.image_proj, e[:, None]))
    t = resampler.tokens(e[0])
    assert t.shape == (16, 2048) and t.dtype == torch.float32
    _close(t, ref_resampler(w.image_proj, e[:1, None])[0])
    assert not torch.allclose(t, resampler.tokens(e[1]), atol=1e-2)
    with torch.device("meta"):
        empty = InstantIDResampler()
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"latents\""):
        empty.load_state_dict({k: v for k, v in w.image_proj.items() if k != "latents"}, assign=True)


def test_several_photos_are_averaged_raw_first(full, resampler):
    e = torch.randn(3, 512, generator=torch.Generator().manual_seed(2)) * 1.5
    want = ref_resampler(full[0].image_proj, e.mean(0).reshape(1, 1, 512))[0]  # mean of raw embeddings, no renorm
    _close(resampler.tokens(e), want)
    _close(resampler.tokens([e[0], e[1].numpy(), e[2]]), want)  # a list of per-photo embeddings, as extra keeps them
    assert not torch.allclose(resampler.tokens(e), resampler.tokens(F.normalize(e.mean(0), dim=0) * 30), atol=1e-3)


def test_uncond_tokens_are_the_resampler_of_zeros_or_seeded_uniform_noise(full, resampler):
    sd = full[0].image_proj
    zero = resampler.uncond_tokens()
    assert zero.shape == (16, 2048)
    _close(zero, ref_resampler(sd, torch.zeros(1, 1, 512))[0])  # the reference's negative: not zero tokens
    assert zero.abs().mean() > 0.1
    a, b = resampler.uncond_tokens(0.35, seed=7), resampler.uncond_tokens(0.35, seed=7)
    assert torch.equal(a, b)  # deterministic
    noise = 0.35 * torch.rand(512, generator=torch.Generator().manual_seed(7))  # the documented rule
    _close(a, ref_resampler(sd, noise.reshape(1, 1, 512))[0])
    assert not torch.allclose(a, zero, atol=1e-3)
    assert not torch.allclose(a, resampler.uncond_tokens(0.35, seed=8), atol=1e-4)
    for bad in (-0.1, float("nan")):
        with pytest.raises(OptionError, match="noise: expected a number ≥ 0"):
            resampler.uncond_tokens(bad)


def test_embeddings_are_checked(caplog):
    with pytest.raises(EmbeddingError, match=r"ann: InstantID needs 512-d antelopev2 face embeddings, got shape \(1, 128"):
        raw_embeddings(torch.ones(128), "ann")
    with pytest.raises(EmbeddingError, match="NaN"):
        raw_embeddings(torch.full((512,), float("nan")))
    with pytest.raises(EmbeddingError, match="all zeros"):
        raw_embeddings([torch.ones(512), torch.zeros(512)])
    with pytest.raises(EmbeddingError, match="no face embeddings"):
        raw_embeddings([])
    with caplog.at_level(logging.WARNING, logger="instantfamily_core.instantid.resampler"):
        raw_embeddings(F.normalize(torch.randn(2, 512), dim=1), "bob")
    assert "bob: the face embeddings are L2-normalised" in caplog.text


# -- raw embeddings from Encode Identity's analyzer -----------------------------------------------------------------

def test_encode_identity_keeps_each_photos_raw_embedding(tmp_path_factory):
    from insightface.model_zoo import get_model

    from instantfamily_core.faces import FaceAnalyzer
    from instantfamily_core.identity import IdentityFeatures
    from tools.devkit.face_models import draw_faces, session_tiny_root
    analyzer = FaceAnalyzer(session_tiny_root(tmp_path_factory), "tinypack", provider="CPU", det_size=640)
    blue, green = (0, 0, 255), (0, 255, 0)
    photos = [draw_faces((640, 640), [(320, 320)], [blue]), draw_faces((512, 640), [(192, 256)], [green])]
    ident = analyzer.encode(photos, name="ann")
    raws, normed = ident.extra["raw_embeddings"], ident.extra["faceid_embeddings"]
    assert len(raws) == len(normed) == 2
    rec = get_model(str(analyzer.recognizer_file), providers=["CPUExecutionProvider"])  # insightface's own ArcFace
    rec.prepare(ctx_id=-1)
    for photo, raw, n in zip(photos, raws, normed):
        face = analyzer.detect(photo)[0]
        assert raw.dtype == torch.float32 and raw.shape == (512,)
        np.testing.assert_array_equal(raw.numpy(), face.raw_embedding)
        # Face.embedding as insightface computes it on the same aligned crop (BGR in), un-normalised ...
        np.testing.assert_allclose(raw.numpy(), rec.get_feat(np.ascontiguousarray(face.crop[:, :, ::-1]))[0],
                                   rtol=1e-5, atol=1e-5)
        assert abs(float(raw.norm()) - 1) > 0.1
        torch.testing.assert_close(raw / raw.norm(), n)  # ... whose L2 norm is FaceID's normed_embedding
    assert not torch.equal(raws[0], raws[1])
    one = analyzer.encode(photos[0], name="ann")
    both = IdentityFeatures.average([one, ident], name="ann")  # per-photo lists concatenate
    assert len(both.extra["raw_embeddings"]) == 3 and torch.equal(both.extra["raw_embeddings"][2], raws[1])
