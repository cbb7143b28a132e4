"""training/model.py files its faults under the error class that names them: export and checkpoint-layout faults
are CheckpointErrors, bad option values (export dtype, sampling noise shape) OptionErrors — not IdentityCountError."""

from types import SimpleNamespace

import pytest
import torch

from instantfamily_core.errors import CheckpointError, IdentityCountError, OptionError
from instantfamily_core.projector import IdentityProjector, ProjectorConfig
from training import model as M


def _projector():
    return IdentityProjector(ProjectorConfig(hidden_dim=64))


def test_export_with_an_unknown_dtype_is_an_option_error(tmp_path):
    with pytest.raises(OptionError, match=r"--dtype 'bf16' unknown; expected one of \['fp16', 'fp32'\]"):
        M.export_checkpoint(tmp_path / "x.safetensors", _projector(), {"in_channels": 4}, "tinypack", dtype="bf16")
    assert not (tmp_path / "x.safetensors").exists()


def test_export_of_a_config_dict_without_weights_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="a ControlNet config dict needs controlnet_state") as e:
        M.export_checkpoint(tmp_path / "x.safetensors", _projector(), {"in_channels": 4}, "tinypack")
    assert not isinstance(e.value, IdentityCountError)
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("layout, config", [("ldm", {"in_channels": 4}), ("diffusers", None)])
def test_rebuilding_a_controlnet_needs_a_diffusers_layout_with_its_config(layout, config):
    ckpt = SimpleNamespace(meta=SimpleNamespace(controlnet_layout=layout, controlnet_config=config), controlnet={})
    with pytest.raises(CheckpointError, match="only diffusers-layout ControlNets with a stored config") as e:
        M.load_controlnet_from_checkpoint(ckpt)
    assert not isinstance(e.value, IdentityCountError)


def test_sampling_noise_of_the_wrong_shape_is_an_option_error():
    text = torch.zeros(1, 77, 768)
    with pytest.raises(OptionError, match=r"noise: expected shape \(1, 4, 8, 8\), got \(1, 4, 4, 4\)") as e:
        M.sample_latents(None, None, None, None, text, text, None, None, None, (1, 4, 8, 8),
                         noise=torch.zeros(1, 4, 4, 4))
    assert not isinstance(e.value, IdentityCountError)
