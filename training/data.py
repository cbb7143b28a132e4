"""Training shards: the on-disk format written by ``prepare.py`` and the dataset ``train.py`` reads.

Shard format (version 1)
------------------------
``<out>/manifest.json`` lists the shards; each shard ``shard-NNNNN.safetensors`` holds up to ``shard_size``
samples. Tensors, per sample ``i`` (6-digit, within the shard):

* ``{i}.image`` — uint8 1-D: the encoded image (JPEG or PNG), already resized + centre-cropped to R×R.
* ``{i}.global`` — float16 ``(F, D_g)``: global embeddings of the F faces matched to a pose.
* ``{i}.local`` — float16 ``(F, D_l, L, L)``: their local feature maps.
* ``{i}.pose_preview`` — uint8 1-D PNG (optional): the control image with slot circles in the default
  left-to-right slot order, for people to look at (training redraws it for each random slot order).

Metadata (strings): ``format`` = ``instantfamily-shard``, ``version`` = ``1``, ``samples`` (JSON list, one record
per sample: ``key``, ``caption``, ``size`` R, ``pose`` (one POSE_KEYPOINT frame in pixels of the R×R image),
``faces`` (``person`` index in ``pose.people``, ``bbox`` in pixels, ``det_score``), ``source_size``), ``skipped``
(JSON list of ``{"file", "reason"}``), ``inputs`` (JSON: ``start``, ``stop``, ``fingerprint`` of the input list),
``info`` (JSON: ``resolution``, ``face_pack``, ``global_dim``, ``local_dim``, ``grid``, ``margin``).

A shard is written atomically (``instantfamily_core.fileio``: temp file + ``os.replace``, normal permissions), so an
existing shard is always complete.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from instantfamily_core.errors import OptionError
from instantfamily_core.faces.images import load_rgb
from instantfamily_core.fileio import save_safetensors_atomic
from instantfamily_core.pose import DEFAULT_MARGIN, assign_slots, parse_pose
from instantfamily_core.render import draw_control_image
from training.errors import DatasetError

SHARD_FORMAT = "instantfamily-shard"
MANIFEST_FORMAT = "instantfamily-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


@dataclass
class PreparedSample:
    record: dict
    image_bytes: bytes
    global_embeddings: np.ndarray  # (F, D_g)
    local_maps: np.ndarray  # (F, D_l, L, L)
    pose_preview: Optional[bytes] = None


def write_shard(path: Path, samples: Sequence[PreparedSample], skipped: Sequence[dict], inputs: dict,
                info: dict) -> None:
    """Write one shard atomically (see the module docstring for the layout)."""
    tensors = {}
    for i, s in enumerate(samples):
        tensors[f"{i:06d}.image"] = bytes_tensor(s.image_bytes)
        tensors[f"{i:06d}.global"] = torch.from_numpy(np.asarray(s.global_embeddings, np.float16))
        tensors[f"{i:06d}.local"] = torch.from_numpy(np.asarray(s.local_maps, np.float16))
        if s.pose_preview is not None:
            tensors[f"{i:06d}.pose_preview"] = bytes_tensor(s.pose_preview)
    meta = {"format": SHARD_FORMAT, "version": str(FORMAT_VERSION),
            "samples": json.dumps([s.record for s in samples]), "skipped": json.dumps(list(skipped)),
            "inputs": json.dumps(inputs), "info": json.dumps(info)}
    save_safetensors_atomic(tensors, path, meta)


def read_shard_metadata(path: Path) -> dict:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
    except Exception as e:
        raise DatasetError(f"{path.name}: not a readable shard ({e}); delete it and run prepare.py again") from None
    if md.get("format") != SHARD_FORMAT or md.get("version") != str(FORMAT_VERSION):
        raise DatasetError(f"{path.name}: not an InstantFamily shard of version {FORMAT_VERSION} "
                           f"(format {md.get('format')!r}, version {md.get('version')!r})")
    try:
        out = {k: json.loads(md[k]) for k in ("samples", "skipped", "inputs", "info")}
    except (KeyError, TypeError, ValueError) as e:
        raise DatasetError(f"{path.name}: shard metadata is incomplete or not JSON ({type(e).__name__}: {e}); "
                           "delete it and run prepare.py again") from None
    if not isinstance(out["samples"], list) or not all(isinstance(r, dict) for r in out["samples"]):
        raise DatasetError(f"{path.name}: shard metadata 'samples' must be a list of records; delete it and run "
                           "prepare.py again")
    return out


def read_manifest(folder: str | os.PathLike) -> dict:
    path = Path(folder) / MANIFEST if Path(folder).is_dir() else Path(folder)
    if not path.is_file():
        raise DatasetError(f"dataset: no {MANIFEST} at {path}; run training/prepare.py first")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise DatasetError(f"{path}: cannot read the manifest ({e})") from None
    if (not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT
            or manifest.get("version") != FORMAT_VERSION):
        raise DatasetError(f"{path}: not an InstantFamily shard manifest of version {FORMAT_VERSION}")
    info, shards = manifest.get("info"), manifest.get("shards")
    if not isinstance(info, dict):
        raise DatasetError(f"{path}: 'info' must be an object with resolution, global_dim, local_dim and grid")
    for key in ("resolution", "global_dim", "local_dim", "grid"):
        v = info.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise DatasetError(f"{path}: info.{key} must be a positive integer, got {v!r}")
    if not isinstance(shards, list) or not all(
            isinstance(s, dict) and isinstance(s.get("file"), str) and s["file"]
            and os.path.basename(s["file"]) == s["file"] for s in shards):
        raise DatasetError(f"{path}: 'shards' must be a list of {{\"file\": \"shard-NNNNN.safetensors\", ...}} "
                           "entries (file names inside the dataset folder)")
    manifest["_folder"] = str(path.parent)
    return manifest


# ---------------------------------------------------------------------------------------------------------------
# dataset

@dataclass(frozen=True)
class DropoutConfig:
    """Condition dropout for classifier-free guidance (exclusive events per sample)."""

    text: float = 0.05
    identity: float = 0.05
    both: float = 0.05

    def __post_init__(self):
        for name in ("text", "identity", "both"):
            v = getattr(self, name)
            if not 0 <= v <= 1:
                raise OptionError(f"--drop-{name}: expected a probability in [0, 1], got {v}")
        if self.text + self.identity + self.both > 1:
            raise OptionError("condition dropout: --drop-text + --drop-identity + --drop-both must be ≤ 1")


def decode_image(data: np.ndarray | bytes, name: str = "shard image") -> np.ndarray:
    """A stored (encoded) image as ``H×W×3`` uint8 RGB, through the one loader prepare and evaluation use."""
    return load_rgb(data, name=name)


def with_detector_boxes(record: dict) -> dict:
    """The record's pose with each matched person carrying its face detector box (``face_box_2d``), so the
    training mask is the paper's detector box + margin; the same :func:`~instantfamily_core.pose.face_box` rule
    estimates that box from keypoints where no detector box exists (templates, OpenPose input at inference)."""
    pose = json.loads(json.dumps(record["pose"]))
    frame = pose[0] if isinstance(pose, list) else pose
    for f in record["faces"]:
        frame["people"][f["person"]]["face_box_2d"] = [float(v) for v in f["bbox"]]
    return pose


class ShardDataset(Dataset):
    """Samples from prepared shards. Items are addressed by ``(epoch, index)`` so that every random choice — which
    faces, their slot order, condition dropout — is a pure function of ``(seed, epoch, index)`` and a resumed run
    sees exactly the batches an uninterrupted one would."""

    def __init__(self, folder: str | os.PathLike, num_slots: int = 4, margin: float = DEFAULT_MARGIN, seed: int = 0,
                 dropout: DropoutConfig = DropoutConfig()):
        if num_slots < 1:
            raise OptionError(f"--num-slots: expected ≥ 1, got {num_slots}")
        self.manifest = read_manifest(folder)
        self.folder = Path(self.manifest["_folder"])
        self.num_slots, self.margin, self.seed, self.dropout = int(num_slots), float(margin), int(seed), dropout
        info = self.manifest["info"]
        self.resolution = int(info["resolution"])
        self.global_dim, self.local_dim, self.grid = int(info["global_dim"]), int(info["local_dim"]), int(info["grid"])
        self.index: list[tuple[str, int, dict]] = []
        for shard in self.manifest["shards"]:
            records = read_shard_metadata(self.folder / shard["file"])["samples"]
            self.index.extend((shard["file"], i, r) for i, r in enumerate(records))
        if not self.index:
            raise DatasetError(f"dataset: {self.folder} has no samples (every input was skipped? see "
                               f"{MANIFEST} 'skipped')")
        self._handles: dict = {}

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self):  # DataLoader workers open their own file handles
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def _tensor(self, shard: str, key: str) -> torch.Tensor:
        from safetensors import safe_open
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.folder / shard), framework="pt")
        return self._handles[shard].get_tensor(key)

    def _choose(self, rng: np.random.Generator, num_faces: int) -> list[Optional[int]]:
        """Face index of each of the N slots (None = padding): k = min(N, F) faces chosen at random go to k slots
        chosen at random, so every slot — and every slot colour — is trained whatever the number of faces
        (paper §4.2: faces stacked "in random order", no slot-1 bias)."""
        n = self.num_slots
        k = min(n, num_faces)
        faces = rng.permutation(num_faces)[:k]
        places = rng.permutation(n)[:k]
        slots: list[Optional[int]] = [None] * n
        for f, s in zip(faces, places):
            slots[int(s)] = int(f)
        return slots

    def _drops(self, rng: np.random.Generator) -> tuple[bool, bool]:
        u, d = float(rng.random()), self.dropout
        if u < d.text:
            return True, False
        if u < d.text + d.identity:
            return False, True
        if u < d.text + d.identity + d.both:
            return True, True
        return False, False

    def build(self, index: int, face_order: Sequence[Optional[int]], drop_text: bool = False,
              drop_identity: bool = False) -> dict:
        """One training example: slot s holds face ``face_order[s]`` (an index into the record's faces) or is a
        padding slot (``None``, or past the end of ``face_order``): null tokens, all-zero mask, no circle."""
        shard, i, record = self.index[index]
        r, n = self.resolution, self.num_slots
        if len(face_order) > n:
            raise DatasetError(f"{record['key']}: {len(face_order)} slots requested but --num-slots is {n}")
        face_order = list(face_order) + [None] * (n - len(face_order))
        image = decode_image(self._tensor(shard, f"{i:06d}.image").numpy(), name=f"{shard}: {record['key']}")
        if image.shape[:2] != (r, r):
            raise DatasetError(f"{record['key']}: image is {image.shape[1]}×{image.shape[0]}, the manifest says {r}×{r}")
        frame = parse_pose(with_detector_boxes(record), name=record["key"])
        slots = assign_slots(frame, n, order=[None if f is None else record["faces"][f]["person"]
                                              for f in face_order], margin=self.margin, name=record["key"])
        masks = slots.masks()
        g_all = self._tensor(shard, f"{i:06d}.global").float()
        l_all = self._tensor(shard, f"{i:06d}.local").float()
        g = torch.zeros(n, self.global_dim)
        loc = torch.zeros(n, self.local_dim, self.grid, self.grid)
        present = torch.zeros(n, dtype=torch.bool)
        for s, f in enumerate(face_order):
            if f is not None:
                g[s], loc[s], present[s] = g_all[f], l_all[f], True
        control = torch.from_numpy(draw_control_image(slots)).permute(2, 0, 1).float() / 255.0
        pixels = torch.from_numpy(image.copy()).permute(2, 0, 1).float() / 127.5 - 1.0
        return {"pixels": pixels, "control": control, "masks": masks, "global": g, "local": loc,
                "present": present, "caption": "" if drop_text else record["caption"],
                "drop_identity": bool(drop_identity), "index": index,
                "slots": [-1 if f is None else int(f) for f in face_order]}

    def draw(self, epoch: int, index: int) -> tuple[list[Optional[int]], bool, bool]:
        """The random choices of item ``(epoch, index)``: face index per slot (None = padding), drop_text,
        drop_identity — a pure function of ``(seed, epoch, index)``."""
        rng = np.random.default_rng([self.seed, int(epoch), int(index)])
        slots = self._choose(rng, len(self.index[index][2]["faces"]))
        drop_text, drop_identity = self._drops(rng)
        return slots, drop_text, drop_identity

    def __getitem__(self, item) -> dict:
        epoch, index = item if isinstance(item, tuple) else (0, item)
        return self.build(index, *self.draw(epoch, index))

    def validation_item(self, index: int) -> dict:
        """No dropout; faces in slots left to right by face centre (the inference default)."""
        record = self.index[index][2]

        def centre_x(f):
            x1, _, x2, _ = record["faces"][f]["bbox"]
            return (x1 + x2) / 2
        order = sorted(range(len(record["faces"])), key=centre_x)[:self.num_slots]
        return self.build(index, order)


class EpochBatchSampler(Sampler):
    """Endless per-rank batches of ``(epoch, index)``: epoch ``e`` is ``randperm(len, seed + e)``, cut into global
    batches of ``batch_size × world_size`` (the incomplete tail is dropped); rank ``r`` takes its slice of each.
    ``start`` = micro-batches already consumed (resume)."""

    def __init__(self, length: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 start: int = 0):
        self.length, self.batch_size, self.seed = int(length), int(batch_size), int(seed)
        self.rank, self.world_size, self.start = int(rank), int(world_size), int(start)
        if self.batches_per_epoch < 1:
            raise DatasetError(f"dataset: {length} samples are fewer than one global batch ({batch_size} per "
                               f"process × {world_size} processes); prepare more data or lower --batch-size")

    @property
    def batches_per_epoch(self) -> int:
        return self.length // (self.batch_size * self.world_size)

    def position(self, consumed: int) -> tuple[int, int]:
        return divmod(int(consumed), self.batches_per_epoch)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, batch = self.position(self.start)
        bs, gb = self.batch_size, self.batch_size * self.world_size
        while True:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.length, generator=g).tolist()
            for b in range(batch, self.batches_per_epoch):
                chunk = perm[b * gb + self.rank * bs: b * gb + (self.rank + 1) * bs]
                yield [(epoch, i) for i in chunk]
            epoch, batch = epoch + 1, 0

    def __len__(self) -> int:  # endless; DataLoader only needs a number
        return 2 ** 31


def collate(items: Sequence[dict]) -> dict:
    out = {k: torch.stack([it[k] for it in items]) for k in ("pixels", "control", "masks", "global", "local",
                                                             "present")}
    out["caption"] = [it["caption"] for it in items]
    out["drop_identity"] = torch.tensor([it["drop_identity"] for it in items], dtype=torch.bool)
    out["index"] = torch.tensor([it["index"] for it in items])
    out["slots"] = torch.tensor([it["slots"] for it in items])
    return out
