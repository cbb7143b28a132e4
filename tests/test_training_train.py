"""train.py end to end on tiny random models: loss, export → load, checkpoints, crash + resume equivalence."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from instantfamily_core.checkpoint import load_checkpoint
from support.training_fixtures import training_workspace
from training import checkpoints as ck
from training import export, train
from training import model as M
from training.data import DropoutConfig, ShardDataset, collate

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return training_workspace(tmp_path_factory)


def test_loss_decreases_on_a_fixed_batch(ws):
    comps = ws.setup.components
    torch.manual_seed(0)
    net = M.InstantFamilyNet(M.make_controlnet(comps.unet), M.IdentityProjector(ws.setup.projector.config)).train()
    ds = ShardDataset(ws.shards, seed=0, dropout=DropoutConfig(0, 0, 0))
    batch = collate([ds.validation_item(i) for i in (0, 2)])
    g = torch.Generator().manual_seed(0)
    from diffusers import DDPMScheduler
    with torch.no_grad():
        latents = comps.vae.encode(batch["pixels"]).latent_dist.mean * comps.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=g)
        t = torch.tensor([300, 600])
        noisy = DDPMScheduler.from_config(comps.scheduler_config).add_noise(latents, noise, t)
        text = M.encode_text(comps.text_encoder, comps.tokenizer, batch["caption"])
    ids = M.IdentityBatch(batch["global"], batch["local"], batch["present"])
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(8):
        loss = torch.nn.functional.mse_loss(net(comps.unet, noisy, t, text, ids, batch["masks"], batch["control"]),
                                            noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.9 * losses[0], losses
    assert sum(b < a for a, b in zip(losses, losses[1:])) >= 5, losses
    assert not any(p.requires_grad for p in comps.unet.parameters())


def test_train_validate_export_and_load(ws, tmp_path):
    out = tmp_path / "run"
    rc = train.main(ws.train_args(out, "--max-steps", "3", "--checkpoint-every", "3", "--validate-every", "3",
                                  "--num-validation", "2", "--validation-steps", "2", "--dtype", "fp32"))
    assert rc == 0
    rows = ck.LossLog(out / "losses.jsonl").read()
    assert [r["step"] for r in rows] == [1, 2, 3] and all(0 < r["loss"] < 10 for r in rows)
    assert (out / "validation" / "step-0000003.png").is_file()
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    final = out / "instantfamily.safetensors"
    ckpt = load_checkpoint(str(final))
    assert ckpt.meta.face_pack == "tinypack" and ckpt.meta.max_identities == 4
    assert ckpt.meta.mask_mode == "additive" and ckpt.meta.controlnet_layout == "diffusers"
    assert ckpt.meta.projector.hidden_dim == 64 and ckpt.meta.extra["training_steps"] == "3"

    # export.py from the step folder gives the same file contents
    again = tmp_path / "again.safetensors"
    assert export.main(["--checkpoint", str(out / "checkpoints" / "step-0000003"), "--output", str(again),
                        "--dtype", "fp32"]) == 0
    a, b = load_file(str(final)), load_file(str(again))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert export.main(["--checkpoint", str(out / "checkpoints" / "step-0000003"), "--output", str(again),
                        "--ema"]) == 2  # no EMA kept in this run

    # the loaded checkpoint predicts exactly what the trained weights predict, and training changed them
    trained = load_file(str(out / "checkpoints" / "step-0000003" / "model.safetensors"))
    cn = M.load_controlnet_from_checkpoint(ckpt)
    ref_cn = M.make_controlnet(ws.setup.components.unet)
    ref_cn.load_state_dict({k[len("controlnet."):]: v for k, v in trained.items() if k.startswith("controlnet.")})
    assert any(not torch.equal(v, ref_cn.state_dict()[k]) for k, v in M.make_controlnet(ws.setup.components.unet)
               .state_dict().items())
    lat, t = torch.randn(1, 4, 8, 8), torch.tensor([400])
    text, ids, masks = torch.randn(1, 77, 768), torch.randn(2, 50, 768), torch.zeros(2, 64, 64)
    masks[0, :, :30], masks[1, :, 34:] = 1, 1
    ctl = torch.rand(1, 3, 64, 64)
    got = M.predict_noise(ws.setup.components.unet, cn, ckpt.projector, lat, t, text, ids, masks, ctl)
    want = M.predict_noise(ws.setup.components.unet, ref_cn, ckpt.projector, lat, t, text, ids, masks, ctl)
    assert torch.equal(got, want)


def test_existing_output_needs_resume(ws, tmp_path):
    out = tmp_path / "run"
    assert train.main(ws.train_args(out, "--max-steps", "1", "--checkpoint-every", "1")) == 0
    assert train.main(ws.train_args(out, "--max-steps", "2", "--checkpoint-every", "1")) == 2
    assert train.main(ws.train_args(out, "--max-steps", "1", "--resume", str(out / "nope"))) == 2


def test_resume_after_crash_mid_checkpoint_equals_uninterrupted_run(ws, tmp_path):
    common = ("--max-steps", "4", "--checkpoint-every", "2", "--keep-checkpoints", "2", "--ema", "--ema-decay", "0.9",
              "--dtype", "fp32")
    straight = tmp_path / "straight"
    assert train.main(ws.train_args(straight, *common)) == 0

    crashed = tmp_path / "crashed"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "training" / "train.py"),
                           *ws.train_args(crashed, *common, "--debug-crash-in-checkpoint", "4")],
                          cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 137, proc.stderr[-3000:]
    root = crashed / "checkpoints"
    assert (root / "step-0000004.tmp").is_dir()  # the write was cut
    assert ck.latest_checkpoint(root) == root / "step-0000002"  # the previous checkpoint survives
    assert [r["step"] for r in ck.LossLog(crashed / "losses.jsonl").read()] == [1, 2, 3, 4]
    assert not (crashed / "instantfamily.safetensors").exists()

    assert train.main(ws.train_args(crashed, *common, "--resume")) == 0
    assert not (root / "step-0000004.tmp").exists()
    assert [p.name for _, p in ck.list_checkpoints(root)] == ["step-0000002", "step-0000004"]

    a, b = ck.LossLog(straight / "losses.jsonl").read(), ck.LossLog(crashed / "losses.jsonl").read()
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    torch.testing.assert_close(torch.tensor([r["loss"] for r in b]), torch.tensor([r["loss"] for r in a]),
                               rtol=1e-5, atol=1e-7)
    for name in ("instantfamily.safetensors", "instantfamily-ema.safetensors"):
        wa, wb = load_file(str(straight / name)), load_file(str(crashed / name))
        assert set(wa) == set(wb)
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name} {k}: {m}")
    state = json.loads((root / "step-0000004" / "state.json").read_text())
    assert state["global_step"] == 4 and state["consumed_micro_batches"] == 4


def test_export_is_fp16_by_default_with_normal_permissions(ws, tmp_path):
    out = tmp_path / "run"
    assert train.main(ws.train_args(out, "--max-steps", "1", "--checkpoint-every", "1")) == 0
    step = out / "checkpoints" / "step-0000001"
    trained = load_file(str(step / "model.safetensors"))
    assert all(v.dtype == torch.float32 for v in trained.values())  # the trained weights themselves: fp32
    half, full = tmp_path / "half.safetensors", tmp_path / "full.safetensors"
    old = os.umask(0o027)
    try:
        assert export.main(["--checkpoint", str(step), "--output", str(half)]) == 0
    finally:
        os.umask(old)
    assert export.main(["--checkpoint", str(step), "--output", str(full), "--dtype", "fp32"]) == 0
    assert (half.stat().st_mode & 0o777) == 0o640  # 0o666 minus the umask, not mkstemp's 0o600
    assert (full.stat().st_mode & 0o777) == 0o666 & ~old
    assert ((out / "instantfamily.safetensors").stat().st_mode & 0o777) == 0o666 & ~old
    a, b = load_file(str(half)), load_file(str(full))
    assert set(a) == set(b) and all(v.dtype == torch.float16 for v in a.values())
    assert all(b[k].dtype == torch.float32 and torch.equal(a[k], b[k].half()) for k in a)
    assert load_checkpoint(str(half)).meta.extra["dtype"] == "fp16"
    final = load_file(str(out / "instantfamily.safetensors"))  # train.py's own export: fp16 by default
    assert all(v.dtype == torch.float16 for v in final.values())


@pytest.fixture
def fresh_accelerator():
    """accelerate keeps one process-wide state (its mixed precision cannot change within a process); reset it around
    tests that use another precision, as accelerate's own test cases do."""
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def _fp16_copy(src: Path, dst: Path) -> Path:
    from safetensors.torch import save_file
    save_file({k: v.half() if v.is_floating_point() else v for k, v in load_file(str(src)).items()}, str(dst))
    return dst


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_fp16_base_file_trains_in_any_precision_with_fp32_trained_weights(ws, tmp_path, precision,
                                                                           fresh_accelerator):
    """An fp16 checkpoint with --mixed-precision no used to fail in the VAE (half bias, float input); with bf16 the
    ControlNet was built from the already-cast UNet (half-precision trained weights)."""
    base = _fp16_copy(Path(ws.setup.single_file), tmp_path / "fp16.safetensors")
    args = ws.train_args(tmp_path / "run", "--max-steps", "1", "--checkpoint-every", "1",
                         "--mixed-precision", precision)
    args[args.index("--base") + 1] = str(base)
    assert train.main(args) == 0
    trained = load_file(str(tmp_path / "run" / "checkpoints" / "step-0000001" / "model.safetensors"))
    assert trained and all(v.dtype == torch.float32 for v in trained.values())
    rows = ck.LossLog(tmp_path / "run" / "losses.jsonl").read()
    assert len(rows) == 1 and 0 < rows[0]["loss"] < 10


def test_controlnet_starts_from_the_fp32_unet_before_the_cast(ws, tmp_path, monkeypatch, fresh_accelerator):
    """The ControlNet copy is taken from the fp32 UNet (exactly its weights), and only then are the frozen parts cast
    to the mixed-precision dtype."""
    seen = {}
    real = M.make_controlnet

    def spy(unet):
        seen["unet_dtype"] = next(unet.parameters()).dtype
        cn = real(unet)
        seen["cn"] = {k: v.clone() for k, v in cn.state_dict().items()}
        return cn
    monkeypatch.setattr(train, "make_controlnet", spy)
    args = ws.train_args(tmp_path / "run", "--max-steps", "1", "--checkpoint-every", "1", "--mixed-precision", "bf16")
    assert train.main(args) == 0
    assert seen["unet_dtype"] == torch.float32
    unet = ws.setup.components.unet.state_dict()
    assert all(v.dtype == torch.float32 for v in seen["cn"].values())
    copied = [k for k in seen["cn"] if k in unet and not k.startswith("controlnet_")]
    assert len(copied) > 50 and all(torch.equal(seen["cn"][k], unet[k]) for k in copied)


def test_controlnet_init_starts_training_from_the_given_controlnet_and_refuses_other_files(ws, tmp_path):
    """--controlnet-init on the CLI (layouts checked against ComfyUI's loader in test_training_real_files.py)."""
    from safetensors.torch import save_file

    from instantfamily_core.errors import BaseModelError, ModelFileError
    unet = ws.setup.components.unet
    start = {k: v.clone() for k, v in ws.setup.controlnet.state_dict().items()}  # random zero-convs: not from_unet
    init = tmp_path / "openpose-diffusers-fp16.safetensors"
    save_file({k: v.half() for k, v in start.items()}, str(init))
    cn = M.load_controlnet_init(init, unet)
    assert all(v.dtype == torch.float32 and torch.equal(v, start[k].half().float()) for k, v in cn.state_dict().items())

    out = tmp_path / "run"
    assert train.main(ws.train_args(out, "--max-steps", "1", "--checkpoint-every", "1", "--lr", "0",
                                    "--max-grad-norm", "0", "--controlnet-init", str(init), "--dtype", "fp32")) == 0
    trained = load_file(str(out / "checkpoints" / "step-0000001" / "model.safetensors"))
    got = {k[len("controlnet."):]: v for k, v in trained.items() if k.startswith("controlnet.")}
    assert set(got) == set(start) and all(torch.equal(got[k], start[k].half().float()) for k in got)  # lr 0

    with pytest.raises(BaseModelError, match="not a ControlNet"):
        M.load_controlnet_init(ws.setup.single_file, unet)  # an SD1.5 checkpoint
    bad = dict(start)
    w = bad["controlnet_cond_embedding.conv_in.weight"]
    bad["controlnet_cond_embedding.conv_in.weight"] = torch.zeros(w.shape[0], 1, *w.shape[2:])
    save_file(bad, str(tmp_path / "depth-1ch.safetensors"))
    with pytest.raises(BaseModelError, match="1 channels"):
        M.load_controlnet_init(tmp_path / "depth-1ch.safetensors", unet)
    with pytest.raises(ModelFileError, match="does not exist"):
        M.load_controlnet_init(tmp_path / "nope.pth", unet)
    assert train.main(ws.train_args(tmp_path / "run2", "--max-steps", "1",
                                    "--controlnet-init", str(tmp_path / "depth-1ch.safetensors"))) == 2


def test_controlnet_init_folder_as_published_with_bin_safetensors_and_fp16_variants(ws, tmp_path):
    """lllyasviel/control_v11p_sd15_openpose holds diffusion_pytorch_model{,.fp16}.{bin,safetensors}: the standard
    safetensors file is read; a folder with only fp16 files reads those."""
    from safetensors.torch import save_file
    start = {k: v.clone() for k, v in ws.setup.controlnet.state_dict().items()}
    folder = tmp_path / "control_v11p_sd15_openpose"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(M.json_config(ws.setup.controlnet.config)))
    save_file(start, str(folder / "diffusion_pytorch_model.safetensors"))
    torch.save({k: torch.zeros_like(v) for k, v in start.items()}, str(folder / "diffusion_pytorch_model.bin"))
    save_file({k: v.half() for k, v in start.items()}, str(folder / "diffusion_pytorch_model.fp16.safetensors"))
    cn = M.load_controlnet_init(folder, ws.setup.components.unet)
    assert all(torch.equal(v, start[k]) for k, v in cn.state_dict().items())
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    (folder / "diffusion_pytorch_model.bin").unlink()
    cn = M.load_controlnet_init(folder, ws.setup.components.unet)
    assert all(torch.equal(v, start[k].half().float()) for k, v in cn.state_dict().items())
