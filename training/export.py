#!/usr/bin/env python
"""Export a training checkpoint folder to the pack's checkpoint (schema v1) that the ComfyUI loader node reads.

    python training/export.py --checkpoint runs/if/checkpoints/step-0100000 --output instantfamily.safetensors \
        [--ema] [--dtype fp16|fp32]

``train.py`` also exports at the end of a run (``<output>/instantfamily.safetensors`` and, with ``--ema``,
``instantfamily-ema.safetensors``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional

if not __package__:  # run as a file, not as python -m training.export
    import _bootstrap  # noqa: F401  (training/_bootstrap.py: the repository root first on sys.path)

from instantfamily_core.errors import CheckpointError, InstantFamilyError  # noqa: E402
from instantfamily_core.projector import IdentityProjector, ProjectorConfig  # noqa: E402
from training.model import export_checkpoint  # noqa: E402

WEIGHT_FILES = ("trainable.safetensors", "model.safetensors")  # FSDP/DeepSpeed gathered copy first, then DDP's


def trainable_state(folder: Path, use_ema: bool) -> dict:
    from safetensors.torch import load_file
    path = next((folder / n for n in WEIGHT_FILES if (folder / n).is_file()), None)
    if path is None:
        raise CheckpointError(f"{folder}: no {' or '.join(WEIGHT_FILES)}; is this a train.py checkpoint folder "
                              "(checkpoints/step-N)?")
    state = load_file(str(path))
    if use_ema:
        ema = folder / "ema.safetensors"
        if not ema.is_file():
            raise CheckpointError(f"{folder}: --ema given but the run kept no EMA (no ema.safetensors)")
        for k, v in load_file(str(ema)).items():
            if k not in state:
                raise CheckpointError(f"{ema.name}: parameter {k!r} is not in the model weights")
            state[k] = v.to(state[k].dtype)
    return state


def export_folder(folder: str | os.PathLike, output: str | os.PathLike, use_ema: bool = False,
                  face_pack: Optional[str] = None, dtype: str = "fp16") -> Path:
    """Write ``output`` from a ``checkpoints/step-N`` folder; returns the path."""
    folder = Path(folder)
    cfg_path = folder / "run_config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{folder}: no run_config.json; not a complete train.py checkpoint folder")
    config = json.loads(cfg_path.read_text(encoding="utf-8"))
    state = trainable_state(folder, use_ema)
    projector = IdentityProjector(ProjectorConfig(**config["projector_config"]))
    proj_sd = {k[len("projector."):]: v for k, v in state.items() if k.startswith("projector.")}
    try:
        projector.load_state_dict(proj_sd)
    except RuntimeError as e:
        raise CheckpointError(f"{folder}: projector weights do not match run_config.json ({e})") from None
    cn_sd = {k[len("controlnet."):]: v for k, v in state.items() if k.startswith("controlnet.")}
    step = json.loads((folder / "state.json").read_text())["global_step"] if (folder / "state.json").is_file() else ""
    export_checkpoint(output, projector, config["controlnet_config"], face_pack or config["face_pack"],
                      config["mask_mode"], config["num_slots"], controlnet_state=cn_sd,
                      extra={"training_steps": str(step), "ema": str(bool(use_ema)).lower()}, dtype=dtype)
    return Path(output)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a checkpoints/step-N folder written by train.py")
    p.add_argument("--output", required=True, help="the .safetensors file to write")
    p.add_argument("--ema", action="store_true", help="export the EMA weights")
    p.add_argument("--face-pack", default=None, help="override the face pack name recorded in the file")
    p.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16",
                   help="tensor type of the written file (fp16: half the size, what SD1.5 files are shared in)")
    args = p.parse_args(argv)
    try:
        path = export_folder(args.checkpoint, args.output, args.ema, args.face_pack, args.dtype)
    except InstantFamilyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
