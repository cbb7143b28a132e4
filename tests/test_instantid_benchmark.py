"""benchmarks/bench_instantid.py runs end to end on tiny settings and writes sane tables (no timing asserted here):
every configuration present, finite positive ratios, and the counted evaluations per step are what each
configuration claims — the text baseline and one pass for N people: one UNet and one IdentityNet call with cond and
uncond batched; the N-conditioning recipe: N of each — with every identity configuration changing the result."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tools.devkit.comfy_host import HOW_TO_PROVIDE, REPO, find_comfyui

pytestmark = pytest.mark.skipif(find_comfyui() is None, reason=HOW_TO_PROVIDE)

SCRIPT = REPO / "benchmarks" / "bench_instantid.py"


def test_bench_instantid_runs_and_counts_the_evaluations_of_each_recipe(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--n", "2,3", "--repeats", "1", "--steps", "2",
                           "--channels", "32", "--depth", "1", "--latent", "8", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    md = (tmp_path / "instantid.md").read_text()
    data = json.loads((tmp_path / "instantid.json").read_text())
    assert "InstantID mode step time, sdxl," in md and "n-cond / one-pass" in md
    results = data["results"]
    assert [r["config"] for r in results] == ["text", "one-pass N=2", "n-cond N=2", "one-pass N=3", "n-cond N=3"]
    assert results[0]["ratio"] == 1.0
    for r in results:
        assert math.isfinite(r["ratio"]) and r["ratio"] > 0 and r["steps"] == 1, r
        ev = r["evaluations"]
        assert ev["finite"], r
        calls = r["n"] if r["kind"] == "n-cond" else 1  # cond and uncond of one control share a batch
        assert (ev["unet_calls"], ev["unet_rows"]) == (calls, 2 * calls), r
        assert (ev["controlnet_calls"], ev["controlnet_rows"]) == (calls, 2 * calls), r
        if r["kind"] != "text":
            assert ev["changed_vs_text"] > 1e-5, r
    assert "2048-d text" in data["topology"]
