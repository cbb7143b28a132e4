"""SD1.5 loading for training: single-file (LDM layout) and diffusers folders, offline, with typed errors."""

import json

import pytest
import torch

from instantfamily_core.errors import BaseModelError, ModelFileError
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
    folder = sd15.save_diffusers(ws.setup.components, tmp_path / "sd")
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
            (UNet2DConditionModel, sd15.unet_to_ldm, convert_ldm_unet_checkpoint, sd15.UNET_PREFIX, "unet"),
            (AutoencoderKL, sd15.vae_to_ldm, convert_ldm_vae_checkpoint, sd15.VAE_PREFIX, "vae")):
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
        sd15.load_base(path, tokenizer=str(sd15.write_tiny_tokenizer(tmp_path / "tok")))


def test_missing_tokenizer_says_how_to_fix(ws, tmp_path, monkeypatch):
    monkeypatch.setattr(sd15, "comfyui_tokenizer_dir", lambda: None)
    with pytest.raises(ModelFileError, match="--tokenizer"):
        sd15.load_base(ws.setup.single_file)  # shipped config folder has no tokenizer
    with pytest.raises(ModelFileError, match="does not exist"):
        sd15.load_base(tmp_path / "nope.safetensors")
