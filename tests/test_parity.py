"""Train/infer parity: the training model (diffusers + the core) and the exported checkpoint run by the ComfyUI
nodes give the same noise prediction — UNet + ControlNet, masked attention, N = 1…4 identities.

Tolerance: 1e-4 absolute on predictions of magnitude ~1 (fp32 on CPU). The two sides share weights and inputs
but not code paths: different attention kernels (ComfyUI's backend vs SDPA), convolution layouts and the
sigma ↔ timestep round trip leave float32 rounding differences around 1e-6."""

from __future__ import annotations

import sys

import pytest
import torch

from tools.devkit.comfy_host import HOW_TO_PROVIDE, find_comfyui
from tools.devkit.identities import random_identities

pytest.importorskip("diffusers", reason="the training side needs diffusers: pip install diffusers accelerate")
pytestmark = pytest.mark.skipif(find_comfyui() is None, reason=HOW_TO_PROVIDE)
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def sides(tmp_path_factory):
    from tools.devkit.comfy_host import import_host, load_pack
    import_host()
    pack = load_pack()
    import comfy.sd
    from support.tiny_sd15 import write_tiny_setup
    setup = write_tiny_setup(tmp_path_factory.mktemp("parity"), seed=3, unet={"block_out_channels": [320, 640]})
    model = comfy.sd.load_checkpoint_guess_config(str(setup.single_file), output_vae=False, output_clip=False)[0]
    nodes = sys.modules[f"{pack.__name__}.nodes.model_nodes"]
    ifmodel = nodes.load_instantfamily(str(setup.checkpoint))
    return setup, model, ifmodel, nodes


def _identities(n):
    return random_identities(n, seed=11)


def _comfy_eps(model, ifmodel, nodes, ids, pose_image, masks, text, x, sigma, mode):
    patched, pos, _ = nodes.ApplyInstantFamily().apply(
        model, ifmodel, ids, pose_image, masks, [[text, {}]], [[torch.zeros_like(text), {}]], 1.0, "", 1.0, 0.0,
        1.0, mode)
    base = patched.model
    cn = pos[0][1]["control"]
    cn.pre_run(base, lambda p: base.model_sampling.percent_to_sigma(p))
    opts = dict(patched.model_options["transformer_options"])
    opts.update(cond_or_uncond=[0], sigmas=sigma)
    with torch.no_grad():
        control = cn.get_control(x, sigma, {"c_crossattn": text}, 1, opts)
        denoised = base.apply_model(x, sigma, c_crossattn=text, control=control, transformer_options=opts)
    cn.cleanup()
    return (x - denoised) / sigma.view(-1, 1, 1, 1)


@pytest.mark.parametrize("mode", ["additive", "paper"])
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_comfyui_nodes_match_the_training_model(sides, n, mode):
    from support.poses import frame, person
    from training.model import predict_noise
    setup, model, ifmodel, nodes = sides
    pack_nodes = sys.modules[nodes.__name__.replace("model_nodes", "pose_nodes")]
    ids = _identities(n)
    pose = frame([person((i + 0.5) * 64 / n, 20, s=64 / (6 * n)) for i in range(n)], w=64, h=64)
    pose_image, masks, _ = pack_nodes.PoseToMasks().run(ids, "none (use pose_keypoint)", 64, 64, 0.25, "auto",
                                                        pose_keypoint=pose)
    g = torch.Generator().manual_seed(n)
    text = torch.randn(1, 77, 768, generator=g)
    x = torch.randn(1, 4, 8, 8, generator=g) * 3
    ms = model.model.model_sampling
    t_index = 500
    sigma = ms.sigmas[t_index].reshape(1).float()
    comfy_eps = _comfy_eps(model, ifmodel, nodes, ids, pose_image, masks, text, x, sigma, mode)
    with torch.no_grad():
        train_eps = predict_noise(setup.components.unet, setup.controlnet, setup.projector,
                                  x / torch.sqrt(sigma ** 2 + 1), torch.tensor([float(t_index)]), text, ids, masks,
                                  pose_image[..., :3].movedim(-1, 1), mask_mode=mode)
    assert comfy_eps.shape == train_eps.shape
    diff = (comfy_eps - train_eps).abs().max().item()
    assert diff < TOLERANCE, diff
    # and the identities matter (the comparison is not between two identity-blind models)
    with torch.no_grad():
        other = predict_noise(setup.components.unet, setup.controlnet, setup.projector,
                              x / torch.sqrt(sigma ** 2 + 1), torch.tensor([float(t_index)]), text, _identities(n + 1)[1:],
                              masks, pose_image[..., :3].movedim(-1, 1), mask_mode=mode)
    assert (other - train_eps).abs().max().item() > 100 * TOLERANCE


def test_fp16_export_runs_in_the_nodes_as_the_training_model_with_fp16_weights(sides, tmp_path):
    """``--dtype fp16`` (the CLIs' default): the ComfyUI nodes on the fp16 file predict what the training model
    predicts with the same fp16-rounded weights."""
    from instantfamily_core.checkpoint import load_checkpoint
    from support.poses import frame, person
    from training.model import export_checkpoint, load_controlnet_from_checkpoint, predict_noise
    setup, model, _, nodes = sides
    path = tmp_path / "fp16.safetensors"
    export_checkpoint(path, setup.projector, setup.controlnet, "tinypack", dtype="fp16")
    ckpt = load_checkpoint(str(path))
    assert all(v.dtype == torch.float16 for v in ckpt.controlnet.values())
    ifmodel = nodes.load_instantfamily(str(path))
    pack_nodes = sys.modules[nodes.__name__.replace("model_nodes", "pose_nodes")]
    ids = _identities(2)
    pose = frame([person(16, 20, s=5), person(48, 20, s=5)], w=64, h=64)
    pose_image, masks, _ = pack_nodes.PoseToMasks().run(ids, "none (use pose_keypoint)", 64, 64, 0.25, "auto",
                                                        pose_keypoint=pose)
    g = torch.Generator().manual_seed(9)
    text, x = torch.randn(1, 77, 768, generator=g), torch.randn(1, 4, 8, 8, generator=g) * 3
    sigma = model.model.model_sampling.sigmas[500].reshape(1).float()
    comfy_eps = _comfy_eps(model, ifmodel, nodes, ids, pose_image, masks, text, x, sigma, "additive")
    cn = load_controlnet_from_checkpoint(ckpt)
    with torch.no_grad():
        train_eps = predict_noise(setup.components.unet, cn, ckpt.projector, x / torch.sqrt(sigma ** 2 + 1),
                                  torch.tensor([500.0]), text, ids, masks, pose_image[..., :3].movedim(-1, 1))
        full_eps = predict_noise(setup.components.unet, setup.controlnet, setup.projector,
                                 x / torch.sqrt(sigma ** 2 + 1), torch.tensor([500.0]), text, ids, masks,
                                 pose_image[..., :3].movedim(-1, 1))
    assert (comfy_eps - train_eps).abs().max().item() < TOLERANCE
    assert (full_eps - train_eps).abs().max().item() > 0  # the file really holds rounded weights
