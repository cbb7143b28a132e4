"""benchmarks/bench_faceid.py runs end to end on tiny settings for both bases and writes sane tables (no timing
asserted here): every configuration present, finite positive ratios, and the FaceID rule hooked and run at every
cross-attention transformer of the model — for ``--base sdxl`` a ComfyUI ``SDXL`` model with SDXL's block layout
(input 4, 5, 7, 8, the middle, output 0..5, several transformers per block) — with the one-op and chained N-person
outputs equal. The ``full`` SDXL config is checked to be ComfyUI's SDXL base UNet (built on the meta device)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tools.devkit.comfy_host import HOW_TO_PROVIDE, REPO, find_comfyui

pytestmark = pytest.mark.skipif(find_comfyui() is None, reason=HOW_TO_PROVIDE)

SCRIPT = REPO / "benchmarks" / "bench_faceid.py"
TINY = ["--n", "1,2", "--repeats", "1", "--steps", "2", "--channels", "32", "--latent", "8"]
SDXL_DEPTH = 3  # level-2 and middle transformers of the tiny SDXL model (level-1 blocks keep SDXL's 2)


def run_bench(tmp_path, *extra):
    proc = subprocess.run([sys.executable, str(SCRIPT), *TINY, *extra, "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    md = (tmp_path / "faceid.md").read_text()
    return md, json.loads((tmp_path / "faceid.json").read_text())


def expected_blocks(base: str) -> dict:
    """``{"input 4": depth, …}`` the tiny model must have: the published topology's blocks, SDXL's 10-deep ones at
    :data:`SDXL_DEPTH`."""
    from instantfamily_core.faceid import SD15, SDXL
    if base == "sd15":
        return {f"{b} {n}": d for (b, n), (_, d, _) in SD15.blocks.items()}
    return {f"{b} {n}": (d if d == 2 else SDXL_DEPTH) for (b, n), (_, d, _) in SDXL.blocks.items()}


@pytest.mark.parametrize("base", ["sd15", "sdxl"])
def test_bench_faceid_runs_and_patches_every_cross_attention(base, tmp_path):
    extra = ["--base", base] + (["--depth", str(SDXL_DEPTH)] if base == "sdxl" else [])
    md, data = run_bench(tmp_path, *extra)
    assert "| --- |" in md and "chained / one-op" in md and f"FaceID mode step time, {base}," in md
    results = data["results"]
    assert [r["config"] for r in results] == ["text", "one-op N=1", "chained N=1", "one-op N=2", "chained N=2"]
    for r in results:
        assert math.isfinite(r["ratio"]) and r["ratio"] > 0, r
        assert math.isfinite(r["paired_ratio"]) and r["paired_ratio"] > 0, r
        assert r["median_ms"] > 0 and r["steps"] == 1, r
    assert results[0]["ratio"] == 1.0

    model, env = data["model"], data["environment"]
    assert env["base"] == base
    blocks = expected_blocks(base)
    # the model's own cross-attentions (found in its module tree) have the base's layout, middle block included
    assert model["cross_attention_blocks"] == {k: blocks[k] for k in model["cross_attention_blocks"]}
    assert set(model["cross_attention_blocks"]) == set(blocks) and "middle 0" in blocks
    total = sum(blocks.values())
    assert model["cross_attention_transformers"] == model["topology_transformers"] == total
    assert model["topology_blocks"] == len(blocks)
    if base == "sdxl":
        assert total == 2 * 2 + 2 * SDXL_DEPTH + SDXL_DEPTH + 3 * SDXL_DEPTH + 3 * 2  # = 28 (SDXL: 70)
        assert model["model_class"] == "SDXL" and model["adm_in_channels"] == 2816
        assert model["context_dim"] == 2048 and model["widths"] == [64, 128]
    else:
        assert total == 16 and model["context_dim"] == 768

    for r in results[1:]:
        cov = r["coverage"]
        assert cov["rules"] == (1 if r["kind"] == "one-op" else r["n"]), r
        # hooked at, and ran at, every cross-attention transformer, once per model call (cond + uncond batched)
        assert cov["hooked_transformers"] == cov["ran_transformers"] == total, r
        assert cov["ran_outside_model"] == [] and set(cov["ran_blocks"]) == set(blocks), r
        assert cov["calls_per_transformer"] == [1] and cov["sane"], r
        assert cov["max_abs_term"] > 0 and cov["changed_vs_text"] > 0, r
        if r["kind"] == "chained":
            # N chained one-person rules add the same N-person sum as the one-op rule (float rounding apart:
            # 1e-3 of the change at N = 8 in the reduced runs, exactly 0 here)
            assert cov["diff_vs_one_op"] <= 2e-2 * cov["changed_vs_text"], r


PARSE_CHECK = r"""
import sys
sys.path.insert(0, "benchmarks")
import bench_faceid as B
for args in (["--depth", "3"], ["--head-dim", "32"], ["--base", "sdxl", "--heads", "2"]):
    try:
        B.parse_args(args)
    except SystemExit as e:
        assert e.code == 2, (args, e.code)
    else:
        raise AssertionError(f"accepted {args}")
assert B.parse_args(["--base", "sdxl", "--depth", "3", "--head-dim", "32"]).depth == 3
print("parse ok")
"""


def test_bench_faceid_rejects_options_of_the_other_base():
    proc = subprocess.run([sys.executable, "-c", PARSE_CHECK], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "parse ok" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stderr.count("only (") == 3, proc.stderr[-2000:]


FULL_SDXL_CHECK = r"""
import sys
sys.path.insert(0, "benchmarks")
import _common as C
import bench_faceid as B
nodes, mods = C.load_host("cpu")
import torch
import comfy.model_detection
import comfy.supported_models
from instantfamily_core.faceid import SDXL
spec = B.SIZES["sdxl"]["full"]
cfg = B.model_config("sdxl", spec)
assert cfg == C.SDXL_FULL, cfg
detected = comfy.model_detection.model_config_from_unet_config(dict(cfg))
assert type(detected) is comfy.supported_models.SDXL, type(detected)
model = comfy.supported_models.SDXL(dict(cfg)).get_model({}, device=torch.device("meta"))
topo = mods["patch"].live_topology(model.diffusion_model)
assert topo is SDXL, topo.describe()
assert model.diffusion_model.label_emb[0][0].in_features == 2816
print("full sdxl ok", len(topo.slots))
"""


def test_bench_faceid_full_sdxl_is_comfyuis_sdxl_base():
    proc = subprocess.run([sys.executable, "-c", FULL_SDXL_CHECK], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "full sdxl ok 70" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
