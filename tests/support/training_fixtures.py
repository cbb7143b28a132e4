"""Generators for the training tests: a tiny captioned multi-person dataset (with a few broken inputs) and a tiny
random SD1.5-architecture base model, written to temp folders at test time."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tools.devkit.face_models import draw_faces
from support.poses import frame, person

# (face centres, identity colours) per image; centres on the tiny detector's 32-px grid, 256×256 canvas
LAYOUTS = [
    ([(64, 96), (192, 96)], [(0, 200, 0), (0, 0, 200)]),
    ([(64, 128)], [(200, 200, 0)]),
    ([(64, 64), (192, 64), (128, 192)], [(0, 200, 200), (200, 0, 200), (0, 100, 0)]),
    ([(96, 96), (192, 160)], [(0, 0, 100), (100, 100, 0)]),
    ([(128, 96)], [(0, 150, 250)]),
    ([(64, 160), (192, 160)], [(250, 150, 0), (0, 250, 150)]),
]
BROKEN = {"corrupt.png": "unreadable image", "nocaption.png": "no caption", "nopose.png": "no pose keypoints",
          "faceless.png": "no face detected"}


def write_dataset(folder: Path, copies: int = 1) -> Path:
    """``folder`` with ``len(LAYOUTS) * copies`` good images (``.txt`` + ``.pose.json`` sidecars) and the
    :data:`BROKEN` ones."""
    folder.mkdir(parents=True, exist_ok=True)
    from PIL import Image
    n = 0
    for c in range(copies):
        for centres, colours in LAYOUTS:
            name = f"img{n:03d}"
            img = draw_faces((256, 256), centres, colours)
            Image.fromarray(img).save(folder / f"{name}.png")
            (folder / f"{name}.txt").write_text(f"a photo of {len(centres)} people, number {n}")
            people = [person(x, y, s=40.0) for x, y in centres]
            (folder / f"{name}.pose.json").write_text(json.dumps(frame(people, 256, 256)))
            n += 1
    (folder / "corrupt.png").write_bytes(b"not a png")
    (folder / "corrupt.txt").write_text("broken")
    good = draw_faces((256, 256), [(128, 128)], [(0, 200, 0)])
    Image.fromarray(good).save(folder / "nocaption.png")
    (folder / "nocaption.pose.json").write_text(json.dumps(frame([person(128, 128, s=40.0)], 256, 256)))
    Image.fromarray(good).save(folder / "nopose.png")
    (folder / "nopose.txt").write_text("no pose")
    Image.fromarray(np.full((256, 256, 3), 128, np.uint8)).save(folder / "faceless.png")
    (folder / "faceless.txt").write_text("nobody")
    (folder / "faceless.pose.json").write_text(json.dumps(frame([person(128, 128, s=40.0)], 256, 256)))
    return folder


# ---------------------------------------------------------------------------------------------------------------
# one shared workspace per pytest session: tiny face pack, dataset, shards, tiny SD1.5 base

class Workspace:
    def __init__(self, root: Path):
        from tools.devkit.face_models import make_tiny_pack
        from training import prepare
        from support.tiny_sd15 import write_tiny_setup
        self.root = root
        self.face_root = root / "insightface"
        make_tiny_pack(self.face_root, "tinypack")
        self.data = write_dataset(root / "data")
        self.shards = root / "shards"
        rc = prepare.main(self.prepare_args(self.shards))
        assert rc == 0
        self.setup = write_tiny_setup(root / "base")

    def prepare_args(self, output: Path, *extra: str) -> list[str]:
        return ["--input", str(self.data), "--output", str(output), "--face-root", str(self.face_root),
                "--face-pack", "tinypack", "--det-size", "256", "--resolution", "64", "--shard-size", "4",
                "--no-progress", *extra]

    def train_args(self, output: Path, *extra: str) -> list[str]:
        return ["--base", str(self.setup.single_file), "--config-dir", str(self.setup.config_dir),
                "--data", str(self.shards), "--output", str(output), "--batch-size", "2", "--num-workers", "0",
                "--projector-hidden", "64", "--validate-every", "0", "--no-progress", "--lr", "1e-4", *extra]


_WORKSPACES: dict[int, Workspace] = {}


def training_workspace(tmp_path_factory) -> Workspace:
    """The session's :class:`Workspace` (built once, shared by every training test module)."""
    key = id(tmp_path_factory)
    if key not in _WORKSPACES:
        _WORKSPACES[key] = Workspace(tmp_path_factory.mktemp("training"))
    return _WORKSPACES[key]
