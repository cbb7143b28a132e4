#!/usr/bin/env python
"""Generate images for an evaluation cases file with an InstantFamily checkpoint or the public FaceID weights
(and optionally score them).

    python training/generate.py --cases cases.json --checkpoint instantfamily.safetensors \
        --base models/checkpoints/v1-5-pruned-emaonly.safetensors --face-root ComfyUI/models/insightface \
        --out outputs/ckpt-5000 [--seeds 4] [--steps 30] [--cfg 5.0] [--batch-size 4] \
        [--recognizer dlib]          # then runs evaluate.py on the images: outputs/ckpt-5000/eval/summary.md

    python training/generate.py --cases cases.json --faceid models/ipadapter/ip-adapter-faceid_sdxl.bin \
        --base models/checkpoints/sd_xl_base_1.0.safetensors \
        --controlnet models/controlnet/OpenPoseXL2.safetensors --face-root ComfyUI/models/insightface \
        --out outputs/faceid-sdxl --width 1024 --height 1024 [--recognizer dlib]

The FaceID mode (``--faceid``, SD1.5 or SDXL; :mod:`training.faceid`) is *Apply InstantFamily FaceID*: identities
encoded with buffalo_l (``--face-pack``), each person's FaceID tokens acting only inside their face mask in every
cross-attention of the UNet, the file's LoRA merged at ``--lora-strength`` (1), the unconditional tokens on the
uncond half of the CFG batch, and an optional stock OpenPose ControlNet (``--controlnet``) reading the skeleton-only
pose image (Pose to Masks' "OpenPose" control style). Plus files need CLIP ViT-H/14 (``--clip-vision``).

Per case (the evaluation CLI's cases format, ``training/evaluation/cases.py``) and seed it writes
``<out>/<case id>_<seed>.png`` — the names ``evaluate.py`` reads. Existing images are kept, so an interrupted run
continues where it stopped (images are written atomically; a run with other settings into the same folder is
refused).

The math is the ComfyUI nodes' (see docs/evaluation.md, "Generate"): identities encoded like *Encode Identity* (largest face
per reference image, averaged), masks and the control image like *Pose to Masks*, the projector, masked attention
and ControlNet of the checkpoint like *Apply InstantFamily* (weight 1, ControlNet strength 1, whole schedule), and
sampling equal to ComfyUI's ``KSampler`` with sampler ``euler``, scheduler ``simple`` and the same seed (initial
noise ``torch.randn`` of a CPU generator seeded with the seed, one latent per image).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

if not __package__:  # run as a file, not as python -m training.generate
    import _bootstrap  # noqa: F401  (training/_bootstrap.py: the repository root first on sys.path)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from instantfamily_core.errors import (CheckpointError, EmbeddingError, InstantFamilyError,  # noqa: E402
                                        ModelFileError, OptionError)
from instantfamily_core.fileio import atomic_path  # noqa: E402
from instantfamily_core.masks import boxes_to_masks  # noqa: E402
from instantfamily_core.pose import DEFAULT_MARGIN, PoseFrame, assign_slots, parse_pose, person_for_box  # noqa: E402
from instantfamily_core.render import draw_control_image, draw_openpose_image  # noqa: E402
from training.evaluation.cases import Case, load_cases, load_rgb  # noqa: E402
from training.errors import GenerateError  # noqa: E402

TEMPLATES_DIR = Path(os.path.abspath(__file__)).parents[1] / "pose_templates"
MANIFEST = "generate.json"
SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
CONTROL_STYLES = ("instantfamily", "openpose")
FACEID_PACK = "buffalo_l"  # the face pack the FaceID weights were trained on


# ---------------------------------------------------------------------------------------------------------------
# sampling schedule: ComfyUI's KSampler "euler" + "simple", written as a VP scheduler for sample_latents

@dataclass
class _Step:
    prev_sample: torch.Tensor


def alphas_cumprod_for(config: dict) -> torch.Tensor:
    """``ᾱ_t`` (float64) of an SD scheduler config (``scaled_linear`` or ``linear`` betas, like ComfyUI's
    ``ModelSamplingDiscrete``)."""
    n = int(config.get("num_train_timesteps", 1000))
    b0, b1 = float(config.get("beta_start", 0.00085)), float(config.get("beta_end", 0.012))
    kind = config.get("beta_schedule", "scaled_linear")
    if kind == "scaled_linear":
        betas = torch.linspace(b0 ** 0.5, b1 ** 0.5, n, dtype=torch.float64) ** 2
    elif kind == "linear":
        betas = torch.linspace(b0, b1, n, dtype=torch.float64)
    else:
        raise GenerateError(f"scheduler config: beta_schedule {kind!r} is not supported (scaled_linear, linear)")
    if config.get("prediction_type", "epsilon") != "epsilon":
        raise GenerateError(f"scheduler config: prediction_type {config.get('prediction_type')!r}; SD1.5 and this "
                            "CLI use 'epsilon'")
    return torch.cumprod(1.0 - betas, dim=0)


class EulerSimpleScheduler:
    """Deterministic Euler on ComfyUI's ``simple`` schedule, in the variance-preserving form ``sample_latents`` uses.

    ``simple`` takes the training timesteps ``T-1 - floor(k·T/steps)``, k = 0…steps-1, then σ = 0. Euler in
    σ-space on ``x̃ = x_t / √ᾱ_t`` is exactly the DDIM (η = 0) update between consecutive timesteps, and starting
    from ``x_t = noise`` at ``t = T-1`` equals ComfyUI's ``noise · √(1 + σ_max²)`` (its ``max_denoise`` case); the
    last step goes to ᾱ = 1, i.e. σ = 0."""

    init_noise_sigma = 1.0

    def __init__(self, config: dict):
        self.alphas_cumprod = alphas_cumprod_for(config)
        self.timesteps = torch.zeros(0, dtype=torch.long)

    def set_timesteps(self, steps: int, device=None) -> None:
        n = len(self.alphas_cumprod)
        if not 1 <= steps <= n:
            raise OptionError(f"--steps: expected 1…{n}, got {steps}")
        ss = n / steps
        self.timesteps = torch.tensor([n - 1 - int(k * ss) for k in range(steps)], dtype=torch.long, device=device)
        self._next = {int(t): (int(self.timesteps[i + 1]) if i + 1 < steps else None)
                      for i, t in enumerate(self.timesteps)}

    def scale_model_input(self, sample: torch.Tensor, t) -> torch.Tensor:
        return sample

    def step(self, eps: torch.Tensor, t, sample: torch.Tensor) -> _Step:
        t = int(t)
        nxt = self._next[t]
        a_t = float(self.alphas_cumprod[t])
        a_prev = 1.0 if nxt is None else float(self.alphas_cumprod[nxt])
        x0 = (sample.double() - math.sqrt(1 - a_t) * eps.double()) / math.sqrt(a_t)
        prev = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps.double()
        return _Step(prev.to(sample.dtype))


def seed_noise(seeds: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """One ``randn(1, *shape)`` per seed from a CPU generator seeded with it (ComfyUI's ``prepare_noise``)."""
    return torch.cat([torch.randn((1, *shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds])


# ---------------------------------------------------------------------------------------------------------------
# per case: pose → slots, masks, control image (the Pose to Masks node's core calls)

@dataclass
class CaseLayout:
    masks: torch.Tensor      # (N, H, W) float in [0, 1]
    control: np.ndarray      # H×W×3 uint8
    source: str              # where the pose came from (for the manifest)


def template_path(n: int) -> Path:
    path = TEMPLATES_DIR / f"family_{n}.json"
    if not path.is_file():
        raise GenerateError(f"no bundled pose template for {n} identities (family_1 … family_8); give the case "
                            "'slots' with a 'pose' file")
    return path


def pose_from_boxes(boxes: Sequence[Sequence[float]], width: int, height: int, margin: float) -> PoseFrame:
    """A head-and-neck pose, one person per mask box in order: face box = the mask box shrunk by ``1 + margin``
    (so face box + margin gives the box back), carried as the person's detector box (``face_box_2d``)."""
    people = [person_for_box(box, margin) for box in boxes]
    return parse_pose({"canvas_width": width, "canvas_height": height, "people": people}, name="slot boxes")


def case_layout(case: Case, width: int, height: int, control: str = "instantfamily") -> CaseLayout:
    """Masks and control image of a case on a ``width×height`` canvas; ``control`` = ``"instantfamily"`` (skeletons
    + slot circles, for an InstantFamily checkpoint's ControlNet) or ``"openpose"`` (skeletons and face dots only,
    for a stock OpenPose ControlNet: Pose to Masks' "OpenPose" control style).

    * ``slots.pose``: the pose scaled to the canvas, slots by ``identity_order`` (else left to right) with the
      case's margin — exactly *Pose to Masks* with that POSE_KEYPOINT;
    * ``slots.boxes``: the boxes are the masks (like *Pose to Masks*' ``masks`` override), the control image shows
      one head per box;
    * no ``slots``: the bundled template ``family_<N>`` (left to right, margin 0.25), as in the 4- and 7-identity
      workflows. Without slots ``evaluate.py`` does not judge placement.
    """
    if control not in CONTROL_STYLES:
        raise OptionError(f"control: expected one of {CONTROL_STYLES}, got {control!r}")
    draw = draw_control_image if control == "instantfamily" else (lambda a: draw_openpose_image(a.frame))
    n = len(case.identities)
    slots = case.slots
    if slots is not None and slots.pose is not None:
        frame = slots.pose.scaled(width, height)
        assigned = assign_slots(frame, n, slots.identity_order, slots.margin, name=f"case {case.id!r} pose")
        return CaseLayout(assigned.masks(), draw(assigned), f"pose {slots.source}")
    if slots is not None:
        boxes = slots.boxes_for(width, height, n)
        frame = pose_from_boxes(boxes, width, height, DEFAULT_MARGIN)
        assigned = assign_slots(frame, n, list(range(n)), DEFAULT_MARGIN, name=f"case {case.id!r} boxes")
        return CaseLayout(boxes_to_masks(boxes, height, width), draw(assigned), "boxes")
    path = template_path(n)
    frame = parse_pose(path.read_text(encoding="utf-8"), name=str(path)).scaled(width, height)
    assigned = assign_slots(frame, n, None, DEFAULT_MARGIN, name=path.name)
    return CaseLayout(assigned.masks(), draw(assigned), f"template {path.name}")


# ---------------------------------------------------------------------------------------------------------------
# checkpoint: an exported file, a train.py step folder, or a run folder (its newest complete step)

def resolve_checkpoint(path: str | os.PathLike, use_ema: bool, workdir: str) -> Path:
    """The exported ``.safetensors`` to load; a training folder is exported into ``workdir`` first."""
    p = Path(path)
    if p.is_file():
        if use_ema:
            raise GenerateError("--ema applies to a training checkpoint folder; an exported file already holds one "
                                "set of weights (export with --ema, or pass the '-ema' file)")
        return p
    if not p.is_dir():
        raise CheckpointError(f"--checkpoint: {p} does not exist (give an exported .safetensors file or a train.py "
                              "checkpoint folder)")
    step = p
    if not (p / "run_config.json").is_file() and (p / "checkpoints").is_dir():
        from training.checkpoints import latest_checkpoint
        step = latest_checkpoint(p / "checkpoints")
        if step is None:
            raise CheckpointError(f"--checkpoint: {p / 'checkpoints'} holds no complete checkpoint (step-N folder "
                                  "with state.json)")
    from training.export import export_folder
    # fp32: the weights exactly as trained (export.py's default file is fp16)
    return export_folder(step, Path(workdir) / "instantfamily.safetensors", use_ema, dtype="fp32")


def fingerprint(ckpt) -> str:
    """A digest of a loaded checkpoint's weights and metadata (not of the file's bytes: a training folder is
    exported anew on every run, and safetensors does not fix the order of its metadata)."""
    h = hashlib.sha256()
    state = {f"projector.{k}": v for k, v in ckpt.projector.state_dict().items()}
    state.update({f"controlnet.{k}": v for k, v in ckpt.controlnet.items()})
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().float().cpu().contiguous().numpy().tobytes())
    h.update(json.dumps(ckpt.meta.to_strings(), sort_keys=True).encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--cases", required=True, help="cases file (.json or .jsonl) in the evaluation CLI's format")
    p.add_argument("--checkpoint", default=None,
                   help="InstantFamily mode: exported InstantFamily .safetensors, a train.py checkpoints/step-N "
                        "folder, or a run folder (its newest checkpoint)")
    p.add_argument("--ema", action="store_true", help="with a training folder: use its EMA weights")
    p.add_argument("--faceid", default=None,
                   help="FaceID mode (public weights) instead of --checkpoint: an IP-Adapter-FaceID file, "
                        "ip-adapter-faceid[-plusv2|-portrait…]_sd15.bin or …_sdxl.bin (the base must match)")
    p.add_argument("--controlnet", default=None,
                   help="FaceID mode: a stock OpenPose ControlNet of the base (SD1.5: control_v11p_sd15_openpose "
                        ".pth/.safetensors; SDXL: thibaud OpenPoseXL2.safetensors or xinsir "
                        "diffusion_pytorch_model.safetensors; or a diffusers folder); none = no pose control")
    p.add_argument("--controlnet-strength", type=float, default=1.0, help="FaceID mode: ControlNet strength")
    p.add_argument("--clip-vision", default=None,
                   help="FaceID Plus: CLIP ViT-H/14 (ComfyUI's clip_vision CLIP-ViT-H-14-laion2B-s32B-b79K"
                        ".safetensors, or a transformers folder such as h94/IP-Adapter models/image_encoder)")
    p.add_argument("--plus-version", default="auto", choices=["auto", "v1", "v2"],
                   help="FaceID Plus: v2 (x + s·perceiver) or v1; auto = v2 when the file name contains 'plusv2'")
    p.add_argument("--faceid-weight", type=float, default=1.0,
                   help="FaceID mode: identity scale (the reference's set_scale; 1 = as trained)")
    p.add_argument("--lora-strength", type=float, default=1.0,
                   help="FaceID mode: strength of the file's embedded LoRA on the UNet (trained at 1)")
    p.add_argument("--s-scale", type=float, default=1.0, help="FaceID Plus v2: weight of the CLIP (perceiver) part")
    p.add_argument("--base", required=True,
                   help="SD1.5 single-file checkpoint or diffusers folder (FaceID mode: SD1.5 or SDXL, e.g. "
                        "sd_xl_base_1.0.safetensors)")
    p.add_argument("--tokenizer", default=None, help="CLIP tokenizer folder (see train.py)")
    p.add_argument("--config-dir", default=None,
                   help="config folder for single files (default: the shipped training/configs/sd15 or /sdxl)")
    p.add_argument("--face-root", required=True, help="insightface root (ComfyUI/models/insightface)")
    p.add_argument("--face-pack", default=None,
                   help=f"face pack (default: the checkpoint's face_pack; FaceID mode: {FACEID_PACK})")
    p.add_argument("--provider", default="auto", help="onnxruntime provider for face analysis: auto|CPU|CUDA|…")
    p.add_argument("--det-size", type=int, default=640, help="face detector size (the loader node's det_size)")
    p.add_argument("--out", required=True, help="output folder for <case id>_<seed>.png")
    p.add_argument("--seeds", type=int, default=1, help="images per case (seeds --seed, --seed+1, …)")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--steps", type=int, default=30, help="sampling steps (KSampler steps)")
    p.add_argument("--cfg", type=float, default=5.0, help="classifier-free guidance scale (KSampler cfg)")
    p.add_argument("--negative", default="", help="negative prompt (default empty)")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--mask-mode", default="checkpoint", choices=["checkpoint", "additive", "paper"],
                   help="checkpoint = the mode it was trained with")
    p.add_argument("--batch-size", type=int, default=1, help="images per UNet batch (cases with the same N)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1 …")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="UNet/VAE/text/ControlNet precision (auto: fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--recognizer", default=None,
                   help="after generating, run evaluate.py with this recognizer (dlib | insightface:<root>:<pack> | "
                        "facenet:<weights.pt>) into <out>/eval")
    p.add_argument("--clip-model", default=None, help="evaluation: local CLIP folder for TextSim")
    p.add_argument("--label", default=None, help="evaluation: row label (default: the --out folder name)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p


def _check_args(args) -> None:
    if bool(args.checkpoint) == bool(args.faceid):
        raise OptionError("--checkpoint / --faceid: give exactly one (--checkpoint: an InstantFamily checkpoint; "
                          "--faceid: the public IP-Adapter-FaceID weights)")
    if args.faceid:
        if args.ema:
            raise OptionError("--ema: applies to an InstantFamily training folder (--checkpoint), not to --faceid")
        if args.mask_mode != "checkpoint":
            raise OptionError("--mask-mode: applies to an InstantFamily checkpoint; the FaceID mode adds each "
                              "person's term inside their mask (no mask modes)")
        for name, lo in (("faceid_weight", 0.0), ("controlnet_strength", 0.0), ("s_scale", 0.0)):
            v = getattr(args, name)
            if not math.isfinite(v) or v < lo:
                raise OptionError(f"--{name.replace('_', '-')}: expected a finite number ≥ {lo:g}, got {v}")
        if not math.isfinite(args.lora_strength):
            raise OptionError(f"--lora-strength: expected a finite number, got {args.lora_strength}")
        for name in ("faceid", "controlnet", "clip_vision"):
            v = getattr(args, name)
            if v and not Path(v).exists():
                raise ModelFileError(f"--{name.replace('_', '-')}: {v} does not exist")
    else:
        for name in ("controlnet", "clip_vision"):
            if getattr(args, name):
                raise OptionError(f"--{name.replace('_', '-')}: applies to the FaceID mode (--faceid); an "
                                  "InstantFamily checkpoint brings its own ControlNet")
    for name, lo in (("seeds", 1), ("steps", 1), ("batch_size", 1), ("det_size", 64)):
        if getattr(args, name) < lo:
            raise OptionError(f"--{name.replace('_', '-')}: expected ≥ {lo}, got {getattr(args, name)}")
    for name in ("width", "height"):
        v = getattr(args, name)
        if v < 64 or v % 8:
            raise OptionError(f"--{name}: expected a multiple of 8, at least 64, got {v}")
    if not math.isfinite(args.cfg) or args.cfg < 0:
        raise OptionError(f"--cfg: expected a finite number ≥ 0, got {args.cfg}")


def _device_dtype(args) -> tuple[torch.device, torch.dtype]:
    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                       "cpu" if args.device == "auto" else args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"--device {args.device}: CUDA is not available in this torch build")
    name = args.dtype if args.dtype != "auto" else ("fp16" if dev.type == "cuda" else "fp32")
    return dev, {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def image_name(case_id: str, seed: int) -> str:
    return f"{case_id}_{seed}.png"


def settings_of(args, ckpt, base: Path, dtype: torch.dtype) -> dict:
    return {"checkpoint_sha256_16": fingerprint(ckpt), "base": str(base.resolve()), "steps": args.steps,
            "cfg": args.cfg, "negative": args.negative, "width": args.width, "height": args.height,
            "mask_mode": args.mask_mode, "face_pack": args.face_pack, "det_size": args.det_size,
            "sampler": "euler", "scheduler": "simple", "dtype": str(dtype).replace("torch.", "")}


def check_manifest(out: Path, settings: dict) -> dict:
    """The images recorded by an earlier run into ``out``; refuses a run with other settings."""
    path = out / MANIFEST
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        old = data.get("settings", {})
    except (OSError, ValueError, AttributeError) as e:
        raise GenerateError(f"--out: {path} is unreadable ({e}); delete it or use a new --out") from None
    diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
    if diff:
        raise GenerateError(f"--out {out} holds images made with other settings ({', '.join(diff)} differ: "
                            f"{ {k: old.get(k) for k in diff} } vs { {k: settings.get(k) for k in diff} }); "
                            "use a new --out, or delete the folder to start over")
    return dict(data.get("images", {}))


def write_manifest(out: Path, settings: dict, images: dict) -> None:
    with atomic_path(str(out / MANIFEST), ".json") as tmp:
        Path(tmp).write_text(json.dumps({"format": "instantfamily-generate", "settings": settings,
                                         "images": images}, indent=1), encoding="utf-8")


def save_png(image: np.ndarray, path: Path) -> None:
    from PIL import Image
    with atomic_path(str(path), ".png") as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


def decode(vae, latents: torch.Tensor) -> np.ndarray:
    """Latents → ``B×H×W×3`` uint8, as ComfyUI's VAE Decode + Save Image ((x + 1)/2 clamped, ×255, truncated)."""
    x = vae.decode(latents.to(next(vae.parameters()).dtype) / vae.config.scaling_factor).sample.float()
    x = ((x + 1) / 2).clamp(0, 1).movedim(1, -1).cpu().numpy()
    return np.clip(x * 255.0, 0, 255).astype(np.uint8)


@dataclass
class Job:
    case: Case
    seed: int
    path: Path


class Generator:
    """The loaded models of one run; :meth:`latents` is the sampling the tests compare with ComfyUI."""

    def __init__(self, comps, projector, controlnet, mask_mode: str, device, dtype, scheduler_config: dict):
        self.comps, self.projector, self.controlnet = comps, projector, controlnet
        self.mask_mode, self.device, self.dtype = mask_mode, device, dtype
        self.scheduler_config = scheduler_config
        for m in (comps.unet, comps.vae, comps.text_encoder, controlnet):
            m.to(device=device, dtype=dtype)
        self.projector.to(device)  # float32: identity tokens are cast to the context dtype
        f = 2 ** (len(comps.vae.config.block_out_channels) - 1)
        self.vae_factor = f
        self._text: dict[str, torch.Tensor] = {}

    def text(self, prompts: Sequence[str]) -> torch.Tensor:
        from training.model import encode_text
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text]
        if missing:
            enc = encode_text(self.comps.text_encoder, self.comps.tokenizer, missing, self.device)
            self._text.update({p: e for p, e in zip(missing, enc)})
        return torch.stack([self._text[p] for p in prompts]).to(self.dtype)

    @torch.no_grad()
    def latents(self, prompts: Sequence[str], negative: str, identities: Sequence[Sequence],
                masks: Sequence[torch.Tensor],
                controls: Sequence[np.ndarray], seeds: Sequence[int], steps: int, cfg: float) -> torch.Tensor:
        """Latents (model space, ``(B, 4, h, w)``) of B images; row i has ``identities[i]`` (N features, slot
        order), ``masks[i]`` ``(N, H, W)``, control image ``controls[i]`` and seed ``seeds[i]``."""
        from training.model import IdentityBatch, control_tensor, sample_latents
        b = len(prompts)
        ns = {len(i) for i in identities}
        if len(ns) != 1:
            raise GenerateError(f"a batch needs the same number of identities per row, got {sorted(ns)}")
        g = torch.stack([torch.stack([f.global_embedding.float() for f in row]) for row in identities])
        loc = torch.stack([torch.stack([f.local_map.float() for f in row]) for row in identities])
        ids = IdentityBatch(g, loc, torch.ones(g.shape[:2], dtype=torch.bool)).to(self.device)
        h, w = controls[0].shape[:2]
        shape = (self.comps.unet.config.in_channels, h // self.vae_factor, w // self.vae_factor)
        noise = seed_noise(seeds, shape)
        text = self.text(list(prompts))
        uncond = self.text([negative] * b)
        control = control_tensor(controls).to(self.device, self.dtype)
        return sample_latents(self.comps.unet, self.controlnet, self.projector,
                              EulerSimpleScheduler(self.scheduler_config), text, uncond, ids, torch.stack(list(masks)),
                              control, (b, *shape), steps=steps, guidance=cfg, mask_mode=self.mask_mode, noise=noise)

    @torch.no_grad()
    def images(self, latents: torch.Tensor) -> np.ndarray:
        return decode(self.comps.vae, latents)


def plan_jobs(cases: Sequence[Case], out: Path, seeds: Sequence[int]) -> list[Job]:
    jobs = []
    for c in cases:
        if not SAFE_ID.match(c.id):
            raise GenerateError(f"case {c.id!r}: the id names the image files; use letters, digits, '.', '_' and '-' "
                                "only (starting with a letter or digit)")
        jobs += [Job(c, s, out / image_name(c.id, s)) for s in seeds]
    return jobs


def encode_identities(analyzer, case: Case) -> list:
    """One :class:`IdentityFeatures` per identity of the case, as *Encode Identity* makes them."""
    from instantfamily_core.identity import IdentityFeatures
    out = []
    for ident in case.identities:
        name = f"case {case.id!r} identity {ident.name!r}"
        encoded = []
        for p in ident.images:  # one image at a time, then averaged: the node's order of operations
            try:
                encoded.append(analyzer.encode([load_rgb(p)], name=name, on_no_face="error"))
            except InstantFamilyError as e:
                raise type(e)(f"{e} (reference image: {p})") from None
        out.append(IdentityFeatures.average(encoded, name=ident.name))
    return out


def run(args) -> int:
    from instantfamily_core.checkpoint import load_checkpoint
    from training.model import load_controlnet_from_checkpoint
    from training.sd15 import load_base

    _check_args(args)
    if args.faceid:
        return run_faceid(args)
    cases, out, seeds, jobs = _plan(args)
    device, dtype = _device_dtype(args)
    with tempfile.TemporaryDirectory(prefix="instantfamily-generate-") as work:
        ckpt_file = resolve_checkpoint(args.checkpoint, args.ema, work)
        ckpt = load_checkpoint(str(ckpt_file))
        args.face_pack = args.face_pack or ckpt.meta.face_pack
        if not args.face_pack:
            raise GenerateError("--face-pack: the checkpoint records no face pack; name the one it was trained with")
        mode = ckpt.meta.mask_mode if args.mask_mode == "checkpoint" else args.mask_mode
        settings = settings_of(args, ckpt, Path(args.base), dtype)
    recorded, todo, layouts, identities = _pending(args, cases, seeds, jobs, out, settings, "instantfamily")
    if todo:
        comps = load_base(args.base, args.tokenizer, args.config_dir)
        gen = Generator(comps, ckpt.projector, load_controlnet_from_checkpoint(ckpt), mode, device, dtype,
                        comps.scheduler_config)
        # group by identity count (one batch = one N), keep case order inside
        todo.sort(key=lambda j: len(j.case.identities))
        _write_batches(args, todo, lambda j: len(j.case.identities), lambda batch: gen.images(gen.latents(
            [j.case.prompt for j in batch], args.negative, [identities[j.case.id] for j in batch],
            [layouts[j.case.id].masks for j in batch], [layouts[j.case.id].control for j in batch],
            [j.seed for j in batch], args.steps, args.cfg)), layouts, out, settings, recorded)
    return _evaluate(args, out)


def _pending(args, cases, seeds, jobs, out: Path, settings: dict, control: str):
    """``(recorded, todo, layouts, identities)``: the manifest is checked (a run with other settings into the same
    folder is refused) and, when images are missing, written; every pending case's layout (``control`` style) and
    identities are made first, so bad poses or reference photos fail before any model loads."""
    from tqdm import tqdm

    from instantfamily_core.faces import get_analyzer
    recorded = check_manifest(out, settings)
    todo = [j for j in jobs if not j.path.is_file()]
    print(f"{len(jobs)} images ({len(cases)} cases × {len(seeds)} seeds): {len(jobs) - len(todo)} already in {out}, "
          f"{len(todo)} to generate", file=sys.stderr)
    layouts, identities = {}, {}
    if todo:
        out.mkdir(parents=True, exist_ok=True)
        write_manifest(out, settings, recorded)
        analyzer = get_analyzer(args.face_root, args.face_pack, args.provider, args.det_size)
        for case in tqdm(list({j.case.id: j.case for j in todo}.values()), desc="identities", unit="case",
                         disable=args.no_progress):
            layouts[case.id] = case_layout(case, args.width, args.height, control=control)
            identities[case.id] = encode_identities(analyzer, case)
    return recorded, todo, layouts, identities


def _write_batches(args, todo, group, images_of, layouts, out: Path, settings: dict, recorded: dict) -> None:
    """Generates ``todo`` (sorted so that jobs of one ``group(job)`` are adjacent) in batches of at most
    ``--batch-size`` jobs of one group (``images_of(batch)``), saving each image and the manifest after every
    batch, so an interrupted run continues where it stopped."""
    from tqdm import tqdm
    bar = tqdm(total=len(todo), desc="generate", unit="img", disable=args.no_progress)
    i = 0
    while i < len(todo):
        g = group(todo[i])
        batch = [j for j in todo[i:i + args.batch_size] if group(j) == g]
        i += len(batch)
        for j, img in zip(batch, images_of(batch)):
            save_png(img, j.path)
            recorded[j.path.name] = {"case": j.case.id, "seed": j.seed, "pose": layouts[j.case.id].source}
        write_manifest(out, settings, recorded)
        bar.update(len(batch))
    bar.close()
    print(f"wrote {len(todo)} images to {out}", file=sys.stderr)


def _plan(args):
    """``(cases, out, seeds, jobs)`` of a run; a cases file that lists its own images cannot be evaluated."""
    cases = load_cases(args.cases)
    out = Path(args.out)
    seeds = [args.seed + k for k in range(args.seeds)]
    jobs = plan_jobs(cases, out, seeds)
    if args.recognizer:
        listed = [c.id for c in cases if c.images]
        if listed:
            raise GenerateError(f"cases {listed} list their own 'images', which evaluate.py would read instead of "
                                "the generated ones; remove 'images' from those cases to evaluate this run")
    return cases, out, seeds, jobs


def _evaluate(args, out: Path) -> int:
    if not args.recognizer:
        return 0
    from training import evaluate
    argv = ["--cases", args.cases, "--images", str(out), "--out", str(out / "eval"),
            "--recognizer", args.recognizer, "--label", args.label or out.name]
    if args.clip_model:
        argv += ["--clip-model", args.clip_model]
    if args.no_progress:
        argv.append("--no-progress")
    return evaluate.main(argv)


# ---------------------------------------------------------------------------------------------------------------
# FaceID mode (public weights): training/faceid.py on an SD1.5 or SDXL base

def load_any_base(path, tokenizer: Optional[str], config_dir: Optional[str], dtype: torch.dtype):
    """``(kind, components)`` of an SD1.5 (:mod:`training.sd15`) or SDXL (:mod:`training.sdxl`) base."""
    from training import sd15, sdxl
    kind = sdxl.base_kind(path)
    if kind == "SDXL":
        return kind, sdxl.load_sdxl(path, tokenizer, config_dir, dtype)
    return kind, sd15.load_base(path, tokenizer, config_dir, dtype)


class FaceIDGenerator:
    """The loaded models of a FaceID run: the base's UNet with the FaceID LoRA merged and the FaceID processors
    installed, its text encoder(s) and VAE, an optional OpenPose ControlNet. :meth:`latents` samples like
    ComfyUI's KSampler (euler, simple) with *Apply InstantFamily FaceID* on the model and *ControlNetApplyAdvanced*
    on both conditionings."""

    def __init__(self, kind: str, comps, weights, topology, controlnet, device, dtype, weight: float = 1.0,
                 lora_strength: float = 1.0, controlnet_strength: float = 1.0):
        from training import faceid as fid
        self.kind, self.comps, self.weights, self.topology = kind, comps, weights, topology
        self.controlnet, self.device, self.dtype = controlnet, device, dtype
        self.weight, self.controlnet_strength = float(weight), float(controlnet_strength)
        self.scheduler_config = comps.scheduler_config
        fid.merge_lora(comps.unet, weights, topology, lora_strength)
        fid.install_faceid(comps.unet, weights, topology)
        encoders = [comps.text_encoder] + ([comps.text_encoder_2] if kind == "SDXL" else [])
        for m in [comps.unet, *encoders] + ([controlnet] if controlnet is not None else []):
            _move(m, device, dtype)
        upcast = dtype == torch.float16 and bool(comps.vae.config.get("force_upcast", False))
        _move(comps.vae, device, torch.float32 if upcast else dtype)  # SDXL's VAE overflows in fp16
        self.vae_factor = 2 ** (len(comps.vae.config.block_out_channels) - 1)
        self._text: dict = {}

    def text(self, prompts: Sequence[str]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(context (B, 77, D), pooled (B, 1280) or None)`` (SD1.5: CLIP's last hidden state; SDXL: both
        encoders' penultimate states and the pooled projection)."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text]
        if missing:
            if self.kind == "SDXL":
                from training.sdxl import encode_prompts
                ctx, pooled = encode_prompts(self.comps, missing, self.device)
            else:
                from training.model import encode_text
                ctx, pooled = encode_text(self.comps.text_encoder, self.comps.tokenizer, missing, self.device), None
            for i, p in enumerate(missing):
                self._text[p] = (ctx[i], None if pooled is None else pooled[i])
        ctx = torch.stack([self._text[p][0] for p in prompts]).to(self.dtype)
        pooled = None if self.kind != "SDXL" else torch.stack([self._text[p][1] for p in prompts]).to(self.dtype)
        return ctx, pooled

    @torch.no_grad()
    def latents(self, prompts: Sequence[str], negative: str, tokens: Sequence[torch.Tensor],
                uncond: Sequence[torch.Tensor], key_valid: Optional[torch.Tensor], masks: Sequence[torch.Tensor],
                controls: Sequence[np.ndarray], seeds: Sequence[int], steps: int, cfg: float) -> torch.Tensor:
        """Latents ``(B, 4, h, w)`` of B images: row i has people's tokens ``tokens[i]`` / ``uncond[i]`` ``(N, T, d)``
        (slot order; ``key_valid`` ``(N, T)`` shared by the batch), masks ``masks[i]`` ``(N, H, W)``, pose image
        ``controls[i]`` and seed ``seeds[i]``."""
        from training.faceid import FaceIDContext
        from training.model import control_tensor
        b = len(prompts)
        if len({tuple(t.shape) for t in tokens} | {tuple(u.shape) for u in uncond}) != 1:
            raise GenerateError("a FaceID batch needs the same people and tokens per row")
        h, w = controls[0].shape[:2]
        shape = (self.comps.unet.config.in_channels, h // self.vae_factor, w // self.vae_factor)
        noise = seed_noise(seeds, shape)
        ctx_c, pool_c = self.text(list(prompts))
        ctx_u, pool_u = self.text([negative] * b)
        ctx = torch.cat([ctx_u, ctx_c])
        added = None
        if self.kind == "SDXL":
            from training.sdxl import time_ids
            added = {"text_embeds": torch.cat([pool_u, pool_c]),
                     "time_ids": time_ids(h, w, 2 * b).to(self.device, self.dtype)}
        rows = torch.stack(list(masks)).float()
        n = rows.shape[1]
        state = FaceIDContext(torch.cat([torch.stack(list(uncond)), torch.stack(list(tokens))]).to(self.device),
                              torch.cat([rows, rows]).to(self.device), torch.full((n,), self.weight),
                              (shape[1], shape[2]), key_valid)
        control = None
        if self.controlnet is not None:
            c = control_tensor(controls).to(self.device, self.dtype)
            control = torch.cat([c, c])
        scheduler = EulerSimpleScheduler(self.scheduler_config)
        scheduler.set_timesteps(steps, device=self.device)
        latents = noise.to(self.device, self.dtype) * scheduler.init_noise_sigma
        unet = self.comps.unet
        for t in scheduler.timesteps:
            inp = torch.cat([latents, latents])
            down = mid = None
            if control is not None:
                down, mid = self.controlnet(inp, t, encoder_hidden_states=ctx, controlnet_cond=control,
                                            conditioning_scale=self.controlnet_strength, added_cond_kwargs=added,
                                            return_dict=False)
            eps = unet(inp, t, encoder_hidden_states=ctx, added_cond_kwargs=added,
                       down_block_additional_residuals=down, mid_block_additional_residual=mid,
                       cross_attention_kwargs=state.as_kwargs(), return_dict=False)[0]
            e_uncond, e_cond = eps.chunk(2)
            latents = scheduler.step(e_uncond + cfg * (e_cond - e_uncond), t, latents).prev_sample
        return latents

    @torch.no_grad()
    def images(self, latents: torch.Tensor) -> np.ndarray:
        return decode(self.comps.vae, latents)


def _move(module: torch.nn.Module, device, dtype: torch.dtype) -> None:
    """``module`` to ``device`` and ``dtype``, casting only when a tensor has another dtype (diffusers warns on
    every ``.to(dtype=…)``)."""
    if any(t.is_floating_point() and t.dtype != dtype for t in module.state_dict().values()):
        module.to(dtype=dtype)
    module.to(device=device)


def _file_sha256(path, limit: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:limit]


def _where(path) -> Optional[str]:
    if not path:
        return None
    p = Path(path).resolve()
    return f"{p} ({p.stat().st_size} B)" if p.is_file() else str(p)


def faceid_settings(args, kind: str, dtype: torch.dtype) -> dict:
    return {"mode": "faceid", "faceid_sha256_16": _file_sha256(args.faceid), "faceid": Path(args.faceid).name,
            "base": str(Path(args.base).resolve()), "base_kind": kind, "controlnet": _where(args.controlnet),
            "controlnet_strength": args.controlnet_strength, "clip_vision": _where(args.clip_vision),
            "plus_version": args.plus_version, "faceid_weight": args.faceid_weight,
            "lora_strength": args.lora_strength, "s_scale": args.s_scale, "steps": args.steps, "cfg": args.cfg,
            "negative": args.negative, "width": args.width, "height": args.height, "face_pack": args.face_pack,
            "det_size": args.det_size, "sampler": "euler", "scheduler": "simple",
            "dtype": str(dtype).replace("torch.", "")}


PLUS_VERSION_ARG = {"auto": "auto (file name)", "v1": "v1", "v2": "v2"}


def run_faceid(args) -> int:
    """The FaceID mode of :func:`run` (``--faceid``)."""
    from instantfamily_core.faceid import FaceIDProjection
    from training import faceid as fid
    from training import sdxl

    cases, out, seeds, jobs = _plan(args)
    device, dtype = _device_dtype(args)
    args.face_pack = args.face_pack or FACEID_PACK
    # cheap checks first: the file and the base belong together, Plus has its CLIP model
    kind = sdxl.base_kind(args.base)
    file = fid.read_faceid(args.faceid)
    fid.check_faceid_base(file, 2048 if kind == "SDXL" else 768, Path(args.base).name)
    if file.is_plus and not args.clip_vision:
        raise EmbeddingError(f"--clip-vision: {file.name} is FaceID Plus; it needs CLIP ViT-H/14 "
                             "(CLIP-ViT-H-14-laion2B-s32B-b79K) for the face crops")
    if args.clip_vision and not file.is_plus:
        raise OptionError(f"--clip-vision: {file.name} is not a FaceID Plus file; only Plus reads CLIP features")
    settings = faceid_settings(args, kind, dtype)
    recorded, todo, layouts, identities = _pending(args, cases, seeds, jobs, out, settings, "openpose")
    if todo:
        kind, comps = load_any_base(args.base, args.tokenizer, args.config_dir, dtype)
        topology = fid.diffusers_topology(comps.unet)
        weights = fid.validate_for(file, topology, Path(args.base).name, PLUS_VERSION_ARG[args.plus_version])
        del file
        projection = FaceIDProjection.from_weights(weights)
        clip_model = fid.load_clip_vision(args.clip_vision).to(device) if weights.is_plus else None
        tokens = {cid: fid.case_tokens(projection, weights, ids, clip_model, args.s_scale)
                  for cid, ids in identities.items()}
        del clip_model
        controlnet = fid.load_openpose_controlnet(args.controlnet, comps.unet, Path(args.base).name, dtype) \
            if args.controlnet else None
        gen = FaceIDGenerator(kind, comps, weights, topology, controlnet, device, dtype, args.faceid_weight,
                              args.lora_strength, args.controlnet_strength)
        # one batch = one token layout (people, tokens per person), case order kept inside
        key = {cid: fid.layout_key(t[2], t[0]) for cid, t in tokens.items()}
        order = list(dict.fromkeys(key.values()))
        todo.sort(key=lambda j: order.index(key[j.case.id]))
        _write_batches(args, todo, lambda j: key[j.case.id], lambda batch: gen.images(gen.latents(
            [j.case.prompt for j in batch], args.negative, [tokens[j.case.id][0] for j in batch],
            [tokens[j.case.id][1] for j in batch], tokens[batch[0].case.id][2],
            [layouts[j.case.id].masks for j in batch], [layouts[j.case.id].control for j in batch],
            [j.seed for j in batch], args.steps, args.cfg)),
            layouts, out, settings, recorded)
    return _evaluate(args, out)


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except InstantFamilyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
