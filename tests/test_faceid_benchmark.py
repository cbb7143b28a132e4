"""benchmarks/bench_faceid.py runs end to end on tiny settings and writes its tables (no timing asserted here)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tools.devkit.comfy_host import HOW_TO_PROVIDE, REPO, find_comfyui

pytestmark = pytest.mark.skipif(find_comfyui() is None, reason=HOW_TO_PROVIDE)


def test_bench_faceid_runs_and_writes_its_tables(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_faceid.py"), "--n", "1,2", "--repeats",
                           "1", "--steps", "2", "--channels", "32", "--latent", "8", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    md = (tmp_path / "faceid.md").read_text()
    data = json.loads((tmp_path / "faceid.json").read_text())
    assert "| --- |" in md and "chained / one-op" in md
    assert [r["config"] for r in data["results"]] == ["text", "one-op N=1", "chained N=1", "one-op N=2",
                                                      "chained N=2"]
