"""The benchmark scripts run end to end on tiny settings and write their tables (no timing is asserted here:
``--report-only`` keeps a missed timing target from failing the run; timing belongs to the benchmarks
themselves, see docs/benchmarks.md). bench_overhead's exit code checks bias builds per resolution, a count."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tools.devkit.comfy_host import HOW_TO_PROVIDE, REPO, find_comfyui

pytestmark = pytest.mark.skipif(find_comfyui() is None, reason=HOW_TO_PROVIDE)

RUNS = {
    "results": ["bench_step.py", "--device", "cpu", "--n", "1,2", "--modes", "additive,paper", "--repeats", "1",
                "--steps", "2", "--channels", "32", "--latent", "8", "--report-only"],
    "results:compare-compile": ["bench_step.py", "--device", "cpu", "--n", "1", "--modes", "additive", "--repeats",
                                "1", "--steps", "2", "--channels", "32", "--latent", "8", "--compare-compile", "eager",
                                "--report-only"],
    "overhead": ["bench_overhead.py", "--n", "1,2", "--steps", "2", "--latents", "8,12", "--calls", "23"],
    "faces": ["bench_faces.py", "--repeats", "1", "--count", "2", "--faces", "2"],
    "train_step": ["bench_train_step.py", "--n", "2", "--modes", "additive", "--repeats", "1", "--steps", "1",
                   "--report-only"],
}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_benchmark_script_runs_and_writes_its_tables(name, tmp_path):
    script, *args = RUNS[name]
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args, "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stem = name.split(":")[0]
    md = (tmp_path / f"{stem}.md").read_text()
    data = json.loads((tmp_path / f"{stem}.json").read_text())
    assert "| --- |" in md and "environment" in data
    if "--compare-compile" in args:  # every configuration eager and compiled, each against its own text-only
        assert sorted(r["compile"] for r in data["results"]) == ["eager", "eager", "no", "no"]
        assert [(x["n"], x["mode"]) for x in data["compile_compare"]] == [(1, "additive")]
        assert "compiled added ms ≤ eager added ms" in md
