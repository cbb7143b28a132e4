"""SD1.5 loading for training: single-file (LDM layout) and diffusers folders, offline, with typed errors."""

import json
from pathlib import Path

import pytest
import torch

from instantfamily_core.errors import BaseModelError, ModelFileError
from support import sd15_writers
from support.tiny_sd15 import write_tiny_tokenizer
from support.training_fixtures import training_workspace
from training import sd15


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return training_workspace(tmp_path_factory)


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_single_file_loads_back_the_same_weights(ws):
    comps = ws.setup.components
    loaded = sd15.load_base(ws.setup.single_file, config_dir=ws.setup.config_dir)
    _same_weights(comps.unet, loaded.unet)
    _same_weights(comps.vae, loaded.vae)
    _same_weights(comps.text_encoder, loaded.text_encoder)
    assert not any(p.requires_grad for p in loaded.unet.parameters())
    assert loaded.scheduler_config["beta_schedule"] == "scaled_linear"


def test_diffusers_folder_loads(ws, tmp_path):
    folder = sd15_writers.save_diffusers(ws.setup.components, tmp_path / "sd")
    loaded = sd15.load_base(folder)
    _same_weights(ws.setup.components.unet, loaded.unet)
    ids = lambda tok: tok(["a photo of 2 people"], return_tensors="pt").input_ids  # noqa: E731
    assert torch.equal(ids(loaded.tokenizer), ids(ws.setup.components.tokenizer))


def test_full_sd15_key_mapping_agrees_with_diffusers_conversion():
    """Our diffusers → LDM writer inverted by diffusers' own LDM → diffusers conversion, at full SD1.5 size
    (meta tensors: no memory, no weights)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    for cls, to_ldm, back, prefix, sub in (
            (UNet2DConditionModel, sd15_writers.unet_to_ldm, convert_ldm_unet_checkpoint, sd15.UNET_PREFIX, "unet"),
            (AutoencoderKL, sd15_writers.vae_to_ldm, convert_ldm_vae_checkpoint, sd15.VAE_PREFIX, "vae")):
        cfg = cls.load_config(str(sd15.CONFIG_DIR / sub))
        with init_empty_weights():
            model = cls.from_config(cfg)
        sd = model.state_dict()
        ldm = {prefix + k: v for k, v in to_ldm(sd, cfg).items()}
        assert len(ldm) == len(sd)
        restored = back(ldm, cfg)
        assert set(restored) == set(sd)
        assert all(restored[k].shape == sd[k].shape for k in sd)


def test_shipped_configs_are_sd15():
    unet = json.loads((sd15.CONFIG_DIR / "unet" / "config.json").read_text())
    text = json.loads((sd15.CONFIG_DIR / "text_encoder" / "config.json").read_text())
    assert unet["cross_attention_dim"] == text["hidden_size"] == 768
    assert unet["block_out_channels"] == [320, 640, 1280, 1280]


def test_sdxl_file_is_rejected_by_name(tmp_path):
    from safetensors.torch import save_file
    path = tmp_path / "sdxl_base.safetensors"
    save_file({"conditioner.embedders.0.transformer.x": torch.zeros(1),
               "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, str(path))
    with pytest.raises(BaseModelError, match="sdxl_base.safetensors.*SDXL"):
        sd15.load_base(path, tokenizer=str(write_tiny_tokenizer(tmp_path / "tok")))


def test_missing_tokenizer_says_how_to_fix(ws, tmp_path, monkeypatch):
    monkeypatch.setattr(sd15, "comfyui_tokenizer_dir", lambda: None)
    with pytest.raises(ModelFileError, match="--tokenizer"):
        sd15.load_base(ws.setup.single_file)  # shipped config folder has no tokenizer
    with pytest.raises(ModelFileError, match="does not exist"):
        sd15.load_base(tmp_path / "nope.safetensors")


# ---------------------------------------------------------------------------------------------------------------
# layouts, dtypes and tokenizers the loader must take (ComfyUI-checked versions: test_training_real_files.py)

def _text_keys_with_prefix(sd, prefix):
    out = {}
    for k, v in sd.items():
        if k.startswith(sd15.TEXT_PREFIX):
            bare = k[len(sd15.TEXT_PREFIX):]
            bare = bare[len("text_model."):] if bare.startswith("text_model.") else bare
            k = sd15.TEXT_PREFIX + prefix + bare
        out[k] = v
    return out


@pytest.mark.parametrize("model_prefix", ["text_model.", ""])  # transformers 4.x / 5.x CLIPTextModel key names
@pytest.mark.parametrize("file_prefix", ["text_model.", ""])  # standard / older single-file layout
def test_text_encoder_keys_map_to_the_installed_models_names(model_prefix, file_prefix):
    names = ["embeddings.token_embedding.weight", "embeddings.position_embedding.weight",
             "encoder.layers.0.self_attn.q_proj.weight", "final_layer_norm.bias"]
    sd = {sd15.TEXT_PREFIX + file_prefix + n: torch.full((1,), float(i)) for i, n in enumerate(names)}
    sd[sd15.TEXT_PREFIX + file_prefix + "embeddings.position_ids"] = torch.arange(77)[None]
    sd[sd15.UNET_PREFIX + "x"] = torch.zeros(1)
    got = sd15.text_encoder_state(sd, [model_prefix + n for n in names])
    assert got == {model_prefix + n: sd[sd15.TEXT_PREFIX + file_prefix + n] for n in names}


def test_installed_clip_key_names_are_what_the_loader_targets():
    from transformers import CLIPTextConfig, CLIPTextModel
    cfg = CLIPTextConfig.from_pretrained(str(sd15.CONFIG_DIR / "text_encoder"), local_files_only=True)
    keys = list(sd15._empty(lambda: CLIPTextModel(cfg)).state_dict())
    sd = {sd15.TEXT_PREFIX + "text_model." + (k[len("text_model."):] if k.startswith("text_model.") else k):
          torch.zeros(1) for k in keys if not k.endswith("position_ids")}
    assert set(sd15.text_encoder_state(sd, keys)) == {k for k in keys if not k.endswith("position_ids")}


@pytest.mark.parametrize("layout", ["text_model.", ""])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("container", [".safetensors", ".ckpt"])
def test_single_file_layouts_and_dtypes_load_in_fp32(ws, tmp_path, layout, dtype, container):
    from safetensors.torch import load_file, save_file
    sd = _text_keys_with_prefix(load_file(str(ws.setup.single_file)), layout)
    sd[sd15.TEXT_PREFIX + layout + "embeddings.position_ids"] = torch.arange(77)[None].float() + 1e-4  # damaged
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    path = tmp_path / f"base{container}"
    if container == ".ckpt":
        torch.save({"state_dict": sd, "global_step": 1}, str(path))
    else:
        save_file(sd, str(path))
    loaded = sd15.load_base(path, config_dir=ws.setup.config_dir)
    for name in ("unet", "vae", "text_encoder"):
        ref = getattr(ws.setup.components, name).state_dict()
        got = getattr(loaded, name).state_dict()
        for k, v in got.items():
            if k.endswith("position_ids"):
                assert torch.equal(v, torch.arange(77)[None])  # the model's own, not the file's damaged copy
                continue
            assert v.dtype == torch.float32, k
            assert torch.equal(v, ref[k].to(dtype).float()), k


def test_ema_weights_of_a_non_pruned_file_are_used(ws, tmp_path):
    from safetensors.torch import load_file, save_file
    sd = load_file(str(ws.setup.single_file))
    unet_keys = [k for k in sd if k.startswith(sd15.UNET_PREFIX)]
    for k in unet_keys:  # LitEma names: "model_ema." + name under "model." without dots
        sd["model_ema." + k[len("model."):].replace(".", "")] = sd[k]
        sd[k] = torch.randn_like(sd[k])
    sd["model_ema.decay"], sd["model_ema.num_updates"] = torch.tensor(0.9999), torch.tensor(7, dtype=torch.int32)
    assert "model_ema.diffusion_modelinput_blocks00weight" in sd
    save_file(sd, str(tmp_path / "pruned-not.safetensors"))
    loaded = sd15.load_base(tmp_path / "pruned-not.safetensors", config_dir=ws.setup.config_dir)
    _same_weights(ws.setup.components.unet, loaded.unet)
    # EMA present for only part of the UNet: refused, not silently mixed
    del sd["model_ema.diffusion_modelinput_blocks00weight"]
    save_file(sd, str(tmp_path / "broken-ema.safetensors"))
    with pytest.raises(ModelFileError, match="EMA"):
        sd15.load_base(tmp_path / "broken-ema.safetensors", config_dir=ws.setup.config_dir)


def test_diffusers_folder_with_only_fp16_variant_files(ws, tmp_path):
    comps = ws.setup.components
    folder = sd15_writers.save_diffusers(comps, tmp_path / "sd")
    for sub, model, fname in (("unet", comps.unet, "diffusion_pytorch_model"), ("vae", comps.vae,
                              "diffusion_pytorch_model"), ("text_encoder", comps.text_encoder, "model")):
        for f in (folder / sub).glob("*.safetensors"):
            f.unlink()
        import copy
        copy.deepcopy(model).half().save_pretrained(str(folder / sub), variant="fp16")
        assert (folder / sub / f"{fname}.fp16.safetensors").is_file()
    loaded = sd15.load_base(folder)
    for name in ("unet", "vae", "text_encoder"):
        ref = getattr(comps, name).state_dict()
        for k, v in getattr(loaded, name).state_dict().items():
            if not k.endswith("position_ids"):
                assert v.dtype == torch.float32 and torch.equal(v, ref[k].half().float()), k


def test_tokenizer_pads_to_the_text_encoders_77_positions_whatever_it_declares(ws, tmp_path):
    from training.model import encode_text
    tok = write_tiny_tokenizer(tmp_path / "tok")
    cfg = json.loads((tok / "tokenizer_config.json").read_text())
    cfg["model_max_length"] = 8192  # what ComfyUI's comfy/sd1_tokenizer declares
    (tok / "tokenizer_config.json").write_text(json.dumps(cfg))
    loaded = sd15.load_base(ws.setup.single_file, tokenizer=str(tok), config_dir=ws.setup.config_dir)
    assert loaded.tokenizer.model_max_length == 77
    out = encode_text(loaded.text_encoder, loaded.tokenizer, ["a photo of 2 people", "x" * 300])
    assert out.shape == (2, 77, 768)
    raw = sd15.load_tokenizer(tok)  # a tokenizer object that still says 8192: encode_text uses the encoder's 77
    assert raw.model_max_length == 8192
    assert torch.equal(encode_text(loaded.text_encoder, raw, ["a photo of 2 people", "x" * 300]), out)


# ---------------------------------------------------------------------------------------------------------------
# wrong files given as --base: named for what they are

def _conv_in(ch):
    return torch.zeros(320, ch, 3, 3)


WRONG = {
    "sdxl.safetensors": ({"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.zeros(768),
                          sd15.UNET_PREFIX + "input_blocks.0.0.weight": _conv_in(4)}, "SDXL"),
    "sd21.safetensors": ({"cond_stage_model.model.ln_final.weight": torch.zeros(1024),
                          sd15.UNET_PREFIX + "input_blocks.0.0.weight": _conv_in(4)}, "SD2"),
    "sd21-unet.safetensors": ({sd15.UNET_PREFIX + "input_blocks.0.0.weight": _conv_in(4),
                               sd15.UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight":
                                   torch.zeros(320, 1024)}, "SD2"),
    "inpainting.safetensors": ({sd15.UNET_PREFIX + "input_blocks.0.0.weight": _conv_in(9),
                                sd15.TEXT_PREFIX + "text_model.final_layer_norm.weight": torch.zeros(768),
                                sd15.VAE_PREFIX + "decoder.conv_in.weight": torch.zeros(1)}, "inpainting"),
    "lora.safetensors": ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
                          "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0)}, "LoRA"),
    "peft-lora.safetensors": ({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 320)},
                              "LoRA"),
    "control_v11p_sd15_openpose.pth": ({"control_model.zero_convs.0.0.weight": torch.zeros(320, 320, 1, 1),
                                        "control_model.input_hint_block.0.weight": torch.zeros(16, 3, 3, 3)},
                                       "ControlNet"),
    "control_openpose_fp16.safetensors": ({"zero_convs.0.0.weight": torch.zeros(320, 320, 1, 1)}, "ControlNet"),
    "vae.safetensors": ({"encoder.down.0.block.0.conv1.weight": torch.zeros(1)}, "VAE"),
}


@pytest.mark.parametrize("name", sorted(WRONG))
def test_wrong_file_as_base_is_named_for_what_it_is(tmp_path, name):
    from safetensors.torch import save_file
    sd, kind = WRONG[name]
    path = tmp_path / name
    if name.endswith(".pth"):
        torch.save(sd, str(path))
    else:
        save_file(sd, str(path))
    with pytest.raises(BaseModelError, match=f"{name}.*{kind}"):
        sd15.load_base(path, tokenizer=str(write_tiny_tokenizer(tmp_path / "tok")))


def test_diffusers_folder_of_another_family_is_named(ws, tmp_path):
    folder = sd15_writers.save_diffusers(ws.setup.components, tmp_path / "sd")
    cfg = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps(dict(cfg, in_channels=9)))
    with pytest.raises(BaseModelError, match="inpainting"):
        sd15.load_base(folder)
    (folder / "unet" / "config.json").write_text(json.dumps(cfg))
    (folder / "text_encoder_2").mkdir()
    with pytest.raises(BaseModelError, match="SDXL"):
        sd15.load_base(folder)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_truncated_file_says_so(ws, tmp_path, suffix):
    from safetensors.torch import load_file
    whole = tmp_path / f"whole{suffix}"
    if suffix == ".ckpt":
        torch.save({"state_dict": load_file(str(ws.setup.single_file))}, str(whole))
    else:
        whole.write_bytes(Path(ws.setup.single_file).read_bytes())
    cut = tmp_path / f"cut{suffix}"
    data = whole.read_bytes()
    cut.write_bytes(data[:len(data) * 2 // 3])
    with pytest.raises(ModelFileError, match="cut.*truncated"):
        sd15.load_base(cut, config_dir=ws.setup.config_dir)


def test_atomic_writer_leaves_nothing_half_written_and_normal_permissions(tmp_path):
    import os

    from instantfamily_core.fileio import save_safetensors_atomic, write_text_atomic
    target = tmp_path / "out.safetensors"
    save_safetensors_atomic({"a": torch.ones(2)}, target)
    before = target.read_bytes()
    with pytest.raises(Exception):
        save_safetensors_atomic({"a": torch.ones(2), "b": "not a tensor"}, target)
    assert target.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]
    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "new.json", "{}")
        save_safetensors_atomic({"a": torch.ones(1)}, tmp_path / "new.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "new.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "new.safetensors").stat().st_mode & 0o777 == 0o644
    os.chmod(target, 0o600)  # a replaced file keeps its permissions
    save_safetensors_atomic({"a": torch.zeros(2)}, target)
    assert target.stat().st_mode & 0o777 == 0o600
