#!/usr/bin/env python
"""Train InstantFamily (identity projector + pose ControlNet, SD1.5 UNet frozen) on prepared shards.

    accelerate launch training/train.py --base v1-5-pruned-emaonly.safetensors --tokenizer <clip tokenizer> \
        --data data/shards --output runs/if [--mixed-precision bf16] [--gradient-checkpointing] [--resume]

Single process (CPU or one GPU): ``python training/train.py ...`` (or ``python -m training.train ...`` from the
repository root). The flags follow diffusers' ``examples/controlnet/train_controlnet.py`` (``--report-to``,
``--lr-scheduler``, …); ``docs/training.md`` maps our names to theirs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional

if not __package__:  # run as a file, not as python -m training.train
    import _bootstrap  # noqa: F401  (training/_bootstrap.py: the repository root first on sys.path)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from accelerate.logging import get_logger  # noqa: E402

from instantfamily_core.attention import MODES  # noqa: E402
from instantfamily_core.errors import InstantFamilyError, OptionError  # noqa: E402
from instantfamily_core.projector import IdentityProjector, ProjectorConfig  # noqa: E402
from training import checkpoints as ck  # noqa: E402
from instantfamily_core.fileio import atomic_path, write_text_atomic  # noqa: E402
from training.data import DropoutConfig, EpochBatchSampler, ShardDataset, collate  # noqa: E402
from training.errors import TrainingError  # noqa: E402
from training.model import (IdentityBatch, InstantFamilyNet, as_fp32, encode_text,  # noqa: E402
                            export_checkpoint, json_config, load_controlnet_init, make_controlnet,
                            sample_latents)

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # --report-to value → the pip package it needs
REPORT_TO = (*TRACKER_PACKAGES, "all", "none")
SCHEDULE_KEYS = ("lr", "lr_scheduler", "lr_warmup_steps", "lr_num_cycles", "lr_power", "max_steps")  # in state.json

logger = get_logger(__name__)  # accelerate's: logs on the main process only (main_process_only=False for every rank)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--base", required=True, help="SD1.5: single-file checkpoint (.safetensors/.ckpt) or diffusers folder")
    g.add_argument("--tokenizer", default=None, help="CLIP tokenizer folder (vocab.json + merges.txt)")
    g.add_argument("--config-dir", default=None, help="SD1.5 config folder for single files (default: training/configs/sd15)")
    g.add_argument("--num-slots", type=int, default=4, help="identity slots N (paper: 4)")
    g.add_argument("--mask-mode", choices=MODES, default="additive")
    g.add_argument("--margin", type=float, default=None, help="face mask margin (default: the shards' value, 0.25)")
    g.add_argument("--projector-hidden", type=int, default=1024)
    g.add_argument("--controlnet-init", default=None, metavar="PATH",
                   help="start the pose ControlNet from a public SD1.5 OpenPose ControlNet (control_v11p_sd15_openpose"
                        ": .pth/.safetensors or diffusers folder; recommended) instead of a copy of the UNet (paper)")
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help="shard folder written by prepare.py")
    g.add_argument("--batch-size", type=int, default=8, help="per process (paper: 8 per GPU × 8 GPUs)")
    g.add_argument("--num-workers", type=int, default=2)
    g.add_argument("--drop-text", type=float, default=0.05)
    g.add_argument("--drop-identity", type=float, default=0.05)
    g.add_argument("--drop-both", type=float, default=0.05)
    g = p.add_argument_group("optimisation")
    g.add_argument("--max-steps", type=int, default=400_000)
    g.add_argument("--lr", type=float, default=1e-5, help="peak learning rate (after the warm-up)")
    g.add_argument("--lr-scheduler", choices=LR_SCHEDULERS, default="constant_with_warmup",
                   help="diffusers' get_scheduler; default constant_with_warmup (with the default 0 warm-up steps: "
                        "constant)")
    g.add_argument("--lr-warmup-steps", type=int, default=0, help="linear warm-up from 0 over this many steps")
    g.add_argument("--lr-num-cycles", type=int, default=1, help="hard restarts of cosine_with_restarts")
    g.add_argument("--lr-power", type=float, default=1.0, help="power of the polynomial decay")
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--weight-decay", type=float, default=1e-2)
    g.add_argument("--adam-epsilon", type=float, default=1e-8)
    g.add_argument("--max-grad-norm", type=float, default=1.0)
    g.add_argument("--grad-accum", type=int, default=1)
    g.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default=None,
                   help="default: accelerate's config (no on CPU)")
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--ema", action="store_true", help="keep an EMA of the trainable weights (exported separately)")
    g.add_argument("--ema-decay", type=float, default=0.9999)
    g.add_argument("--allow-tf32", action="store_true")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("output")
    g.add_argument("--output", required=True)
    g.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from the latest checkpoint in --output (or from the given step folder)")
    g.add_argument("--checkpoint-every", type=int, default=1000)
    g.add_argument("--keep-checkpoints", type=int, default=3, help="keep the last M checkpoints (0 = all)")
    g.add_argument("--log-every", type=int, default=10, help="optimizer steps between tracker logs")
    g.add_argument("--report-to", choices=REPORT_TO, default=None,
                   help="experiment tracker (accelerate): tensorboard (<output>/logs), wandb, all (every installed "
                        "one) or none; default: tensorboard when it is installed, else none")
    g.add_argument("--tracker-project-name", default="instantfamily", help="project name given to the trackers")
    g.add_argument("--validate-every", type=int, default=1000, help="0 = never")
    g.add_argument("--num-validation", type=int, default=4)
    g.add_argument("--validation-steps", type=int, default=20)
    g.add_argument("--guidance", type=float, default=5.0)
    g.add_argument("--face-pack", default=None, help="recorded in the export (default: the shards' pack)")
    g.add_argument("--export", default=None, help="export path at the end (default: <output>/instantfamily.safetensors)")
    g.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16", help="tensor type of the exported file")
    g.add_argument("--no-progress", action="store_true")
    # fault injection for the crash tests
    p.add_argument("--debug-crash-in-checkpoint", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--debug-weight-digest", action="store_true", help=argparse.SUPPRESS)
    return p


def micro_generator(seed: int, rank: int, micro: int) -> torch.Generator:
    """The random stream (noise, timesteps, VAE sampling) of one micro-batch: a function of the seed, the rank and
    the number of micro-batches consumed — so a resumed run draws the same numbers."""
    s = np.random.SeedSequence([seed, rank, micro]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(s) & 0x7FFF_FFFF_FFFF_FFFF)


def run_config(args, controlnet, projector: IdentityProjector, dataset: ShardDataset, face_pack: str) -> dict:
    return {"controlnet_config": json_config(controlnet.config), "projector_config": projector.config.to_dict(),
            "face_pack": face_pack, "mask_mode": args.mask_mode, "num_slots": args.num_slots,
            "margin": dataset.margin, "resolution": dataset.resolution, "base": str(args.base),
            "args": {k: v for k, v in vars(args).items() if not k.startswith("debug")}}


def weight_dtype_for(accelerator) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(str(accelerator.mixed_precision), torch.float32)


def save_state(accelerator, net, ema, args, out: Path, step: int, consumed: int, config: dict) -> None:
    """Write ``checkpoints/step-N`` atomically: into ``step-N.tmp`` (all ranks), then renamed by the main process."""
    root = out / "checkpoints"
    tmp = ck.step_dir(root, step).with_name(ck.step_dir(root, step).name + ".tmp")
    if accelerator.is_main_process:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.distributed_type.name in ("FSDP", "DEEPSPEED"):
        full = accelerator.get_state_dict(net)
        if accelerator.is_main_process:
            from safetensors.torch import save_file
            save_file({k: v.contiguous().cpu() for k, v in full.items()}, str(tmp / "trainable.safetensors"))
    if accelerator.is_main_process:
        if args.debug_crash_in_checkpoint == step:
            os._exit(137)  # simulated kill -9 in the middle of the write
        if ema is not None:
            ema.save(tmp / "ema.safetensors")
        write_text_atomic(tmp / "run_config.json", json.dumps(config, indent=1))
        write_text_atomic(tmp / "state.json", json.dumps({
            "global_step": step, "consumed_micro_batches": consumed, "batch_size": args.batch_size,
            "grad_accum": args.grad_accum, "world_size": accelerator.num_processes, "seed": args.seed,
            **{k: getattr(args, k) for k in SCHEDULE_KEYS}}))
        ck.publish(tmp, ck.step_dir(root, step))
        ck.prune(root, args.keep_checkpoints)
    accelerator.wait_for_everyone()


def resolve_resume(args, out: Path) -> Optional[Path]:
    if args.resume is None:
        if ck.list_checkpoints(out / "checkpoints"):
            raise TrainingError(f"--output {out} already has checkpoints; pass --resume to continue, or use a new "
                                "folder")
        return None
    if args.resume == "latest":
        return ck.latest_checkpoint(out / "checkpoints")  # None: nothing yet, start fresh
    p = Path(args.resume)
    if not (p / "state.json").is_file():
        raise TrainingError(f"--resume: {p} is not a complete checkpoint folder (no state.json)")
    return p


@torch.no_grad()
def validate(accelerator, comps, net, dataset: ShardDataset, args, out: Path, step: int, trackers: bool) -> Path:
    """Sample the first ``--num-validation`` samples (fixed seed) and save control | generated | reference."""
    from diffusers import DDIMScheduler
    from PIL import Image
    from training.data import collate as _collate
    model = accelerator.unwrap_model(net)
    device, wdtype = accelerator.device, weight_dtype_for(accelerator)
    items = [dataset.validation_item(i) for i in range(min(args.num_validation, len(dataset)))]
    batch = _collate(items)
    text = encode_text(comps.text_encoder, comps.tokenizer, batch["caption"], device).to(wdtype)
    uncond = encode_text(comps.text_encoder, comps.tokenizer, [""] * len(items), device).to(wdtype)
    ids = IdentityBatch(batch["global"], batch["local"], batch["present"]).to(device)
    sched = DDIMScheduler.from_config(comps.scheduler_config)
    r = dataset.resolution
    f = 2 ** (len(comps.vae.config.block_out_channels) - 1)
    shape = (len(items), comps.unet.config.in_channels, r // f, r // f)
    with accelerator.autocast():
        lat = sample_latents(comps.unet, model.controlnet, model.projector, sched, text, uncond, ids,
                             batch["masks"].to(device), batch["control"].to(device, wdtype), shape,
                             steps=args.validation_steps, guidance=args.guidance, mask_mode=args.mask_mode,
                             generator=torch.Generator().manual_seed(args.seed))
        images = comps.vae.decode(lat.to(wdtype) / comps.vae.config.scaling_factor).sample
    gen = ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().cpu()
    ref = ((batch["pixels"] + 1) * 127.5).round().byte()
    ctl = (batch["control"] * 255).round().byte()
    rows = torch.cat([torch.cat([c, g, x], dim=2) for c, g, x in zip(ctl, gen, ref)], dim=1)  # 3, n·r, 3·r
    path = out / "validation" / f"step-{step:07d}.png"
    with atomic_path(path, ".png") as tmp:
        Image.fromarray(rows.permute(1, 2, 0).numpy()).save(tmp, format="PNG")
    if trackers:
        log_images(accelerator, rows, step)
    net.train()
    return path


def log_images(accelerator, rows: torch.Tensor, step: int) -> None:
    """The validation grid (uint8, 3 × H × W) to each active tracker that takes images."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation", rows, step)
        elif tracker.name == "wandb":
            import wandb
            tracker.log({"validation": [wandb.Image(rows.permute(1, 2, 0).numpy())]}, step=step)


def tracker_installed(name: str) -> bool:
    from accelerate.utils import is_tensorboard_available, is_wandb_available
    return {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}[name]()


def resolve_report_to(value: Optional[str]) -> Optional[str]:
    """accelerate's ``log_with`` for ``--report-to``. The default (``None``) is tensorboard when it is installed
    (it writes local files, so it works offline) and no tracker otherwise; a tracker asked for by name must be
    installed."""
    if value is None:
        return "tensorboard" if tracker_installed("tensorboard") else None
    if value == "none":
        return None
    if value in TRACKER_PACKAGES and not tracker_installed(value):
        raise OptionError(f"--report-to {value}: the {TRACKER_PACKAGES[value]} package is not installed; "
                          f"pip install {TRACKER_PACKAGES[value]}, or pass --report-to none")
    return value


def check_schedule(args) -> None:
    """The learning-rate schedule flags, checked before anything is loaded."""
    if args.lr_warmup_steps < 0:
        raise OptionError(f"--lr-warmup-steps: expected ≥ 0, got {args.lr_warmup_steps}")
    if args.lr_warmup_steps and args.lr_scheduler == "constant":
        raise OptionError(f"--lr-warmup-steps {args.lr_warmup_steps}: --lr-scheduler constant has no warm-up; use "
                          "constant_with_warmup")
    if args.lr_num_cycles < 1:
        raise OptionError(f"--lr-num-cycles: expected ≥ 1, got {args.lr_num_cycles}")


def make_lr_scheduler(args, optimizer, num_processes: int):
    """diffusers' ``get_scheduler`` as its training scripts call it: accelerate steps a prepared scheduler once per
    process per optimizer step, hence the step counts times the number of processes."""
    from diffusers.optimization import get_scheduler
    try:
        return get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps * num_processes,
                             num_training_steps=args.max_steps * num_processes, num_cycles=args.lr_num_cycles,
                             power=args.lr_power)
    except ValueError as e:  # e.g. polynomial: the end lr (1e-7) must be below --lr
        raise OptionError(f"--lr-scheduler {args.lr_scheduler} with --lr {args.lr}: {e}") from e


def export_final(accelerator, net, ema, config: dict, path: Path, face_pack: str,
                 dtype: str = "fp16") -> list[Path]:
    model = accelerator.unwrap_model(net)
    state = accelerator.get_state_dict(net)
    written = []
    if accelerator.is_main_process:
        variants = [(path, state)]
        if ema is not None:
            variants.append((path.with_name(path.stem + "-ema" + path.suffix), ema.state_dict_for(model)))
        for target, sd in variants:
            projector = IdentityProjector(model.projector.config)
            projector.load_state_dict({k[len("projector."):]: v for k, v in sd.items() if k.startswith("projector.")})
            cn_state = {k[len("controlnet."):]: v for k, v in sd.items() if k.startswith("controlnet.")}
            export_checkpoint(target, projector, config["controlnet_config"], face_pack, config["mask_mode"],
                              config["num_slots"], controlnet_state=cn_state,
                              extra={"training_steps": str(config.get("global_step", "")),
                                     "ema": "true" if target != path else "false"}, dtype=dtype)
            written.append(target)
    accelerator.wait_for_everyone()
    return written


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S",
                        level=logging.INFO)
    try:
        return train(args)
    except InstantFamilyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def train(args) -> int:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers import DDPMScheduler
    from tqdm import tqdm

    from training.sd15 import load_base

    for name in ("batch_size", "grad_accum", "max_steps", "checkpoint_every", "num_slots", "log_every"):
        if getattr(args, name) < 1:
            raise OptionError(f"--{name.replace('_', '-')}: expected ≥ 1, got {getattr(args, name)}")
    ck.check_ema_decay(args.ema_decay)  # before any model is loaded
    check_schedule(args)
    out = Path(args.output)
    log_with = resolve_report_to(args.report_to)
    accelerator = Accelerator(gradient_accumulation_steps=args.grad_accum, mixed_precision=args.mixed_precision,
                              log_with=log_with,
                              project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")))
    logger.info(accelerator.state, main_process_only=False)
    if args.report_to is None and log_with is None:
        logger.warning("tensorboard is not installed: no training curves (pip install tensorboard, or pass "
                       "--report-to none to silence this)")
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    main_proc = accelerator.is_main_process
    if main_proc:
        out.mkdir(parents=True, exist_ok=True)
        ck.remove_partial(out / "checkpoints")
    accelerator.wait_for_everyone()
    resume_dir = resolve_resume(args, out)
    set_seed(args.seed)

    info = _manifest_info(args.data)
    dataset = ShardDataset(args.data, num_slots=args.num_slots,
                           margin=args.margin if args.margin is not None else float(info.get("margin", 0.25)),
                           seed=args.seed, dropout=DropoutConfig(args.drop_text, args.drop_identity, args.drop_both))
    face_pack = args.face_pack or info.get("face_pack", "")
    comps = load_base(args.base, args.tokenizer, args.config_dir)  # fp32, whatever the file stores
    wdtype = weight_dtype_for(accelerator)
    # the trained parts are fp32 (master weights; autocast does the mixed precision), the ControlNet copied from
    # the fp32 UNet before the frozen parts are cast to the mixed-precision dtype
    controlnet = as_fp32(load_controlnet_init(args.controlnet_init, comps.unet) if args.controlnet_init
                         else make_controlnet(comps.unet))
    for m in (comps.unet, comps.vae, comps.text_encoder):
        m.to(accelerator.device)
        if wdtype != torch.float32:
            m.to(dtype=wdtype)
    pcfg = ProjectorConfig(global_dim=dataset.global_dim, local_dim=dataset.local_dim, grid=dataset.grid,
                           token_dim=int(comps.unet.config.cross_attention_dim), hidden_dim=args.projector_hidden)
    projector = IdentityProjector(pcfg)
    if args.gradient_checkpointing:
        comps.unet.enable_gradient_checkpointing()
        controlnet.enable_gradient_checkpointing()
    net = InstantFamilyNet(controlnet, projector, args.mask_mode).train()
    config = run_config(args, controlnet, projector, dataset, face_pack)

    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.weight_decay, eps=args.adam_epsilon)
    lr_scheduler = make_lr_scheduler(args, optimizer, accelerator.num_processes)
    sharded = accelerator.distributed_type.name in ("FSDP", "DEEPSPEED")
    if sharded and args.ema:
        raise TrainingError("--ema keeps a full copy of the weights per process and supports DDP only; drop --ema "
                            "with FSDP / DeepSpeed")
    if sharded and args.validate_every:
        logger.warning("validation images need the unsharded model; disabled under FSDP / DeepSpeed (export a "
                       "checkpoint and sample it instead)")
        args.validate_every = 0
    net, optimizer, lr_scheduler = accelerator.prepare(net, optimizer, lr_scheduler)
    ema = ck.EMA(accelerator.unwrap_model(net), args.ema_decay).to(accelerator.device) if args.ema else None

    global_step, consumed = 0, 0
    if resume_dir is not None:
        state = json.loads((resume_dir / "state.json").read_text())
        if (state["batch_size"], state["grad_accum"], state["world_size"]) != \
                (args.batch_size, args.grad_accum, accelerator.num_processes):
            logger.warning(f"{resume_dir.name} was trained with batch {state['batch_size']}, accumulation "
                           f"{state['grad_accum']} on {state['world_size']} processes; the data order changes")
        changed = {k: (state[k], getattr(args, k)) for k in SCHEDULE_KEYS
                   if k in state and state[k] != getattr(args, k)}
        if changed:
            was = ", ".join(f"--{k.replace('_', '-')} {a} (now {b})" for k, (a, b) in changed.items())
            logger.warning(f"{resume_dir.name} was trained with {was}: the restored scheduler keeps its step and its "
                           "base learning rate, and goes on along the curve the current flags give")
        accelerator.load_state(str(resume_dir))
        if ema is not None and (resume_dir / "ema.safetensors").is_file():
            ema.load(resume_dir / "ema.safetensors")
        global_step, consumed = int(state["global_step"]), int(state["consumed_micro_batches"])
        logger.info(f"resumed from {resume_dir} at step {global_step} (lr {lr_scheduler.get_last_lr()[0]:.3g})")
    loss_log = ck.LossLog(out / "losses.jsonl")
    if main_proc:
        loss_log.truncate(global_step)
        write_text_atomic(out / "run_config.json", json.dumps(config, indent=1))
    accelerator.init_trackers(args.tracker_project_name, config={k: v for k, v in vars(args).items()
                                                                 if isinstance(v, (int, float, str, bool))})
    logger.info("***** Running training *****")
    logger.info(f"  samples = {len(dataset)}, batch size per process = {args.batch_size}, processes = "
                f"{accelerator.num_processes}, gradient accumulation = {args.grad_accum}, total batch size = "
                f"{args.batch_size * accelerator.num_processes * args.grad_accum}")
    logger.info(f"  optimizer steps = {args.max_steps} (from {global_step}), lr {args.lr} "
                f"({args.lr_scheduler}, {args.lr_warmup_steps} warm-up steps), trackers: {log_with or 'none'}")

    sampler = EpochBatchSampler(len(dataset), args.batch_size, args.seed, accelerator.process_index,
                                accelerator.num_processes, start=consumed)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                         num_workers=args.num_workers, persistent_workers=args.num_workers > 0)
    noise_sched = DDPMScheduler.from_config(comps.scheduler_config)
    prediction = noise_sched.config.prediction_type
    scale = comps.vae.config.scaling_factor
    bar = tqdm(total=args.max_steps, initial=global_step, disable=not main_proc or args.no_progress, desc="train")
    data_iter = iter(loader)
    step_losses, t0 = [], time.time()
    while global_step < args.max_steps:
        batch = next(data_iter)
        gen = micro_generator(args.seed, accelerator.process_index, consumed)
        consumed += 1
        with accelerator.accumulate(net):
            pixels = batch["pixels"].to(accelerator.device, wdtype)
            with torch.no_grad():
                dist = comps.vae.encode(pixels).latent_dist
                eps = torch.randn(dist.mean.shape, generator=gen).to(dist.mean)
                latents = (dist.mean + dist.std * eps) * scale
                noise = torch.randn(latents.shape, generator=gen).to(latents)
                t = torch.randint(0, noise_sched.config.num_train_timesteps, (latents.shape[0],),
                                  generator=gen).to(accelerator.device)
                noisy = noise_sched.add_noise(latents, noise, t)
                text = encode_text(comps.text_encoder, comps.tokenizer, batch["caption"], accelerator.device)
            ids = IdentityBatch(batch["global"], batch["local"], batch["present"], batch["drop_identity"])
            with accelerator.autocast():
                pred = net(comps.unet, noisy, t, text.to(wdtype), ids.to(accelerator.device),
                           batch["masks"], batch["control"].to(accelerator.device))  # masks stay on the CPU: the
                # core builds its bias there once per resolution and moves it to the device
            target = noise if prediction == "epsilon" else noise_sched.get_velocity(latents, noise, t)
            loss = F.mse_loss(pred.float(), target.float())
            if not torch.isfinite(loss):
                raise TrainingError(f"loss became {loss.item()} at step {global_step + 1}; lower --lr or use bf16 "
                                    "instead of fp16")
            accelerator.backward(loss)
            if accelerator.sync_gradients and args.max_grad_norm > 0:
                accelerator.clip_grad_norm_(params, args.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        step_losses.append(accelerator.gather(loss.detach().reshape(1)).mean().item())
        if not accelerator.sync_gradients:
            continue
        global_step += 1
        if ema is not None:
            ema.update(accelerator.unwrap_model(net))
        mean_loss = float(np.mean(step_losses))
        step_losses = []
        lr = lr_scheduler.get_last_lr()[0]
        if main_proc:
            loss_log.append({"step": global_step, "loss": mean_loss, "lr": lr})
        if global_step % args.log_every == 0 or global_step == args.max_steps:
            accelerator.log({"train_loss": mean_loss, "lr": lr, "sec_per_step": (time.time() - t0) / args.log_every},
                            step=global_step)
            t0 = time.time()
        bar.update(1)
        bar.set_postfix(loss=f"{mean_loss:.4f}")
        if global_step % args.checkpoint_every == 0 or global_step == args.max_steps:
            config["global_step"] = global_step
            save_state(accelerator, net, ema, args, out, global_step, consumed, config)
        if args.validate_every and (global_step % args.validate_every == 0) and main_proc:
            path = validate(accelerator, comps, net, dataset, args, out, global_step, trackers=True)
            logger.info(f"step {global_step}: validation images {path}")
        if args.validate_every:
            accelerator.wait_for_everyone()
    bar.close()
    config["global_step"] = global_step
    export_path = Path(args.export) if args.export else out / "instantfamily.safetensors"
    for p in export_final(accelerator, net, ema, config, export_path, face_pack, args.dtype):
        accelerator.print(f"exported {p}")
    if args.debug_weight_digest:
        sd = accelerator.unwrap_model(net).state_dict()
        digest = {k: float(v.double().sum()) for k, v in sd.items()}
        write_text_atomic(out / f"weights-rank{accelerator.process_index}.json", json.dumps(digest))
    accelerator.end_training()
    return 0


def _manifest_info(folder) -> dict:
    from training.data import read_manifest
    return read_manifest(folder)["info"]


if __name__ == "__main__":
    sys.exit(main())
