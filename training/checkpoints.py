"""Training checkpoints: atomic step folders, keep-last-M pruning, EMA weights, and the loss log.

``<output>/checkpoints/step-0000100/`` holds accelerate's state (model, optimizer, LR scheduler with its position,
grad scaler, RNG), ``state.json`` (step, data position and the learning-rate schedule flags, compared on resume),
``run_config.json`` (everything export needs) and ``ema.safetensors`` (optional). It is written as ``step-0000100.tmp`` and renamed into place only when complete, so a crash while
writing leaves the previous checkpoint as the latest one; leftovers ``*.tmp`` are removed on the next start.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Optional

import torch

from instantfamily_core.errors import OptionError
from instantfamily_core.fileio import write_text_atomic

STEP_RE = re.compile(r"^step-(\d+)$")


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:07d}"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = STEP_RE.match(p.name)
        if m and p.is_dir() and (p / "state.json").is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(root: Path) -> Optional[Path]:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def remove_partial(root: Path) -> list[Path]:
    """Delete ``*.tmp`` folders left by a crash during a checkpoint write."""
    gone = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.endswith(".tmp") and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                gone.append(p)
    return gone


def fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(str(folder), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: Path, final: Path) -> None:
    """Move a complete ``tmp`` folder to ``final`` (atomic rename; an older ``final`` is replaced)."""
    fsync_tree(tmp)
    if final.exists():
        old = final.with_name(final.name + ".old.tmp")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fd = os.open(str(final.parent), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prune(root: Path, keep: int) -> list[Path]:
    """Keep the newest ``keep`` checkpoints (0 = keep all)."""
    found = list_checkpoints(root)
    gone = []
    if keep > 0:
        for _, p in found[:-keep]:
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p)
    return gone


def check_ema_decay(decay: float) -> float:
    """``--ema-decay`` if it is in (0, 1), else :class:`~instantfamily_core.errors.OptionError`."""
    if not 0 < decay < 1:
        raise OptionError(f"--ema-decay: expected a value in (0, 1), got {decay}")
    return float(decay)


class EMA:
    """Exponential moving average of the trainable parameters (fp32 shadow copy, decay warm-up
    ``min(decay, (1 + n) / (10 + n))``)."""

    def __init__(self, module: torch.nn.Module, decay: float = 0.9999):
        self.decay = check_ema_decay(decay)
        self.updates = 0
        self.shadow = {k: p.detach().float().clone() for k, p in module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, p in module.named_parameters():
            if k in self.shadow:
                self.shadow[k].mul_(d).add_(p.detach().float(), alpha=1 - d)
        self.updates += 1

    def state_dict_for(self, module: torch.nn.Module) -> dict:
        """``module.state_dict()`` with the averaged parameters in place of the live ones."""
        sd = {k: v.detach().clone() for k, v in module.state_dict().items()}
        for k, v in self.shadow.items():
            sd[k] = v.to(sd[k].dtype)
        return sd

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file
        save_file({k: v.contiguous().cpu() for k, v in self.shadow.items()}, str(path),
                  metadata={"updates": str(self.updates), "decay": str(self.decay)})

    def load(self, path: Path) -> None:
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
            for k in self.shadow:
                self.shadow[k] = f.get_tensor(k).to(self.shadow[k].device)
        self.updates = int(md.get("updates", 0))

    def to(self, device) -> "EMA":
        self.shadow = {k: v.to(device) for k, v in self.shadow.items()}
        return self


class LossLog:
    """``losses.jsonl``: one line per optimizer step (``step``, ``loss``, ``lr``); truncated to the resumed step
    so that a resumed run's log is the uninterrupted run's log."""

    def __init__(self, path: Path):
        self.path = path

    def truncate(self, step: int) -> None:
        if self.path.is_file():
            rows = [r for r in self.read() if r["step"] <= step]
            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in rows))

    def append(self, row: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        rows = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by kill -9
                break
        return rows
