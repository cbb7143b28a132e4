"""The FaceID mode of the generate CLI (``training/generate.py --faceid``, :mod:`training.faceid`,
:mod:`training.sdxl`) on tiny random diffusers models with an SD1.5-like and an SDXL-like topology.

Fixtures are written in the published layouts by code in this file, independent of the loaders under test: an SD1.5
single file (``support.sd15_writers``), an SDXL single file in the SGM layout (UNet/VAE by LDM names + the
``label_emb`` SDXL adds, CLIP-L under ``conditioner.embedders.0.transformer.text_model.``, OpenCLIP-bigG under
``conditioner.embedders.1.model.`` with fused ``in_proj`` weights, OpenCLIP's module names), FaceID files for the
tiny topologies (``support.faceid_files.reduced_parts``, widths read from diffusers' ``attn_processors``), an SD1.5
OpenPose ControlNet in the ldm layout (``control_model.*``, ``.pth``), an SDXL one with diffusers keys (thibaud /
xinsir), and a ViT-H-wide CLIP vision file with transformers names (ComfyUI's ``clip_vision`` layout).

The attention is checked against the decoupled cross-attention written out here (explicit softmaxes, the LoRA as
``W + up·down`` unmerged, float64): ``to_out(softmax(QK_tᵀ/√d)V_t + s·softmax(QK_ipᵀ/√d)V_ip)``."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from support.sdxl_files import SDXL_CONTROLNET_CONFIG
from test_generate import SIZE, write_cases

pytest.importorskip("diffusers", reason="the generate CLI needs diffusers: pip install diffusers accelerate")

STEPS = 3
SDXL_TINY_UNET = {"block_out_channels": [32, 64, 128], "attention_head_dim": [2, 4, 8],
                  "transformer_layers_per_block": [1, 1, 2], "addition_time_embed_dim": 8,
                  "projection_class_embeddings_input_dim": 32 + 6 * 8, "sample_size": 8}
SDXL_TINY_TEXT = {"vocab_size": 514, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "bos_token_id": 512, "eos_token_id": 513, "pad_token_id": 513}
VIT_H = {"hidden_size": 1280, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 16,
         "image_size": 224, "patch_size": 14, "projection_dim": 32, "hidden_act": "gelu"}
# thibaud/controlnet-openpose-sdxl-1.0 config.json (notes: sdxl-weights.md §3), its weight-relevant entries
THIBAUD_CONFIG = {k: v for k, v in SDXL_CONTROLNET_CONFIG.items() if not k.startswith("_")}


# ---------------------------------------------------------------------------------------------------------------
# writers (the inverse of the loaders, written from the published layouts)

def attn2_widths(unet) -> list[int]:
    """Width of each attn2 in diffusers' ``attn_processors`` order (what the reference's ModuleList indexes)."""
    return [unet.get_submodule(k[:-len(".processor")]).to_q.out_features for k in unet.attn_processors
            if k.endswith("attn2.processor")]


def openclip_text_state(model) -> dict:
    """A transformers ``CLIPTextModelWithProjection`` under OpenCLIP's names (``open_clip.CLIP.transformer``…)."""
    sd = {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in model.state_dict().items()}
    out = {"token_embedding.weight": sd["embeddings.token_embedding.weight"],
           "positional_embedding": sd["embeddings.position_embedding.weight"],
           "ln_final.weight": sd["final_layer_norm.weight"], "ln_final.bias": sd["final_layer_norm.bias"],
           "text_projection": sd["text_projection.weight"].T.contiguous(), "logit_scale": torch.tensor(math.log(100))}
    for i in range(model.config.num_hidden_layers):
        a, b = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        out[b + "attn.in_proj_weight"] = torch.cat([sd[a + f"self_attn.{x}_proj.weight"] for x in "qkv"])
        out[b + "attn.in_proj_bias"] = torch.cat([sd[a + f"self_attn.{x}_proj.bias"] for x in "qkv"])
        for src, dst in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                         ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
            out[b + dst + ".weight"] = sd[a + src + ".weight"]
            out[b + dst + ".bias"] = sd[a + src + ".bias"]
    return out


def sdxl_unet_to_ldm(unet) -> dict:
    from support.sd15_writers import unet_to_ldm
    sd = dict(unet.state_dict())
    add = {k: sd.pop(k) for k in list(sd) if k.startswith("add_embedding.")}
    out = unet_to_ldm(sd, unet.config)
    for k, v in add.items():
        out[k.replace("add_embedding.linear_1.", "label_emb.0.0.").replace("add_embedding.linear_2.", "label_emb.0.2.")] = v
    return out


def save_sdxl_single_file(comps, path) -> Path:
    """The SGM single-file layout of sd_xl_base_1.0.safetensors."""
    from safetensors.torch import save_file

    from support.sd15_writers import vae_to_ldm
    t = {f"model.diffusion_model.{k}": v for k, v in sdxl_unet_to_ldm(comps.unet).items()}
    t.update({f"first_stage_model.{k}": v for k, v in vae_to_ldm(comps.vae.state_dict(), comps.vae.config).items()})
    for k, v in comps.text_encoder.state_dict().items():
        t["conditioner.embedders.0.transformer." + (k if k.startswith("text_model.") else "text_model." + k)] = v
    t["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    t.update({f"conditioner.embedders.1.model.{k}": v for k, v in openclip_text_state(comps.text_encoder_2).items()})
    save_file({k: v.detach().contiguous() for k, v in t.items()}, str(path))
    return Path(path)


def controlnet_to_ldm(cn, unet_config) -> dict:
    """A diffusers ControlNet under ControlNet-v1.1's ldm names (``control_model.`` prefix)."""
    from support.sd15_writers import unet_to_ldm
    sd = dict(cn.state_dict())
    out = {}
    hint = {"controlnet_cond_embedding.conv_in.": "input_hint_block.0.",
            "controlnet_cond_embedding.conv_out.": "input_hint_block.14."}
    hint.update({f"controlnet_cond_embedding.blocks.{i}.": f"input_hint_block.{2 * (i + 1)}." for i in range(6)})
    for k in list(sd):
        for a, b in hint.items():
            if k.startswith(a):
                out[b + k[len(a):]] = sd.pop(k)
        if k.startswith("controlnet_down_blocks."):
            i, rest = k[len("controlnet_down_blocks."):].split(".", 1)
            out[f"zero_convs.{i}.0.{rest}"] = sd.pop(k)
        elif k.startswith("controlnet_mid_block."):
            out["middle_block_out.0." + k[len("controlnet_mid_block."):]] = sd.pop(k)
    out.update(unet_to_ldm(sd, dict(cn.config, up_block_types=unet_config["up_block_types"])))
    return {f"control_model.{k}": v.contiguous() for k, v in out.items()}


@torch.no_grad()
def random_zero_convs(cn, seed: int):
    g = torch.Generator().manual_seed(seed)
    for name, m in cn.named_modules():
        if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")) \
                and isinstance(m, torch.nn.Conv2d):
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.05)
            m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.05)
    return cn


def write_sdxl_config_dir(folder: Path) -> Path:
    """Tiny configs laid out like training/configs/sdxl (SDXL's block types and text widths 768 + 1280 = 2048)."""
    from support.tiny_sd15 import TINY_VAE, write_tiny_tokenizer
    from training.sdxl import CONFIG_DIR
    for sub, extra in (("unet", SDXL_TINY_UNET), ("vae", TINY_VAE), ("text_encoder", SDXL_TINY_TEXT),
                       ("text_encoder_2", dict(SDXL_TINY_TEXT, projection_dim=32))):
        cfg = json.loads((CONFIG_DIR / sub / "config.json").read_text())
        cfg.update(extra)
        (folder / sub).mkdir(parents=True, exist_ok=True)
        (folder / sub / "config.json").write_text(json.dumps(cfg))
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text((CONFIG_DIR / "scheduler" /
                                                                 "scheduler_config.json").read_text())
    write_tiny_tokenizer(folder / "tokenizer")
    return folder


def build_sdxl(folder: Path, seed: int = 0):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from training import sd15, sdxl
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(folder / "unet")))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(folder / "vae")))
    t1 = CLIPTextModel(CLIPTextConfig.from_pretrained(str(folder / "text_encoder")))
    t2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(str(folder / "text_encoder_2")))
    tok, tok2 = sdxl.tokenizers_for(None, None, folder)
    for m in (unet, vae, t1, t2):
        m.requires_grad_(False).eval()
    return sdxl.SDXLComponents(unet, vae, t1, t2, tok, tok2, sd15.read_scheduler_config(folder))


# ---------------------------------------------------------------------------------------------------------------
# fixtures

@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    from safetensors.torch import save_file
    from diffusers import ControlNetModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from support.faceid_files import reduced_parts, write_bin
    from support.sd15_writers import save_single_file
    from support.tiny_sd15 import build_from_configs, write_tiny_config_dir
    from tools.devkit.face_models import session_tiny_root
    root = tmp_path_factory.mktemp("faceid-generate")
    w: dict = {"root": root, "face_root": session_tiny_root(tmp_path_factory)}
    # SD1.5-like: CrossAttnDown ×2, one transformer each, 768-d text
    cfg15 = write_tiny_config_dir(root / "sd15-config")
    sd15 = build_from_configs(cfg15, seed=1)
    w["sd15"] = {"config": cfg15, "file": save_single_file(sd15, root / "tiny-sd15.safetensors"), "comps": sd15}
    # SDXL-like: DownBlock2D + CrossAttn ×2, 1/2 transformers per block, 768 + 1280 = 2048-d text, pooled + time ids
    cfgxl = write_sdxl_config_dir(root / "sdxl-config")
    xl = build_sdxl(cfgxl, seed=2)
    w["sdxl"] = {"config": cfgxl, "file": save_sdxl_single_file(xl, root / "tiny-sdxl.safetensors"), "comps": xl}
    # FaceID files for those topologies, in the published layout
    ipa = root / "ipadapter"
    ipa.mkdir()
    w15, wxl = attn2_widths(sd15.unet), attn2_widths(xl.unet)
    files = {"sd15": ("ip-adapter-faceid_sd15_tiny.bin", reduced_parts(w15, "faceid", 3, d=768)),
             "sd15-portrait": ("ip-adapter-faceid-portrait-v11_sd15_tiny.bin", reduced_parts(w15, "portrait", 4, d=768)),
             "sd15-plus": ("ip-adapter-faceid-plusv2_sd15_tiny.bin", reduced_parts(w15, "plus", 5, d=768)),
             "sdxl": ("ip-adapter-faceid_sdxl_tiny.bin", reduced_parts(wxl, "faceid", 6, d=2048))}
    for key, (name, parts) in files.items():
        write_bin(ipa / name, parts)
        w[f"faceid-{key}"] = ipa / name
    # OpenPose ControlNets: SD1.5 in ControlNet-v1.1's ldm .pth layout, SDXL with diffusers keys (thibaud/xinsir)
    torch.manual_seed(7)
    cn15 = random_zero_convs(ControlNetModel.from_unet(sd15.unet), 8).eval()
    torch.save(controlnet_to_ldm(cn15, sd15.unet.config), str(root / "control_v11p_sd15_openpose_tiny.pth"))
    cnxl = random_zero_convs(ControlNetModel.from_unet(xl.unet), 9).eval()
    save_file({k: v.contiguous() for k, v in cnxl.state_dict().items()}, str(root / "OpenPoseXL2_tiny.safetensors"))
    w.update(cn15=cn15, cnxl=cnxl, cn15_file=root / "control_v11p_sd15_openpose_tiny.pth",
             cnxl_file=root / "OpenPoseXL2_tiny.safetensors")
    # a ViT-H-wide CLIP vision model, saved with transformers names like ComfyUI's clip_vision file
    torch.manual_seed(10)
    vit = CLIPVisionModelWithProjection(CLIPVisionConfig(**VIT_H)).eval()
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(root / "CLIP-ViT-H-14-tiny.safetensors"))
    w.update(vit=vit, vit_file=root / "CLIP-ViT-H-14-tiny.safetensors")
    w["cases"] = write_cases(root, solo=False)  # test_generate's pose case and boxes case
    return w


def cli_args(ws, base: str, faceid: str, out, *extra, controlnet=True):
    b = ws[base]
    args = ["--cases", str(ws["cases"]), "--faceid", str(ws[f"faceid-{faceid}"]), "--base", str(b["file"]),
            "--config-dir", str(b["config"]), "--face-root", str(ws["face_root"]), "--face-pack", "tinypack",
            "--det-size", "256", "--out", str(out), "--width", str(SIZE), "--height", str(SIZE),
            "--steps", str(STEPS), "--no-progress", *extra]
    if controlnet:
        args += ["--controlnet", str(ws["cn15_file" if base == "sd15" else "cnxl_file"])]
    return args


def _load(ws, base):
    from training import generate
    b = ws[base]
    return generate.load_any_base(b["file"], None, b["config"], torch.float32)


def _weights(ws, base, faceid, comps):
    from training import faceid as fid
    topo = fid.diffusers_topology(comps.unet)
    return topo, fid.load_faceid_for(ws[f"faceid-{faceid}"], topo, "tiny")


# ---------------------------------------------------------------------------------------------------------------
# layout facts: processor order, published topologies, loaders

@pytest.mark.parametrize("config", ["sd15", "sdxl"])
def test_published_topology_slots_are_diffusers_processor_order(config):
    """The core's published SD1.5 / SDXL topologies, slot by slot, are diffusers' ``attn_processors`` of the real
    UNet configs (built on the meta device): p = position ⇔ ``slot.attention_path``; widths and heads agree; the
    topology read from the diffusers UNet is the published one."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from instantfamily_core.faceid import SD15, SDXL
    from training import faceid as fid
    from training.sd15 import CONFIG_DIR as SD15_DIR
    from training.sdxl import CONFIG_DIR as SDXL_DIR
    published = {"sd15": SD15, "sdxl": SDXL}[config]
    folder = {"sd15": SD15_DIR, "sdxl": SDXL_DIR}[config]
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(folder / "unet")))
    names = list(unet.attn_processors)
    assert names == [f"{s.attention_path(w)}.processor" for s in published.slots for w in (1, 2)]
    assert len(names) == {"sd15": 32, "sdxl": 140}[config]
    for s in published.slots:
        a = unet.get_submodule(s.attention_path(2))
        assert (a.to_q.out_features, a.heads, a.to_k.in_features) == (s.hidden, s.heads, published.context_dim)
    live = fid.diffusers_topology(unet)
    assert live.differences(published) == [] and [s.block for s in live.slots] == [s.block for s in published.slots]


@pytest.mark.parametrize("base", ["sd15", "sdxl"])
def test_tiny_topologies_and_single_files_load(ws, base):
    """The tiny bases load from their single files to the written weights; the topology read from the UNet puts
    slot b at diffusers' processor position 2b/2b+1."""
    from training import faceid as fid
    kind, comps = _load(ws, base)
    assert kind == {"sd15": "SD1.5", "sdxl": "SDXL"}[base]
    ref = ws[base]["comps"]
    parts = [("unet", comps.unet, ref.unet), ("vae", comps.vae, ref.vae), ("text", comps.text_encoder,
                                                                             ref.text_encoder)]
    if base == "sdxl":
        parts.append(("text2", comps.text_encoder_2, ref.text_encoder_2))
    for what, got, want in parts:
        g, w = got.state_dict(), want.state_dict()
        assert set(g) == set(w), what
        for k in w:
            assert torch.equal(g[k], w[k]), (what, k)
    topo = fid.diffusers_topology(comps.unet)
    assert list(comps.unet.attn_processors) == [f"{s.attention_path(w)}.processor" for s in topo.slots
                                                for w in (1, 2)]
    assert [s.hidden for s in topo.slots] == attn2_widths(comps.unet)
    fid.check_processor_order(comps.unet, topo)


def test_published_sdxl_single_file_layout_loads(monkeypatch):
    """Every tensor of sd_xl_base_1.0's single-file layout — its key names and shapes as ComfyUI writes them
    (``BaseModel.state_dict_for_saving`` of its SDXL UNet, ``SDXLClipModel`` and VAE, on the meta device) — lands
    in the shipped training/configs/sdxl components (strict key and shape match, nothing left over)."""
    from tools.devkit.comfy_host import HOW_TO_PROVIDE, find_comfyui, import_host
    if find_comfyui() is None:
        pytest.skip(HOW_TO_PROVIDE)
    import_host()
    from support.sdxl_files import sdxl_base_on_meta
    from training import sd15, sdxl
    full = sdxl_base_on_meta()[-1]
    assert len(full) == 2515
    published = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in full.items()}
    monkeypatch.setattr(sd15, "read_state_dict", lambda path, what="base model": dict(published))
    comps = sdxl.load_single_file(Path("sd_xl_base_1.0.safetensors"), sdxl.CONFIG_DIR, (None, None), torch.float16)
    counts = [sum(p.numel() for p in m.parameters()) for m in (comps.unet, comps.vae, comps.text_encoder,
                                                               comps.text_encoder_2)]
    assert counts == [2_567_463_684, 83_653_863, 123_060_480, 694_659_840]
    # the file's floating-point parameters (notes: 3,468,837,868) all used but OpenCLIP's logit_scale
    stored = sum(v.numel() for v in full.values() if v.is_floating_point())
    assert stored == 3_468_837_868 and stored - sum(counts) == 1
    assert [k for k, v in full.items() if v.numel() == 1] == ["conditioner.embedders.1.model.logit_scale"]


def test_sdxl_text_conditioning(ws):
    """Context = both encoders' penultimate states side by side (768 + 1280), pooled = the projected output of the
    second at its end token; the second tokenizer pads with '!'; time ids = (h, w, 0, 0, h, w)."""
    from training import sdxl
    comps = ws["sdxl"]["comps"]
    ctx, pooled = sdxl.encode_prompts(comps, ["a b", ""])
    assert ctx.shape == (2, 77, 2048) and pooled.shape == (2, 32)
    ids1 = comps.tokenizer(["a b"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    ids2 = comps.tokenizer_2(["a b"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids2[0, -1] == comps.tokenizer_2.convert_tokens_to_ids("!") and ids1[0, -1] == 513
    h1 = comps.text_encoder(ids1, output_hidden_states=True).hidden_states[-2]
    out2 = comps.text_encoder_2(ids2, output_hidden_states=True)
    torch.testing.assert_close(ctx[:1], torch.cat([h1, out2.hidden_states[-2]], -1))
    torch.testing.assert_close(pooled[:1], out2.text_embeds)
    assert sdxl.time_ids(96, 64, 2).tolist() == [[96, 64, 0, 0, 96, 64]] * 2


def test_controlnets_load_from_published_layouts(ws):
    """SD1.5's ldm ``control_model.*`` .pth and SDXL's diffusers-key file give back the ControlNets written; the
    SDXL ControlNet built from the SDXL UNet config has exactly thibaud's published tensors."""
    from accelerate import init_empty_weights
    from diffusers import ControlNetModel, UNet2DConditionModel

    from training import faceid as fid
    from training.sdxl import CONFIG_DIR
    for base, file, ref in (("sd15", ws["cn15_file"], ws["cn15"]), ("sdxl", ws["cnxl_file"], ws["cnxl"])):
        cn = fid.load_openpose_controlnet(file, ws[base]["comps"].unet, "tiny")
        got, want = cn.state_dict(), ref.state_dict()
        assert set(got) == set(want)
        assert all(torch.equal(got[k], want[k]) for k in want), base
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(CONFIG_DIR / "unet")))
        ours = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
        thibaud = ControlNetModel(**THIBAUD_CONFIG)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in thibaud.state_dict().items()}
    assert len(thibaud.state_dict()) == 844
    assert [m.heads for m in ours.modules() if type(m).__name__ == "Attention"] == \
        [m.heads for m in thibaud.modules() if type(m).__name__ == "Attention"]


# ---------------------------------------------------------------------------------------------------------------
# the attention

def _reference_attention(attn, lora: dict, h, c, tokens, kip, vip, scale):
    """The decoupled cross-attention written out (float64): LoRA unmerged, two separate softmaxes."""
    def lin(name, x):
        layer = attn.to_out[0] if name == "to_out" else getattr(attn, name)
        w = layer.weight.double()
        if name in lora:
            down, up = lora[name]
            w = w + up.double() @ down.double()
        y = x.double() @ w.T
        return y + layer.bias.double() if layer.bias is not None else y

    heads = attn.heads
    q, kt, vt = lin("to_q", h), lin("to_k", c), lin("to_v", c)
    b, n, width = q.shape
    d = width // heads

    def split(x):
        return x.reshape(x.shape[0], x.shape[1], heads, d).transpose(1, 2)

    def att(k, v):
        w = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(d), dim=-1)
        return (w @ split(v)).transpose(1, 2).reshape(b, n, width)

    out = att(kt, vt)
    if tokens is not None:
        ki, vi = tokens.double() @ kip.double().T, tokens.double() @ vip.double().T
        out = out + scale * att(ki.expand(b, -1, -1), vi.expand(b, -1, -1))
    return lin("to_out", out)


@pytest.mark.parametrize("base,faceid", [("sd15", "sd15"), ("sdxl", "sdxl")])
def test_processor_is_the_reference_decoupled_attention(ws, base, faceid):
    """N = 1, full mask, weight s: every attn2 after the LoRA merge + FaceID processor equals the reference
    ``to_out(softmax(QK_tᵀ/√d)V_t + s·softmax(QK_ipᵀ/√d)V_ip)`` with ``W + up·down`` everywhere; attn1 is
    plain attention with its merged LoRA."""
    from training import faceid as fid
    _, comps = _load(ws, base)
    topo, weights = _weights(ws, base, faceid, comps)
    before = {n: m.weight.detach().clone() for n, m in comps.unet.named_modules() if isinstance(m, torch.nn.Linear)}
    assert fid.merge_lora(comps.unet, weights, topo, 1.0) == 8 * len(topo.slots)
    fid.install_faceid(comps.unet, weights, topo)
    pairs = fid.lora_pairs(weights)
    g = torch.Generator().manual_seed(0)
    d = topo.context_dim
    tokens = torch.randn(1, 4, d, generator=g)
    scale = 0.7
    for slot in topo.slots[:: max(1, len(topo.slots) // 5)] + (topo.slots[-1],):
        for which in (1, 2):
            p = 2 * slot.index + which - 1
            attn = comps.unet.get_submodule(slot.attention_path(which))
            # the merge: W_merged = W + up·down, checked on the live layers
            for t in ("to_q", "to_k", "to_v", "to_out"):
                lin = attn.to_out[0] if t == "to_out" else getattr(attn, t)
                name = slot.attention_path(which) + (".to_out.0" if t == "to_out" else f".{t}")
                down, up = pairs[(p, t)]
                torch.testing.assert_close(lin.weight, before[name] + up.float() @ down.float(), rtol=1e-5,
                                           atol=1e-6)
            # unmerge into a reference copy of the original weights
            ref = {t: pairs[(p, t)] for t in ("to_q", "to_k", "to_v", "to_out")}
            h = torch.randn(2, 6, slot.hidden, generator=g)
            c = torch.randn(2, 5, d if which == 2 else slot.hidden, generator=g)
            state = fid.FaceIDContext(tokens[None].expand(2, -1, -1, -1), torch.ones(2, 1, 2, 3),
                                      torch.tensor([scale]), (2, 3))
            got = attn(h, encoder_hidden_states=c if which == 2 else None, faceid=state)
            orig = _OrigWeights(attn, before, slot.attention_path(which))
            with orig:
                if which == 2:
                    kip, vip = weights.kv_weights(p)
                    want = _reference_attention(attn, ref, h, c, tokens, kip.float(), vip.float(), scale)
                else:
                    want = _reference_attention(attn, ref, h, h, None, None, None, 0.0)
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


class _OrigWeights:
    """Temporarily put the pre-merge weights back into an attention module (for the unmerged reference)."""

    def __init__(self, attn, before: dict, path: str):
        self.items = [(attn.to_out[0] if t == "to_out" else getattr(attn, t),
                       before[path + (".to_out.0" if t == "to_out" else f".{t}")])
                      for t in ("to_q", "to_k", "to_v", "to_out")]

    def __enter__(self):
        self.saved = [lin.weight.data for lin, _ in self.items]
        for lin, w in self.items:
            lin.weight.data = w
        return self

    def __exit__(self, *exc):
        for (lin, _), w in zip(self.items, self.saved):
            lin.weight.data = w


def _attn2_call(attn, h, c, tokens, masks, weights, hw):
    from training import faceid as fid
    state = fid.FaceIDContext(tokens, masks, torch.tensor(weights), hw)
    return attn(h, encoder_hidden_states=c, faceid=state)


def test_locality_and_swapping_at_the_processor(ws):
    """Two people with disjoint masks on a 4×4 feature map: changing person 1's identity changes the output only
    inside mask 1; swapping identities together with their masks changes nothing; inside each mask the output is
    that person's single-person output; an empty mask is no identity at all."""
    from training import faceid as fid
    _, comps = _load(ws, "sdxl")
    topo, weights = _weights(ws, "sdxl", "sdxl", comps)
    fid.install_faceid(comps.unet, weights, topo)
    slot = topo.slots[0]
    attn = comps.unet.get_submodule(slot.attention_path(2))
    g = torch.Generator().manual_seed(1)
    h = torch.randn(1, 16, slot.hidden, generator=g)
    c = torch.randn(1, 7, 2048, generator=g)
    a, b, z = (torch.randn(4, 2048, generator=g) for _ in range(3))
    m = torch.zeros(2, 8, 8)
    m[0, :, :4] = 1  # left half
    m[1, :4, 4:] = 1  # top right quarter
    inside1 = m[1].reshape(4, 2, 4, 2).amax((1, 3)).flatten() > 0
    inside0 = m[0].reshape(4, 2, 4, 2).amax((1, 3)).flatten() > 0
    base = _attn2_call(attn, h, c, torch.stack([a, b])[None], m[None], [1.0, 1.0], (4, 4))
    other = _attn2_call(attn, h, c, torch.stack([a, z])[None], m[None], [1.0, 1.0], (4, 4))
    diff = (base - other).abs().amax(-1)[0]
    assert diff[inside1].min() > 1e-4 and diff[~inside1].max() == 0
    swapped = _attn2_call(attn, h, c, torch.stack([b, a])[None], m.flip(0)[None], [1.0, 1.0], (4, 4))
    torch.testing.assert_close(swapped, base, rtol=1e-5, atol=1e-6)
    solo_a = _attn2_call(attn, h, c, a[None, None], m[:1][None], [1.0], (4, 4))
    torch.testing.assert_close(base[0, inside0], solo_a[0, inside0], rtol=1e-5, atol=1e-6)
    plain = attn(h, encoder_hidden_states=c)
    outside = ~(inside0 | inside1)
    assert outside.any() and torch.equal(base[0, outside], plain[0, outside])
    empty = m.clone()
    empty[1] = 0
    torch.testing.assert_close(_attn2_call(attn, h, c, torch.stack([a, b])[None], empty[None], [1.0, 1.0], (4, 4)),
                               _attn2_call(attn, h, c, torch.stack([a, z])[None], empty[None], [1.0, 1.0], (4, 4)),
                               rtol=0, atol=0)


def test_swapping_identities_with_their_masks_leaves_the_unet_unchanged(ws):
    """At the UNet output (SDXL-like, CFG batch with uncond tokens, pooled + time ids): people in the other order
    with their masks give the same noise prediction; identities swapped over fixed masks do not."""
    from training import faceid as fid
    from training.sdxl import encode_prompts, time_ids
    _, comps = _load(ws, "sdxl")
    topo, weights = _weights(ws, "sdxl", "sdxl", comps)
    fid.merge_lora(comps.unet, weights, topo)
    fid.install_faceid(comps.unet, weights, topo)
    g = torch.Generator().manual_seed(2)
    toks = torch.randn(2, 4, 2048, generator=g)
    unc = torch.randn(2, 4, 2048, generator=g)
    m = torch.zeros(2, SIZE, SIZE)
    m[0, :, :SIZE // 2] = 1
    m[1, :, SIZE // 2:] = 1
    ctx, pooled = encode_prompts(comps, ["", "two people"])
    x = torch.randn(2, 4, 8, 8, generator=g)
    added = {"text_embeds": pooled, "time_ids": time_ids(SIZE, SIZE, 2)}

    def eps(order, masks):
        state = fid.FaceIDContext(torch.stack([unc[order], toks[order]]), torch.stack([masks, masks]),
                                  torch.ones(2), (8, 8))
        return comps.unet(x, 500, encoder_hidden_states=ctx, added_cond_kwargs=added,
                          cross_attention_kwargs=state.as_kwargs()).sample

    e = eps([0, 1], m)
    torch.testing.assert_close(eps([1, 0], m.flip(0)), e, rtol=1e-5, atol=1e-6)
    assert (eps([1, 0], m) - e).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# the generator and the CLI

def test_uncond_half_gets_the_unconditional_tokens(ws):
    """In a sampling call the first half of the CFG batch carries every person's ``proj(0)`` tokens, the second
    their identity tokens (case order kept), with the same masks on both halves; the ControlNet sees the text
    context only."""
    from instantfamily_core.faceid import FaceIDProjection
    from instantfamily_core.faces import get_analyzer
    from training import faceid as fid
    from training import generate
    kind, comps = _load(ws, "sd15")
    topo, weights = _weights(ws, "sd15", "sd15", comps)
    cn = fid.load_openpose_controlnet(ws["cn15_file"], comps.unet, "tiny")
    gen = generate.FaceIDGenerator(kind, comps, weights, topo, cn, torch.device("cpu"), torch.float32)
    case = {c.id: c for c in generate.load_cases(str(ws["cases"]))}["pair"]
    analyzer = get_analyzer(ws["face_root"], "tinypack", "CPU", 256)
    ids = generate.encode_identities(analyzer, case)
    proj = FaceIDProjection.from_weights(weights)
    tokens, uncond, valid = fid.case_tokens(proj, weights, ids)
    zero = proj(torch.zeros(1, 512))[0]
    assert valid is None
    for u in uncond:
        torch.testing.assert_close(u, zero, rtol=1e-5, atol=1e-6)
    layout = generate.case_layout(case, SIZE, SIZE, control="openpose")
    seen = []
    name = f"{topo.slots[0].attention_path(2)}.processor"
    inner = comps.unet.attn_processors[name]

    class Spy:
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                     faceid=None):
            seen.append(faceid)
            return inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, faceid=faceid)
    comps.unet.set_attn_processor({**comps.unet.attn_processors, name: Spy()})
    cn_seen = []
    cn.register_forward_pre_hook(lambda m, a, kw: cn_seen.append(kw.get("cross_attention_kwargs")),
                                 with_kwargs=True)
    gen.latents([case.prompt], "", [tokens], [uncond], valid, [layout.masks], [layout.control], [3], 2, 5.0)
    assert len(seen) == 2 and seen[0] is seen[1]
    st = seen[0]
    assert torch.equal(st.tokens[0], uncond) and torch.equal(st.tokens[1], tokens)
    assert torch.equal(st.masks[0], layout.masks) and torch.equal(st.masks[1], layout.masks)
    assert cn_seen == [None, None]


@pytest.mark.parametrize("base", ["sd15", "sdxl"])
def test_cli_writes_the_images_evaluate_reads(ws, tmp_path, base):
    """SD1.5 and SDXL FaceID end to end: ``<case>_<seed>.png`` for every case and seed and a manifest of the FaceID
    settings; SD1.5: evaluate.py scores them, resume, other settings refused; SDXL: the ControlNet changes the
    images."""
    from PIL import Image

    from training import generate
    out = tmp_path / base
    extra = ["--recognizer", f"insightface:{ws['face_root']}:tinypack", "--label", "faceid"] if base == "sd15" else []
    seeds = 2 if base == "sd15" else 1
    assert generate.main(cli_args(ws, base, base, out, "--seeds", str(seeds), "--seed", "5", "--batch-size", "2",
                                  *extra)) == 0
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == (["boxes_5.png", "boxes_6.png", "pair_5.png", "pair_6.png"] if seeds == 2 else
                     ["boxes_5.png", "pair_5.png"])
    manifest = json.loads((out / "generate.json").read_text())
    s = manifest["settings"]
    assert s["mode"] == "faceid" and s["base_kind"] == {"sd15": "SD1.5", "sdxl": "SDXL"}[base]
    assert s["faceid"] == ws[f"faceid-{base}"].name and s["face_pack"] == "tinypack"
    assert manifest["images"]["boxes_5.png"] == {"case": "boxes", "seed": 5, "pose": "boxes"}
    if base == "sd15":
        summary = json.loads((out / "eval" / "summary.json").read_text())
        assert summary["summary"]["n_images"] == 4 and summary["summary"]["faces_expected"] == 8
        assert "faceid" in (out / "eval" / "summary.md").read_text()
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*.png")}
    if base == "sdxl":  # without the ControlNet the same seeds give other images
        free = tmp_path / f"{base}-free"
        assert generate.main(cli_args(ws, base, base, free, "--seed", "5", controlnet=False)) == 0
        assert (free / "pair_5.png").read_bytes() != before["pair_5.png"][1]
        return
    # resume: nothing regenerated; a deleted image comes back (alone now, not in a batch of two: equal up to float
    # rounding, at most one level on a few pixels); other settings refused
    (out / "pair_6.png").unlink()
    assert generate.main(cli_args(ws, base, base, out, "--seeds", "2", "--seed", "5")) == 0
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*.png")}
    assert after.keys() == before.keys()
    assert all(after[k] == before[k] for k in before if k != "pair_6.png")
    again, first = (np.asarray(Image.open(io.BytesIO(x[1]))).astype(int) for x in (after["pair_6.png"],
                                                                                  before["pair_6.png"]))
    assert np.abs(again - first).max() <= 1 and (again != first).mean() < 0.01
    assert generate.main(cli_args(ws, base, base, out, "--seeds", "2", "--seed", "5", "--lora-strength", "0.5")) == 2


def _pair_identities(ws):
    from instantfamily_core.faces import get_analyzer
    from training import generate
    case = {c.id: c for c in generate.load_cases(str(ws["cases"]))}["pair"]
    return generate.encode_identities(get_analyzer(ws["face_root"], "tinypack", "CPU", 256), case)


def test_portrait_tokens_per_photo(ws, tmp_path):
    """Portrait: 16 tokens per photo (two photos → 32; the one-photo person's padding masked out), through the CLI
    with people of different token counts."""
    from instantfamily_core.faceid import FaceIDProjection
    from training import faceid as fid
    from training import generate
    _, comps = _load(ws, "sd15")
    ids = _pair_identities(ws)
    portrait = fid.load_faceid_for(ws["faceid-sd15-portrait"], fid.diffusers_topology(comps.unet), "tiny")
    tokens, uncond, valid = fid.case_tokens(FaceIDProjection.from_weights(portrait), portrait, ids)
    assert portrait.variant == "portrait" and not portrait.has_lora and tokens.shape == (2, 32, 768)
    assert valid.tolist() == [[True] * 16 + [False] * 16, [True] * 32]
    assert generate.main(cli_args(ws, "sd15", "sd15-portrait", tmp_path / "portrait", "--steps", "1",
                                  controlnet=False)) == 0
    assert len(list((tmp_path / "portrait").glob("*.png"))) == 2


def test_plus_tokens_from_clip_vision(ws, tmp_path):
    """Plus v2: the CLIP file's penultimate states of each photo's aligned face crop, averaged per person, and the
    zero-pixel input for the uncond tokens — equal to the in-memory ViT's; through the CLI with --clip-vision."""
    from instantfamily_core.faceid import FaceIDProjection, person_tokens
    from training import faceid as fid
    from training import generate
    _, comps = _load(ws, "sd15")
    ids = _pair_identities(ws)
    plus = fid.load_faceid_for(ws["faceid-sd15-plus"], fid.diffusers_topology(comps.unet), "tiny")
    assert plus.variant == "plusv2"
    vit = fid.load_clip_vision(ws["vit_file"])
    proj = FaceIDProjection.from_weights(plus)
    tokens, uncond, valid = fid.case_tokens(proj, plus, ids, vit, s_scale=0.5)
    ref = ws["vit"].vision_model

    def hidden(x):
        return ref(pixel_values=x, output_hidden_states=True).hidden_states[-2]
    mean = torch.tensor(fid.CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(fid.CLIP_STD).view(1, 3, 1, 1)
    for n, ident in enumerate(ids):
        crops = torch.stack([torch.from_numpy(np.array(c)).permute(2, 0, 1).float() / 255 for c in
                             ident.extra["faceid_crops"]])
        with torch.no_grad():
            clip = torch.cat([hidden((crops - mean) / std).mean(0, keepdim=True), hidden(torch.zeros(1, 3, 224, 224))])
        want = person_tokens(proj, "plusv2", ident.name, torch.stack(ident.extra["faceid_embeddings"]), clip, 0.5)
        torch.testing.assert_close(tokens[n], want[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(uncond[n], want[1], rtol=1e-4, atol=1e-5)
    ws["vit"].save_pretrained(str(tmp_path / "image_encoder"))  # h94/IP-Adapter's models/image_encoder layout
    folder = fid.load_clip_vision(tmp_path / "image_encoder")
    crops = ids[0].extra["faceid_crops"]
    assert torch.equal(fid.clip_hidden(folder, crops), fid.clip_hidden(vit, crops))
    assert generate.main(cli_args(ws, "sd15", "sd15-plus", tmp_path / "plus", "--clip-vision", str(ws["vit_file"]),
                                  "--steps", "1", controlnet=False)) == 0
    assert len(list((tmp_path / "plus").glob("*.png"))) == 2


def test_bad_input_is_a_clear_error(ws, tmp_path, capsys):
    from training import generate

    def run(args):
        rc = generate.main(args)
        return rc, capsys.readouterr().err

    # an SD1.5 FaceID file on an SDXL base, and the reverse: both options and both bases named
    rc, err = run(cli_args(ws, "sdxl", "sd15", tmp_path / "a", controlnet=False))
    assert rc == 2 and "--faceid" in err and "--base" in err and "SD1.5" in err and "SDXL" in err
    assert ws["faceid-sd15"].name in err and "tiny-sdxl.safetensors" in err
    rc, err = run(cli_args(ws, "sd15", "sdxl", tmp_path / "b", controlnet=False))
    assert rc == 2 and "--faceid" in err and "--base" in err and "is an SDXL FaceID file" in err
    # an SD1.5 ControlNet on the SDXL base
    args = cli_args(ws, "sdxl", "sdxl", tmp_path / "c", controlnet=False) + ["--controlnet", str(ws["cn15_file"])]
    rc, err = run(args)
    assert rc == 2 and "--controlnet" in err and "--base" in err and "SD1.5 ControlNet" in err
    # Plus without its CLIP model; CLIP with a non-Plus file
    rc, err = run(cli_args(ws, "sd15", "sd15-plus", tmp_path / "d", controlnet=False))
    assert rc == 2 and "--clip-vision" in err and "ViT-H" in err
    rc, err = run(cli_args(ws, "sd15", "sd15", tmp_path / "e", "--clip-vision", str(ws["vit_file"]),
                           controlnet=False))
    assert rc == 2 and "--clip-vision" in err and "not a FaceID Plus" in err
    # option combinations
    rc, err = run(cli_args(ws, "sd15", "sd15", tmp_path / "f", "--checkpoint", "x.safetensors"))
    assert rc == 2 and "--checkpoint / --faceid" in err
    rc, err = run(cli_args(ws, "sd15", "sd15", tmp_path / "g", "--mask-mode", "paper"))
    assert rc == 2 and "--mask-mode" in err
    rc, err = run(cli_args(ws, "sd15", "sd15", tmp_path / "h", "--faceid-weight", "-1"))
    assert rc == 2 and "--faceid-weight" in err
    args = cli_args(ws, "sd15", "sd15", tmp_path / "i")
    args[args.index("--faceid") + 1] = str(tmp_path / "missing.bin")
    rc, err = run(args)
    assert rc == 2 and "--faceid" in err and "does not exist" in err
    not_faceid = tmp_path / "lora_only.safetensors"
    from safetensors.torch import save_file
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, str(not_faceid))
    args[args.index("--faceid") + 1] = str(not_faceid)
    rc, err = run(args)
    assert rc == 2 and err.startswith("error: --faceid lora_only.safetensors: this is a LoRA")
    args = cli_args(ws, "sd15", "sd15", tmp_path / "j", controlnet=False)
    args[args.index("--base") + 1] = str(ws["cn15_file"])
    rc, err = run(args)
    assert rc == 2 and "--base" in err
    assert not list(tmp_path.rglob("*.png"))
