"""benchmarks/gpu_suite.py, the one command that fills every GPU table: its CPU smoke (every stage on tiny sizes)
runs end to end and writes the summary, each stage's table and the dated section; a budget too small for a stage
skips it (said, not silent) and still writes the summary; a stage over its time is stopped, process group and all."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tools.devkit.comfy_host import HOW_TO_PROVIDE, REPO, find_comfyui

pytestmark = pytest.mark.skipif(find_comfyui() is None, reason=HOW_TO_PROVIDE)


def _suite(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu_suite", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def test_cpu_smoke_runs_every_stage_and_writes_the_section(tmp_path):
    from benchmarks.gpu_suite import STAGES
    results = tmp_path / "RESULTS.md"
    results.write_text("# earlier results\n")
    t0 = time.perf_counter()
    proc = _suite("--smoke", "--out", str(tmp_path / "out"), "--results", str(results), "--budget-s", "400")
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "out" / "gpu_suite.json").read_text())
    assert [s["name"] for s in data["stages"]] == [s[0] for s in STAGES]
    assert all(s["status"] == "ok" for s in data["stages"]), data["stages"]
    md = (tmp_path / "out" / "gpu_suite.md").read_text()
    assert md.startswith("## GPU suite: ") and "CPU smoke" in md and "torch " in md and "ComfyUI " in md
    for name, *_ in STAGES:
        assert f"### {name}\n" in md, name
    assert "n-cond / one-pass" in md and "chained / one-op" in md and "compiled added ms" in md
    text = results.read_text()
    assert text.startswith("# earlier results\n") and text.rstrip().endswith(md.rstrip())
    print(f"\ngpu_suite --smoke: {seconds:.0f} s")


def test_a_budget_too_small_skips_stages_and_still_writes(tmp_path):
    proc = _suite("--smoke", "--out", str(tmp_path), "--budget-s", "5", "--stages", "step,faces-cpu", timeout=120)
    assert proc.returncode == 1
    data = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert [s["name"] for s in data["stages"]] == ["step", "faces-cpu"]
    assert all(s["status"].startswith("skipped:") for s in data["stages"]), data["stages"]
    assert "skipped:" in (tmp_path / "gpu_suite.md").read_text()


def test_a_stage_over_its_time_is_stopped_with_its_children(tmp_path):
    from benchmarks.gpu_suite import _Job
    child = ("import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; "
             "time.sleep(60)']); print(c.pid, flush=True); time.sleep(60)")
    t0 = time.perf_counter()
    job = _Job([sys.executable, "-c", child], tmp_path / "log.txt", time.perf_counter() + 2.0)
    while not (state := job.poll())[0]:
        time.sleep(0.1)
    _, rc, seconds = state
    assert rc is None and seconds < 20 and time.perf_counter() - t0 < 20
    grandchild = int((tmp_path / "log.txt").read_text().split()[0])
    time.sleep(0.5)
    status = Path(f"/proc/{grandchild}/status")
    assert not status.exists() or "State:\tZ" in status.read_text()  # killed with the group (gone or a zombie)


def test_unknown_stage_is_refused():
    proc = _suite("--smoke", "--out", "/tmp/never", "--stages", "nope", timeout=60)
    assert proc.returncode == 2 and "unknown ['nope']" in proc.stderr
