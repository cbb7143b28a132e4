"""prepare.py (shards, skips, resume, JSONL input) and the training dataset / sampler."""

import json
import shutil
from itertools import islice

import numpy as np
import pytest
import torch

from instantfamily_core.errors import OptionError
from instantfamily_core.render import slot_color
from support.poses import frame, person
from support.training_fixtures import BROKEN, LAYOUTS, training_workspace
from training import prepare
from training.data import DatasetError, DropoutConfig, EpochBatchSampler, ShardDataset, read_manifest, read_shard_metadata


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return training_workspace(tmp_path_factory)


def test_manifest_counts_samples_and_reports_every_skip(ws):
    m = read_manifest(ws.shards)
    assert m["complete"] and m["num_samples"] == len(LAYOUTS) and m["total_inputs"] == len(LAYOUTS) + len(BROKEN)
    assert m["info"] == {"resolution": 64, "face_pack": "tinypack", "global_dim": 512, "local_dim": 512, "grid": 7,
                         "margin": 0.25}
    reasons = {s["file"]: s["reason"] for s in m["skipped"]}
    assert set(reasons) == set(BROKEN) and m["skipped_count"] == len(BROKEN)
    for name, why in BROKEN.items():
        assert why in reasons[name]
    records = [r for s in m["shards"] for r in read_shard_metadata(ws.shards / s["file"])["samples"]]
    assert [len(r["faces"]) for r in records] == [len(c) for c, _ in LAYOUTS]
    first = records[0]
    assert first["pose"]["canvas_width"] == 64 and first["source_size"] == [256, 256]
    # faces at (64, 96) and (192, 96) on 256 px → centres (16, 24) and (48, 24) on 64 px
    centres = sorted(((f["bbox"][0] + f["bbox"][2]) / 2, (f["bbox"][1] + f["bbox"][3]) / 2) for f in first["faces"])
    np.testing.assert_allclose(centres, [(16, 24), (48, 24)], atol=0.5)


def test_prepare_resumes_only_missing_shards(ws, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(ws.shards, out)
    (out / "shard-00001.safetensors").unlink()
    (out / "manifest.json").unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.safetensors")}
    assert prepare.main(ws.prepare_args(out)) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.safetensors") if p.name in kept} == kept
    assert (out / "shard-00001.safetensors").is_file()
    a, b = read_manifest(out), read_manifest(ws.shards)
    assert a["shards"] == b["shards"] and a["skipped_count"] == b["skipped_count"]


def test_prepare_refuses_shards_of_another_input_list(ws, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(ws.shards, out)
    data = tmp_path / "data"
    shutil.copytree(ws.data, data)
    (data / "zzz_extra.png").write_bytes((data / "img000.png").read_bytes())
    args = ws.prepare_args(out)
    args[args.index("--input") + 1] = str(data)
    assert prepare.main(args) == 2


def test_prepare_reads_a_jsonl_manifest(ws, tmp_path):
    lines = [{"image": str(ws.data / "img000.png"), "caption": "two people",
              "pose": json.loads((ws.data / "img000.pose.json").read_text())},
             {"image": str(ws.data / "img001.png"), "caption": "one person", "pose": str(ws.data / "img001.pose.json")},
             {"image": "missing.png", "caption": "x", "pose": frame([person(10, 10)])}]
    src = tmp_path / "list.jsonl"
    src.write_text("\n".join(json.dumps(x) for x in lines))
    args = ws.prepare_args(tmp_path / "out")
    args[args.index("--input") + 1] = str(src)
    assert prepare.main(args) == 0
    m = read_manifest(tmp_path / "out")
    assert m["num_samples"] == 2 and m["skipped"][0]["reason"] == "image file not found"


def test_items_are_a_function_of_seed_epoch_and_index(ws):
    ds = ShardDataset(ws.shards, num_slots=4, seed=3)
    a, b = ds[(0, 2)], ds[(0, 2)]
    for k in ("pixels", "control", "masks", "global", "present"):
        assert torch.equal(a[k], b[k])
    orders = {tuple(ds[(e, 2)]["global"][:3, 0].tolist()) for e in range(8)}
    assert len(orders) > 1  # slot order is re-drawn each epoch


def test_slot_circles_masks_and_features_agree(ws):
    # Changed with issue 9: the three faces now sit in three random slots of four (they used to fill 0…2).
    ds = ShardDataset(ws.shards, num_slots=4, seed=0, dropout=DropoutConfig(0, 0, 0))
    shard, i, record = ds.index[2]
    g_all = ds._tensor(shard, f"{i:06d}.global").float()
    for epoch in range(3):
        item = ds[(epoch, 2)]  # three faces
        assert item["present"].sum() == 3 and item["caption"]
        assert item["present"].tolist() == [f >= 0 for f in item["slots"]]
        for s in range(4):
            if not item["present"][s]:
                assert item["masks"][s].sum() == 0 and item["global"][s].abs().sum() == 0
                assert item["control"].mul(255).round().int().permute(1, 2, 0).reshape(-1, 3).tolist().count(
                    list(slot_color(s))) == 0  # no circle in a padding slot's colour
                continue
            assert torch.equal(item["global"][s], g_all[item["slots"][s]])
            ys, xs = torch.nonzero(item["masks"][s], as_tuple=True)
            cy, cx = int(ys.float().mean().round()), int(xs.float().mean().round())
            pixel = (item["control"][:, cy, cx] * 255).round().int().tolist()
            assert pixel == list(slot_color(s))


@pytest.mark.parametrize("num_slots", [4, 8])
def test_single_face_samples_use_every_slot(ws, num_slots):
    """Over many (seed, epoch, index) draws a one-face sample lands in every slot, roughly uniformly (paper §4.2:
    random order, no slot-1 bias; slots ≥ 4 are trained for the 7-person workflow)."""
    single = [i for i, (_, _, r) in enumerate(ShardDataset(ws.shards).index) if len(r["faces"]) == 1]
    assert single
    counts = np.zeros(num_slots, int)
    for seed in range(8):
        ds = ShardDataset(ws.shards, num_slots=num_slots, seed=seed)
        for epoch in range(25):
            for index in single:
                slots = ds.draw(epoch, index)[0]
                assert sum(s is not None for s in slots) == 1
                counts[[n for n, s in enumerate(slots) if s is not None][0]] += 1
    draws = counts.sum()
    assert (counts > 0).all(), counts
    # each slot within ±50 % of its expected share (400 draws: a slot-0 bias or a never-used slot fails this)
    assert (np.abs(counts - draws / num_slots) < 0.5 * draws / num_slots).all(), counts
    # and the items themselves follow the draw: one present slot, the rest padding, deterministic per draw
    ds = ShardDataset(ws.shards, num_slots=num_slots, seed=5, dropout=DropoutConfig(0, 0, 0))
    seen = set()
    for epoch in range(12):
        item = ds[(epoch, single[0])]
        (slot,) = torch.nonzero(item["present"]).flatten().tolist()
        assert item["masks"][slot].sum() > 0 and (item["masks"].flatten(1).sum(1) > 0).sum() == 1
        assert torch.equal(item["control"], ds[(epoch, single[0])]["control"])
        seen.add(slot)
    assert len(seen) > 2


def test_multi_face_samples_fill_random_slots(ws):
    ds = ShardDataset(ws.shards, num_slots=8, seed=1)
    places = set()
    for epoch in range(40):
        slots = ds.draw(epoch, 2)[0]
        faces = [s for s in slots if s is not None]
        assert sorted(faces) == [0, 1, 2]  # all three faces, each once
        places |= {n for n, s in enumerate(slots) if s is not None}
    assert places == set(range(8))


def test_people_beyond_the_slots_keep_their_skeleton_but_no_circle(ws):
    ds = ShardDataset(ws.shards, num_slots=1, seed=0, dropout=DropoutConfig(0, 0, 0))
    item = ds.validation_item(2)
    assert item["present"].tolist() == [True] and item["masks"].shape[0] == 1
    colours = {tuple(slot_color(s)) for s in range(4)}
    record = ds.index[2][2]
    others = record["faces"][1:]
    centres = sorted(((f["bbox"][0] + f["bbox"][2]) / 2, (f["bbox"][1] + f["bbox"][3]) / 2) for f in record["faces"])
    circled = 0
    for cx, cy in centres:
        pixel = tuple((item["control"][:, int(cy), int(cx)] * 255).round().int().tolist())
        assert pixel != (0, 0, 0)  # skeleton drawn for everyone
        circled += pixel in colours
    assert circled == 1 and len(others) == 2


def test_dropout_is_reported_and_validated(ws):
    ds = ShardDataset(ws.shards, seed=0, dropout=DropoutConfig(text=0.0, identity=1.0, both=0.0))
    item = ds[(0, 0)]
    assert item["drop_identity"] and item["caption"]
    with pytest.raises(OptionError, match="drop"):
        DropoutConfig(text=0.6, identity=0.6)


def test_sampler_splits_ranks_and_resumes_mid_epoch():
    full = list(islice(iter(EpochBatchSampler(10, 2, seed=1)), 12))
    assert len({i for b in full[:5] for _, i in b}) == 10  # an epoch covers every sample once
    assert list(islice(iter(EpochBatchSampler(10, 2, seed=1, start=7)), 5)) == full[7:12]
    r0 = list(islice(iter(EpochBatchSampler(10, 2, seed=1, rank=0, world_size=2)), 2))
    r1 = list(islice(iter(EpochBatchSampler(10, 2, seed=1, rank=1, world_size=2)), 2))
    assert not {x for b in r0 for x in b} & {x for b in r1 for x in b}
    with pytest.raises(DatasetError, match="fewer than one global batch"):
        EpochBatchSampler(3, 2, world_size=2)
