"""The training loader reads SD1.5 files as people have them, checked against ComfyUI's own loader.

Every file here is written by the published key names (``support.sd15_layouts``: ComfyUI's LDM modules under the
standard single-file prefixes), never by our writer. For each layout and dtype, the text encoder's hidden states
(CLIP last layer, through ComfyUI's real ``sd1_tokenizer``, which declares ``model_max_length`` 8192) and the UNet's
noise prediction from ``training.sd15.load_base`` must match ComfyUI's ``CheckpointLoaderSimple`` on the same file.

Most cases use a "micro" UNet (one 320-channel level, which ComfyUI still detects as SD1.5) with the full CLIP-L and
VAE; one case is a full-size SD1.5 fp16 file (~2 GB, generated once, deleted at the end) that is also trained on
(2 steps at 64 px), exported (fp16) and sampled in ComfyUI with the pack's nodes.

Tolerances: both sides compute in fp32 from the same stored values; what differs is the kernels (attention,
convolution layouts), so differences are float32 rounding (~1e-6 relative).
"""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from support import sd15_layouts as L
from tools.devkit.comfy_host import HOW_TO_PROVIDE, find_comfyui

pytest.importorskip("diffusers", reason="the training side needs diffusers: pip install diffusers accelerate")
pytestmark = pytest.mark.skipif(find_comfyui() is None, reason=HOW_TO_PROVIDE)

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a photo of two people laughing on a beach, golden hour"
TEXT_TOL = 1e-4  # hidden states of magnitude ~1 (after the final layer norm)
EPS_RTOL = 1e-4  # relative to the prediction's largest value
T_INDEX = 500


def _free():
    gc.collect()
    try:
        import comfy.model_management
        comfy.model_management.unload_all_models()
        comfy.model_management.soft_empty_cache()
    except ImportError:
        pass
    gc.collect()


def _inputs(seed=0, hw=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 4, hw, hw, generator=g) * 3, torch.randn(1, 77, 768, generator=g)


def ours(path, config_dir, x, ctx, sigma):
    from training.model import encode_text
    from training.sd15 import load_base
    comps = load_base(path, tokenizer=str(L.comfy_tokenizer_dir()), config_dir=config_dir)
    assert all(p.dtype == torch.float32 for m in (comps.unet, comps.vae, comps.text_encoder) for p in m.parameters())
    assert comps.tokenizer.model_max_length == 77
    text = encode_text(comps.text_encoder, comps.tokenizer, [PROMPT])
    eps = L.our_eps(comps.unet, x, sigma, float(T_INDEX), ctx)
    conv_in = comps.unet.conv_in.weight.detach().clone()
    del comps
    _free()
    return text, eps, conv_in


def comfy(path, x, ctx):
    model, clip, vae = L.comfy_load_checkpoint(path)  # (--fp32-text-enc: ComfyUI keeps CLIP in fp16 otherwise)
    sigma = model.model.model_sampling.sigmas[T_INDEX].reshape(1).float()
    text = L.comfy_text(clip, PROMPT)
    eps = L.comfy_eps(model, x, sigma, ctx)
    del model, clip, vae
    _free()
    return text, eps, sigma


def assert_match(a_text, a_eps, b_text, b_eps, what):
    assert a_text.shape == b_text.shape == (1, 77, 768), what
    dt = (a_text - b_text).abs().max().item()
    assert dt < TEXT_TOL, f"{what}: text hidden states differ by {dt}"
    scale = b_eps.abs().max().item()
    de = (a_eps - b_eps).abs().max().item()
    assert scale > 1e-3 and de < EPS_RTOL * scale, f"{what}: noise predictions differ by {de} (scale {scale})"


@pytest.fixture(scope="module", autouse=True)
def fp32_text_encoder():
    """ComfyUI keeps the text encoder in fp16 unless started with --fp32-text-enc; compare in fp32 (the file's
    values, not a rounding of them)."""
    from tools.devkit.comfy_host import import_host
    import_host()
    import comfy.cli_args
    before = comfy.cli_args.args.fp32_text_enc
    comfy.cli_args.args.fp32_text_enc = True
    yield
    comfy.cli_args.args.fp32_text_enc = before


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    from tools.devkit.comfy_host import import_host
    import_host()
    root = tmp_path_factory.mktemp("sd15_layouts")
    return {"root": root, "state": L.sd15_state(L.MICRO_UNET, seed=0), "config": L.micro_config_dir(root / "config")}


# (file name, text layout, position_ids, EMA, dtype): every layout and every dtype, in both containers
CASES = [
    ("standard-fp16.safetensors", "text_model", True, False, "fp16"),  # v1-5-pruned-emaonly-fp16 style
    ("legacy-fp32.safetensors", "legacy", False, False, "fp32"),
    ("standard-bf16.safetensors", "text_model", False, False, "bf16"),
    ("legacy-posids-bf16.ckpt", "legacy", True, False, "bf16"),  # {"state_dict": ...} wrapper
    ("nonpruned-ema-fp32.ckpt", "text_model", True, True, "fp32"),  # v1-5-pruned.ckpt style: EMA + non-EMA
]


@pytest.mark.parametrize("name,text,position_ids,ema,dtype", CASES, ids=[c[0] for c in CASES])
def test_layout_matches_comfyui_checkpoint_loader(micro, name, text, position_ids, ema, dtype):
    path = L.write_layout(micro["state"], micro["root"] / name, text=text, position_ids=position_ids, ema=ema,
                          dtype=dtype)
    try:
        x, ctx = _inputs()
        if ema:
            # ComfyUI reads the non-EMA UNet of a non-pruned file; the EMA weights are those of the same file
            # pruned to its EMA weights ("emaonly"), which ComfyUI reads as model.diffusion_model
            emaonly = L.write_layout(micro["state"], micro["root"] / ("emaonly-" + name), text=text,
                                     position_ids=position_ids, dtype=dtype)
            ref_text, ref_eps, sigma = comfy(emaonly, x, ctx)
            emaonly.unlink()
        else:
            ref_text, ref_eps, sigma = comfy(path, x, ctx)
        got_text, got_eps, conv_in = ours(path, micro["config"], x, ctx, sigma)
        assert_match(got_text, got_eps, ref_text, ref_eps, name)
        stored = L.layout_state(micro["state"], text=text, position_ids=position_ids, ema=ema, dtype=dtype)
        key = L.UNET_PREFIX + "input_blocks.0.0.weight"
        assert torch.equal(conv_in, stored[L.ema_flat_name(key) if ema else key].float())
        if ema:  # the non-EMA weights are a different model
            assert not torch.equal(conv_in, stored[key].float())
    finally:
        path.unlink(missing_ok=True)


@pytest.mark.parametrize("variant", ["fp16", None])
def test_diffusers_folder_matches_comfyui_on_the_single_file(micro, variant):
    """A diffusers folder (fp16-variant files only: ``diffusion_pytorch_model.fp16.safetensors``,
    ``model.fp16.safetensors``; or the standard names) of the same weights: same outputs as ComfyUI on the file."""
    from support.sd15_writers import save_diffusers
    from training.sd15 import load_base
    path = L.write_layout(micro["state"], micro["root"] / "for-diffusers.safetensors", dtype="fp16")
    folder = micro["root"] / f"diffusers-{variant}"
    try:
        x, ctx = _inputs(1)
        ref_text, ref_eps, sigma = comfy(path, x, ctx)
        comps = load_base(path, tokenizer=str(L.comfy_tokenizer_dir()), config_dir=micro["config"])
        for m in (comps.unet, comps.vae, comps.text_encoder):
            m.to(torch.float16)
        if variant:
            comps.unet.save_pretrained(str(folder / "unet"), variant=variant)
            comps.vae.save_pretrained(str(folder / "vae"), variant=variant)
            comps.text_encoder.save_pretrained(str(folder / "text_encoder"), variant=variant)
            comps.tokenizer.save_pretrained(str(folder / "tokenizer"))
            (folder / "scheduler").mkdir()
            (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(comps.scheduler_config))
            names = {p.relative_to(folder).as_posix() for p in folder.rglob("*.safetensors")}
            assert names == {"unet/diffusion_pytorch_model.fp16.safetensors",
                             "vae/diffusion_pytorch_model.fp16.safetensors", "text_encoder/model.fp16.safetensors"}
        else:
            save_diffusers(comps, folder)
        del comps
        _free()
        from training.model import encode_text
        loaded = load_base(folder)
        assert all(p.dtype == torch.float32 for p in loaded.unet.parameters())
        text = encode_text(loaded.text_encoder, loaded.tokenizer, [PROMPT])
        eps = L.our_eps(loaded.unet, x, sigma, float(T_INDEX), ctx)
        assert_match(text, eps, ref_text, ref_eps, f"diffusers folder ({variant})")
    finally:
        path.unlink(missing_ok=True)
        import shutil
        shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# --controlnet-init: the public OpenPose ControlNet's layouts, against ComfyUI's ControlNetLoader

CN_CASES = [("cn-prefixed-fp32.pth", "control_model.", "fp32"), ("cn-plain-fp16.safetensors", "", "fp16"),
            ("cn-diffusers-fp16", "diffusers", "fp16")]


@pytest.mark.parametrize("name,layout,dtype", CN_CASES, ids=[c[0] for c in CN_CASES])
def test_controlnet_init_matches_comfyui_controlnet_loader(micro, name, layout, dtype):
    import folder_paths
    import nodes
    from safetensors.torch import save_file

    from training.model import load_controlnet_init, make_controlnet
    from training.sd15 import load_base
    base = L.write_layout(micro["state"], micro["root"] / "cn-base.safetensors", dtype="fp32")
    ldm = {k: v.to(L.DTYPES[dtype]) for k, v in L.controlnet_state(L.MICRO_UNET, seed=7).items()}
    path = micro["root"] / name
    try:
        comps = load_base(base, tokenizer=str(L.comfy_tokenizer_dir()), config_dir=micro["config"])
        if layout == "diffusers":  # the diffusers folder (config.json + fp16 weights), converted by diffusers
            from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
            proto = make_controlnet(comps.unet)
            proto.load_state_dict({k: v.float() for k, v in convert_controlnet_checkpoint(ldm, dict(proto.config))
                                   .items()})
            proto.to(torch.float16).save_pretrained(str(path), variant="fp16")
            comfy_file = micro["root"] / "cn-for-comfy.safetensors"
            save_file(ldm, str(comfy_file))
        elif name.endswith(".pth"):
            torch.save({layout + k: v for k, v in ldm.items()}, str(path))
            comfy_file = path
        else:
            save_file({layout + k: v for k, v in ldm.items()}, str(path))
            comfy_file = path
        cn = load_controlnet_init(path, comps.unet)
        assert all(p.dtype == torch.float32 for p in cn.parameters())

        x, ctx = _inputs(2)
        hint = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
        model = L.comfy_load_checkpoint(base)[0]
        sigma = model.model.model_sampling.sigmas[T_INDEX].reshape(1).float()
        folder_paths.add_model_folder_path("controlnet", str(comfy_file.parent))
        ccn = nodes.ControlNetLoader().load_controlnet(comfy_file.name)[0]
        pos, _ = nodes.ControlNetApplyAdvanced().apply_controlnet([[ctx, {}]], [[ctx, {}]], ccn,
                                                                  hint.movedim(1, -1), 1.0, 0.0, 1.0)
        control = pos[0][1]["control"]
        control.pre_run(model.model, lambda p: model.model.model_sampling.percent_to_sigma(p))
        control.set_previous_controlnet(None)
        opts = {"cond_or_uncond": [0], "sigmas": sigma}
        with torch.no_grad():
            cmap = control.get_control(x, sigma, {"c_crossattn": ctx}, 1, opts)
        ref = L.comfy_eps(model, x, sigma, ctx, control=cmap)
        plain = L.comfy_eps(model, x, sigma, ctx)
        control.cleanup()
        del model, ccn, pos, control
        _free()
        with torch.no_grad():
            down, mid = cn(x / torch.sqrt(sigma ** 2 + 1), torch.tensor([float(T_INDEX)]), encoder_hidden_states=ctx,
                           controlnet_cond=hint, conditioning_scale=1.0, return_dict=False)
        got = L.our_eps(comps.unet, x, sigma, float(T_INDEX), ctx, down=down, mid=mid)
        scale = ref.abs().max().item()
        assert (got - ref).abs().max().item() < EPS_RTOL * scale
        assert (plain - ref).abs().max().item() > 100 * EPS_RTOL * scale  # the ControlNet does contribute
    finally:
        for p in micro["root"].glob("cn-*"):
            if p.is_dir():
                import shutil
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------------
# full size: a v1-5-pruned-emaonly-fp16-sized file, loader parity, then train -> export -> ComfyUI

@pytest.fixture(scope="module")
def full_file(tmp_path_factory):
    from tools.devkit.comfy_host import import_host
    import_host()
    root = tmp_path_factory.mktemp("sd15_full")
    path = root / "sd15-full-random-fp16.safetensors"
    sd = L.sd15_state(L.FULL_UNET, seed=10, dtype=torch.float16)
    L.write_state(L.layout_state(sd, text="text_model", position_ids=True, dtype="fp16"), path)
    del sd
    gc.collect()
    yield path
    path.unlink(missing_ok=True)


def _peak_rss_gib(who) -> float:
    return resource.getrusage(who).ru_maxrss / 2 ** 20  # Linux: KiB


def test_full_size_file_loads_trains_exports_and_runs_in_comfyui(full_file, tmp_path, tmp_path_factory):
    from support.training_fixtures import training_workspace
    size = full_file.stat().st_size
    assert 2.0e9 < size < 2.3e9, size  # the size of the real pruned fp16 SD1.5 file (2,132,625,222 bytes)

    # 1. the loader against ComfyUI's CheckpointLoaderSimple, at full size
    x, ctx = _inputs(4)
    ref_text, ref_eps, sigma = comfy(full_file, x, ctx)
    got_text, got_eps, _ = ours(full_file, None, x, ctx, sigma)
    assert_match(got_text, got_eps, ref_text, ref_eps, "full-size fp16 file")

    # 2. train (the CLI, as a user runs it; fp16 file with --mixed-precision no) and export (fp16)
    ws = training_workspace(tmp_path_factory)
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "training" / "train.py"), "--base", str(full_file),
           "--tokenizer", str(L.comfy_tokenizer_dir()), "--data", str(ws.shards), "--output", str(out),
           "--batch-size", "1", "--num-workers", "0", "--projector-hidden", "64", "--max-steps", "2",
           "--checkpoint-every", "2", "--validate-every", "0", "--mixed-precision", "no", "--no-progress"]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=str(ROOT), env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                          text=True, timeout=1800)
    train_s = time.time() - t0
    assert proc.returncode == 0, proc.stderr[-4000:]
    export = out / "instantfamily.safetensors"
    from instantfamily_core.checkpoint import load_checkpoint
    ckpt = load_checkpoint(str(export))
    assert ckpt.meta.extra["dtype"] == "fp16" and all(v.dtype == torch.float16 for v in ckpt.controlnet.values())
    assert 0.6e9 < export.stat().st_size < 0.8e9  # a full-size SD1.5 ControlNet in fp16 (~723 MB)
    del ckpt
    gc.collect()
    print(f"\nfull-size train (2 steps, 64 px, CPU fp32): {train_s:.1f} s, peak RSS of the training process "
          f"{_peak_rss_gib(resource.RUSAGE_CHILDREN):.2f} GiB")

    # 3. the export runs in ComfyUI: the pack's nodes on the full-size base, sampled and decoded
    from tools.devkit.comfy_host import load_pack
    from tools.devkit.identities import random_identities
    from support.poses import frame, person
    import nodes as comfy_nodes
    pack = load_pack()
    model_nodes = sys.modules[f"{pack.__name__}.nodes.model_nodes"]
    pose_nodes = sys.modules[f"{pack.__name__}.nodes.pose_nodes"]
    model, clip, vae = L.comfy_load_checkpoint(full_file)
    ifmodel = model_nodes.load_instantfamily(str(export))
    pos = comfy_nodes.CLIPTextEncode().encode(clip, PROMPT)[0]
    neg = comfy_nodes.CLIPTextEncode().encode(clip, "")[0]
    pose = frame([person(20, 24, s=8), person(44, 24, s=8)], w=64, h=64)

    def run(ids):
        pose_image, masks, _ = pose_nodes.PoseToMasks().run(ids, "none (use pose_keypoint)", 64, 64, 0.25, "auto",
                                                            pose_keypoint=pose)
        patched, p, n = model_nodes.ApplyInstantFamily().apply(model, ifmodel, ids, pose_image, masks, pos, neg, 1.0,
                                                               "", 1.0, 0.0, 1.0, "checkpoint")
        latent = comfy_nodes.EmptyLatentImage().generate(64, 64, 1)[0]
        sampled = comfy_nodes.KSampler().sample(patched, 0, 2, 5.0, "euler", "normal", p, n, latent)[0]
        return comfy_nodes.VAEDecode().decode(vae, sampled)[0]

    image = run(random_identities(2, seed=1))
    other = run(random_identities(3, seed=2)[1:])
    assert image.shape == (1, 64, 64, 3) and torch.isfinite(image).all()
    assert (image - other).abs().max().item() > 1e-3  # the identities reach the image
    print(f"peak RSS of the test process {_peak_rss_gib(resource.RUSAGE_SELF):.2f} GiB")
    del model, clip, vae, ifmodel
    _free()
