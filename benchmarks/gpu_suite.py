"""Every GPU table in one command, inside a time budget: the day a device is lent (about 15 minutes in all), run

    python -m benchmarks.gpu_suite --out benchmarks/out/gpu            # CUDA, full size, writes RESULTS.md
    python -m benchmarks.gpu_suite --smoke --out /tmp/gpu_suite_smoke  # CPU, tiny sizes, under a minute

Stages, in priority order, each one of the pack's benchmark scripts in its own process (ratios are measured inside
one process, never across stages):

1. ``step``            bench_step.py: full-size SD1.5 UNet + ControlNet, fp16, 512²: text-only, InstantFamily
                       additive and paper, N = 1, 2, 4, 8, 16, peak VRAM per configuration (eager);
2. ``step-compiled``   eager and compiled (ComfyUI's TorchCompileModel path, inductor) alternated in one process,
                       additive N = 1, 4, 16: ratios and added ms each against its own text-only;
3. ``faceid-sd15``     bench_faceid.py: full-size SD1.5, FaceID N = 1, 4, 16, one op and N chained patches (eager);
4. ``faceid-sd15-compiled``  the same compiled (N = 4, 16);
5. ``faceid-sdxl``     bench_faceid.py: ComfyUI's SDXL base UNet at 1024², FaceID N = 1, 4, 16 (eager);
6. ``instantid``       bench_instantid.py: full-size SDXL UNet + IdentityNet, one pass vs N conditionings, N = 2, 4;
7. ``faces-cuda`` / ``faces-cpu``  bench_faces.py on onnxruntime's CUDA and CPU providers (ms per face);
8. ``train``           bench_train_step.py: one full-size training step in bf16 autocast, text-only vs additive N=4.

Each stage gets what is left of ``--budget-s`` (default 480 s) minus a reserve for writing; a stage that would not fit
its minimum is recorded as skipped, one that runs out of time is stopped (its process group killed) and recorded
as such, and the summary is rewritten after every stage, so an interrupted suite leaves what it measured. Output:
``<out>/gpu_suite.md`` + ``.json`` and each stage's own files under ``<out>/<stage>/``; on CUDA (or with
``--results``) a dated section naming the card, driver, CUDA, torch and ComfyUI versions is appended to
``benchmarks/RESULTS.md``. ``--smoke`` runs every stage on the CPU at tiny sizes (dynamo's ``eager`` backend for the
compiled stages), two at a time (``--jobs``; on CUDA one at a time), so the command cannot rot: it is a test
(``tests/test_gpu_suite.py``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:  # ``python benchmarks/gpu_suite.py`` as well as ``python -m benchmarks.gpu_suite``
    sys.path.insert(0, str(REPO))
from instantfamily_core.fileio import write_text_atomic  # noqa: E402
from tools.devkit.comfy_host import find_comfyui  # noqa: E402
RESULTS = HERE / "RESULTS.md"
RESERVE_S = 10.0

# (name, script, full CUDA arguments, tiny CPU smoke arguments, minimum seconds worth starting it with on CUDA)
_TINY_STEP = ["--device", "cpu", "--channels", "32", "--latent", "8", "--repeats", "1", "--steps", "2",
              "--report-only"]
_TINY_FACEID = ["--device", "cpu", "--channels", "32", "--latent", "8", "--repeats", "1", "--steps", "2"]
STAGES = [
    ("step", "bench_step.py",
     ["--device", "cuda", "--size", "full", "--dtype", "fp16", "--n", "1,2,4,8,16", "--modes", "additive,paper",
      "--repeats", "3", "--steps", "6", "--report-only"],
     _TINY_STEP + ["--n", "1,2", "--modes", "additive,paper"], 60),
    ("step-compiled", "bench_step.py",
     ["--device", "cuda", "--size", "full", "--dtype", "fp16", "--n", "1,4,16", "--modes", "additive",
      "--repeats", "3", "--steps", "6", "--compare-compile", "inductor", "--report-only"],
     _TINY_STEP + ["--n", "2", "--modes", "additive", "--compare-compile", "eager", "--no-controlnet"], 90),
    ("faceid-sd15", "bench_faceid.py",
     ["--device", "cuda", "--base", "sd15", "--size", "full", "--n", "1,4,16", "--repeats", "3"],
     _TINY_FACEID + ["--base", "sd15", "--n", "1,2"], 45),
    ("faceid-sd15-compiled", "bench_faceid.py",
     ["--device", "cuda", "--base", "sd15", "--size", "full", "--n", "4,16", "--repeats", "3", "--compile",
      "inductor"],
     _TINY_FACEID + ["--base", "sd15", "--n", "2", "--no-chained", "--compile", "eager"], 90),
    ("faceid-sdxl", "bench_faceid.py",
     ["--device", "cuda", "--base", "sdxl", "--size", "full", "--n", "1,4,16", "--repeats", "3"],
     _TINY_FACEID + ["--base", "sdxl", "--depth", "1", "--n", "2", "--no-chained"], 60),
    ("instantid", "bench_instantid.py",
     ["--device", "cuda", "--size", "full", "--n", "2,4", "--repeats", "3"],
     ["--device", "cpu", "--channels", "32", "--depth", "1", "--latent", "8", "--repeats", "1", "--steps", "2",
      "--n", "2"], 60),
    ("faces-cuda", "bench_faces.py", ["--provider", "CUDA", "--repeats", "3"],
     ["--provider", "CPU", "--repeats", "1", "--count", "1", "--faces", "1"], 20),
    ("faces-cpu", "bench_faces.py", ["--provider", "CPU", "--repeats", "3"],
     ["--provider", "CPU", "--repeats", "1", "--count", "1", "--faces", "1"], 20),
    ("train", "bench_train_step.py",
     ["--device", "cuda", "--size", "full", "--n", "4", "--modes", "additive", "--repeats", "3", "--report-only"],
     ["--device", "cpu", "--n", "2", "--modes", "additive", "--repeats", "1", "--steps", "1", "--batch", "1",
      "--report-only"], 45),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for gpu_suite.md/.json and each stage's files")
    p.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget of the whole suite (s)")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: check that every stage still runs")
    p.add_argument("--stages", default="", help="comma-separated subset of stage names (default: all)")
    p.add_argument("--jobs", type=int, default=None,
                   help="stages run at once (default 1 on CUDA: one device, one benchmark; 2 with --smoke)")
    p.add_argument("--results", default=None,
                   help="append the dated section to this Markdown file (default: benchmarks/RESULTS.md on CUDA, "
                        "none with --smoke)")
    args = p.parse_args(argv)
    names = [s[0] for s in STAGES]
    wanted = [x.strip() for x in args.stages.split(",") if x.strip()]
    unknown = [x for x in wanted if x not in names]
    if unknown:
        p.error(f"--stages: unknown {unknown}; stages are {names}")
    args.wanted = wanted or names
    args.jobs = args.jobs or (2 if args.smoke else 1)
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    return args


class _Job:
    """``cmd`` running in its own process group, output to ``log``, stopped (group and all) at ``deadline``
    (a ``time.perf_counter()`` value)."""

    def __init__(self, cmd: list, log: Path, deadline: float):
        self.t0, self.deadline = time.perf_counter(), deadline
        self.log = open(log, "w")
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True,
                                     env=dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", PYTHONUNBUFFERED="1"))

    def poll(self) -> tuple[bool, int | None, float]:
        """``(finished, returncode or None when stopped at the deadline, seconds)``."""
        rc = self.proc.poll()
        if rc is None and time.perf_counter() < self.deadline:
            return False, None, time.perf_counter() - self.t0
        if rc is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()
        return True, rc, time.perf_counter() - self.t0


def machine(smoke: bool) -> dict:
    """Card, driver, CUDA, torch, ComfyUI and CPU, read without importing ComfyUI in this process."""
    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "python": platform.python_version(), "platform": platform.platform()}
    try:
        import torch
        info["torch"] = torch.__version__
        info["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        info["torch"] = f"unavailable ({type(e).__name__})"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            name, driver, memory = (x.strip() for x in out.stdout.strip().splitlines()[0].split(","))
            info.update(gpu=name, driver=driver, gpu_memory=memory)
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    root = find_comfyui()
    if root is not None and (Path(root) / "comfyui_version.py").is_file():
        text = (Path(root) / "comfyui_version.py").read_text()
        info["comfyui"] = text.split("=", 1)[1].strip().strip("\"'") if "=" in text else "?"
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor() or platform.machine()
    info["mode"] = "CPU smoke (tiny sizes; timings mean nothing)" if smoke else "CUDA, full size"
    return info


def summary(info: dict, stages: list, budget: float, elapsed: float) -> str:
    card = info.get("gpu", "no GPU")
    head = (f"## GPU suite: {card} ({info['mode']}), {info['date']}\n\n"
            f"{card}{' · driver ' + info['driver'] if 'driver' in info else ''}"
            f"{' · ' + info['gpu_memory'] if 'gpu_memory' in info else ''} · CUDA {info.get('cuda')} · torch "
            f"{info.get('torch')} · ComfyUI {info.get('comfyui', '?')} · CPU {info.get('cpu')} · "
            f"`python -m benchmarks.gpu_suite` · budget {budget:.0f} s, used {elapsed:.0f} s. Every ratio below is "
            "measured within one process (its stage).\n")
    rows = ["| stage | status | seconds |", "| --- | --- | --- |"]
    rows += [f"| {s['name']} | {s['status']} | {s.get('seconds', 0):.0f} |" for s in stages]
    parts = [head, "\n".join(rows), ""]
    for s in stages:
        if s.get("markdown"):
            body = s["markdown"].strip().splitlines()
            if body and body[0].startswith("## "):
                body[0] = "#" + body[0]  # each stage's own title one level down
            parts += [f"### {s['name']}", "", "\n".join(body), ""]
    return "\n".join(parts)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    info = machine(args.smoke)
    if not args.smoke and "gpu" not in info:
        print("gpu_suite: no CUDA device; use --smoke on a CPU", file=sys.stderr)
        return 2
    done: list = []

    def write() -> str:
        md = summary(info, done, args.budget_s, time.perf_counter() - t0)
        write_text_atomic(out / "gpu_suite.md", md + "\n")
        write_text_atomic(out / "gpu_suite.json", json.dumps({"machine": info, "stages": [
            {k: v for k, v in s.items() if k != "markdown"} for s in done]}, indent=2) + "\n")
        return md

    deadline = t0 + args.budget_s - RESERVE_S
    queue = [s for s in STAGES if s[0] in args.wanted]
    stages = {name: {"name": name, "command": ["python", f"benchmarks/{script}", *(smoke if args.smoke else full)]}
              for name, script, full, smoke, _ in queue}
    running: dict = {}

    def finish(name: str, rc, seconds: float) -> None:
        stage, folder = stages[name], out / name
        stage["seconds"] = seconds
        if rc is None:
            stage["status"] = f"stopped at the budget after {seconds:.0f} s"
        elif rc != 0:
            tail = (folder / "log.txt").read_text(errors="replace").strip().splitlines()[-3:]
            stage["status"] = f"failed (exit {rc}): {' / '.join(tail)[:300]}"
        else:
            stage["status"] = "ok"
            stage["markdown"] = "\n\n".join(p.read_text() for p in sorted(folder.glob("*.md")))
        print(f"[gpu_suite] {name}: {stage['status']}", flush=True)
        publish()

    def publish() -> None:
        done[:] = [st for st in stages.values() if "status" in st]  # in stage order, whatever order they ended in
        write()

    while queue or running:
        while queue and len(running) < args.jobs:
            name, script, full, smoke, minimum = queue.pop(0)
            left = deadline - time.perf_counter()
            if left < (5 if args.smoke else minimum):
                stages[name].update(status=f"skipped: {left:.0f} s left of the budget, needs {minimum} s",
                                    seconds=0.0)
                publish()
                continue
            folder = out / name
            folder.mkdir(exist_ok=True)
            cmd = [sys.executable, str(HERE / script), *(smoke if args.smoke else full), "--out", str(folder)]
            print(f"[gpu_suite] {name}: {' '.join(stages[name]['command'])} ({left:.0f} s left)", flush=True)
            running[name] = _Job(cmd, folder / "log.txt", deadline)
        for name, job in list(running.items()):
            finished, rc, seconds = job.poll()
            if finished:
                del running[name]
                finish(name, rc, seconds)
        time.sleep(0.1)

    md = write()
    results = args.results or (None if args.smoke else str(RESULTS))
    if results:
        path = Path(results)
        previous = path.read_text() if path.exists() else ""
        write_text_atomic(path, previous.rstrip("\n") + "\n\n" + md + "\n")
        print(f"[gpu_suite] appended the section to {path}")
    print(f"[gpu_suite] wrote {out / 'gpu_suite.md'} in {time.perf_counter() - t0:.0f} s")
    return 0 if all(s["status"] == "ok" for s in done) else 1


if __name__ == "__main__":
    sys.exit(main())
