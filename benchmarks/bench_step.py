"""Sampling-step cost of InstantFamily: text-only vs patched, N identities, both mask modes, in one process.

Every configuration is a real ComfyUI sampling run (``comfy.sample.sample``, euler, CFG → cond + uncond in one
batch of 2) of a random SD1.5-architecture UNet **plus** a ControlNet of the same shape built through the pack's
``build_controlnet``:

* ``text``       — the baseline: ComfyUI's stock ``ControlNetApplyAdvanced`` with that ControlNet, 77 text tokens;
* ``<mode> N=n`` — the pack's ``ApplyInstantFamily.apply`` (the real node: identity tokens appended in every attn2
  of the UNet *and* of the ControlNet, masked attention with ``mask_mode`` = additive / paper).

A step is the time between two consecutive sampler callbacks (wall clock; on CPU with one thread the ratios use
this process's CPU time instead, which other processes on a shared machine do not inflate — both are reported) (the first step of each run, which includes the
sampler's setup, is dropped). After one warm-up run of every configuration, ``--repeats`` rounds run each
configuration once, alternating (A B C … then … C B A), so drift of a shared machine hits all configurations alike.
``--compare-compile BACKEND`` runs every configuration twice in those same rounds, eager and compiled (each ratio
and added ms against the text-only run of its own kind), and reports the identity term's added ms both ways.
Reported: median, IQR, min, max of the step times; ratio = median(config) / median(text) from the same process;
``paired`` = the median over rounds of the same ratio within each round. Peak memory: ``max_memory_allocated`` per
configuration on CUDA; on CPU the process's peak RSS high-water mark after the configuration's warm-up (coarse).

    python benchmarks/bench_step.py --device cpu --size reduced --out benchmarks/out/cpu
    python benchmarks/bench_step.py --device cuda --size full --dtype fp16 --out benchmarks/out/gpu
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

SIZES = {
    # SD1.5's real UNet/ControlNet at 512×512 px (64×64 latent)
    "full": {"channels": 320, "heads": 8, "latent": 64, "steps": 11, "repeats": 5},
    # same topology (4 levels, 16 cross-attentions, context 768) at 1/5 width with 2 heads (head dims 32/64/128,
    # SD1.5: 40/80/160), 256×256 px
    "reduced": {"channels": 64, "heads": 2, "latent": 32, "steps": 4, "repeats": 3},
}
TARGETS = {"cpu": {4: 1.10}, "cuda": {4: 1.03, 16: 1.05}}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--size", choices=list(SIZES), default=None, help="default: full on cuda, reduced on cpu")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="default: fp16 cuda, fp32 cpu")
    p.add_argument("--n", default="1,2,4,8,16", help="identity counts, comma separated")
    p.add_argument("--modes", default="additive,paper", help="mask modes (additive, paper)")
    p.add_argument("--repeats", type=int, default=None, help="alternating rounds after the warm-up")
    p.add_argument("--steps", type=int, default=None, help="sampler steps per run (the first is not timed)")
    p.add_argument("--channels", type=int, default=None, help="override the UNet width (model_channels)")
    p.add_argument("--heads", type=int, default=None, help="override the attention head count")
    p.add_argument("--latent", type=int, default=None, help="override the latent side (pixels / 8)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1 on cpu: stable timings "
                   "on a shared machine; 0 = torch's default)")
    p.add_argument("--variants", default="", help="also run diagnostic configurations (additive mode): "
                   "'tokens' = identity tokens "
                   "with full masks (no bias: the cost of the extra keys alone)")
    p.add_argument("--compile", default=None, metavar="BACKEND",
                   help="compile every configuration's UNet with ComfyUI's set_torch_compile_wrapper (what its "
                        "TorchCompileModel node does), e.g. inductor; the warm-up run compiles")
    p.add_argument("--compare-compile", default=None, metavar="BACKEND",
                   help="run every configuration eager AND compiled with BACKEND in the same alternating rounds "
                        "(one process; ratios and added ms against the text-only run of the same kind)")
    p.add_argument("--no-controlnet", action="store_true", help="UNet only (the ControlNet is not attached)")
    p.add_argument("--comfy-arg", action="append", default=[], help="extra ComfyUI CLI flag, e.g. "
                   "--comfy-arg=--use-pytorch-cross-attention (repeatable)")
    p.add_argument("--clock", choices=["auto", "wall", "cpu"], default="auto",
                   help="what the ratios use: wall-clock, or this process's CPU time (immune to other processes "
                        "taking the cores; only meaningful with 1 thread). auto = cpu on --device cpu with 1 thread, "
                        "else wall")
    p.add_argument("--report-only", action="store_true", help="exit 0 even when a target is missed (smoke runs "
                   "on tiny settings, where timings mean nothing)")
    p.add_argument("--out", default=None, help="folder for results.md + results.json")
    args = p.parse_args(argv)
    if args.compile and args.compare_compile:
        p.error("--compile and --compare-compile are mutually exclusive")
    if args.steps is not None and args.steps < 2:
        p.error("--steps must be at least 2 (the first step of each run is not timed)")
    return args


def main(argv=None):
    args = parse_args(argv)
    size, spec = C.model_spec(args, SIZES)
    counts = [int(x) for x in args.n.split(",") if x.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]

    nodes, mods = C.load_host(args.device, args.comfy_arg)
    import torch
    import comfy.ldm.modules.attention as comfy_attention
    import comfy.model_management
    import comfy.sample
    threads = args.threads if args.threads is not None else (1 if args.device == "cpu" else 0)
    if threads:
        torch.set_num_threads(threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device available")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        args.dtype or ("fp16" if args.device == "cuda" else "fp32")]

    clock = args.clock if args.clock != "auto" else ("cpu" if args.device == "cpu" and threads == 1 else "wall")
    if args.device == "cuda":
        clock = "wall"
    other_clock = "wall" if clock == "cpu" else "cpu"
    t0 = time.perf_counter()
    cfg = C.unet_config(spec["channels"], spec["heads"])
    model = C.build_unet(cfg, dtype, args.device)
    ifmodel = C.build_instantfamily(mods, cfg, dtype)
    build_s = time.perf_counter() - t0
    lat = spec["latent"]
    px = lat * 8
    pose_image = torch.rand(1, px, px, 3, generator=torch.Generator().manual_seed(3))
    pos0, neg0 = C.conditioning(1), C.conditioning(2)

    configs = []
    if args.no_controlnet:
        configs.append({"name": "text", "n": 0, "mode": "-", "model": model, "pos": pos0, "neg": neg0})
    else:
        pos, neg = nodes.ControlNetApplyAdvanced().apply_controlnet(pos0, neg0, ifmodel.controlnet, pose_image,
                                                                   1.0, 0.0, 1.0)
        configs.append({"name": "text", "n": 0, "mode": "-", "model": model, "pos": pos, "neg": neg})
    apply = mods["model_nodes"].ApplyInstantFamily()
    for mode in modes:
        for n in counts:
            masks = C.face_masks(n, px, px)
            patched, pos, neg = apply.apply(model, ifmodel, C.identities(n), pose_image, masks, pos0, neg0, 1.0, "",
                                            0.0 if args.no_controlnet else 1.0, 0.0, 1.0, mode)
            state = next(iter(patched.model_options["transformer_options"]["patches_replace"]["attn2"].values())).state
            configs.append({"name": f"{mode} N={n}", "n": n, "mode": mode, "model": patched, "pos": pos,
                            "neg": neg, "state": state})
    if "tokens" in args.variants:
        for n in counts:
            patched, pos, neg = apply.apply(model, ifmodel, C.identities(n), pose_image, torch.ones(n, px, px), pos0,
                                            neg0, 1.0, "", 0.0 if args.no_controlnet else 1.0, 0.0, 1.0, "additive")
            configs.append({"name": f"tokens N={n}", "n": n, "mode": "tokens", "model": patched, "pos": pos,
                            "neg": neg})

    for c in configs:
        c["compile"] = args.compile or "no"
    if args.compile:
        C.compile_models(configs, args.compile)
    if args.compare_compile:  # compiled copies (clones of the same patched models) in the same rounds
        compiled = [dict(c, name=f"{c['name']} ({args.compare_compile})", compile=args.compare_compile)
                    for c in configs]
        C.compile_models(compiled, args.compare_compile)
        configs += compiled
    compile_label = (f"compare no vs {args.compare_compile}" if args.compare_compile else args.compile or "no")

    timer = C.Timer(args.device)
    latent = torch.zeros(1, 4, lat, lat)
    noise = torch.randn(1, 4, lat, lat, generator=torch.Generator().manual_seed(0))

    def run(c) -> list[float]:
        stamps = []

        def cb(i, x0, x, total):
            stamps.append((timer.now(), time.process_time()))
        with C.CudaPeak(args.device, c):
            comfy.sample.sample(c["model"], noise, spec["steps"], 5.0, "euler", "normal", c["pos"], c["neg"],
                                latent, callback=cb, disable_pbar=True, seed=0)
        wall = [b[0] - a[0] for a, b in zip(stamps, stamps[1:])]
        cpu = [b[1] - a[1] for a, b in zip(stamps, stamps[1:])]
        return (cpu, wall) if clock == "cpu" else (wall, cpu)

    print(f"# bench_step: {size} ({spec['channels']} ch, {px}×{px} px, latent {lat}×{lat}), {dtype}, "
          f"{args.device}, compile {compile_label}, attention backend {comfy_attention.optimized_attention.__name__}, "
          f"{len(configs)} configs × {spec['repeats']} rounds × {spec['steps'] - 1} timed steps; built in "
          f"{build_s:.1f}s", flush=True)
    t_start = time.perf_counter()
    for c in configs:  # warm-up: model load, bias build, allocator, kernels
        run(c)
        if args.device == "cpu":
            c["peak_mib"] = C.peak_rss_mib()
        c["steps"], c["rounds"], c["other"] = [], [], []
    print(f"warm-up done in {time.perf_counter() - t_start:.1f}s", flush=True)
    def measure(c) -> list[float]:
        times, other = run(c)
        c["other"] += other
        return times
    C.alternate_rounds(configs, spec["repeats"], measure, t_start)
    total_s = time.perf_counter() - t_start

    results = []
    for c in configs:
        base = next(b for b in configs if b["mode"] == "-" and b["compile"] == c["compile"])  # its own text-only
        base_med = statistics.median(base["steps"])
        s = C.summarize([t * 1000 for t in c["steps"]])
        ratio = statistics.median(c["steps"]) / base_med
        paired = statistics.median(a / b for a, b in zip(c["rounds"], base["rounds"]))
        entry = {"config": c["name"], "n": c["n"], "mode": c["mode"], "compile": c["compile"],
                 **{f"{k}_ms" if k not in ("n",) else "samples": v for k, v in s.items()}, "ratio": ratio,
                 "paired_ratio": paired,
                 f"{other_clock}_median_ms": statistics.median(c["other"]) * 1000,
                 f"{other_clock}_ratio": statistics.median(c["other"]) / statistics.median(base["other"]),
                 "added_ms": (statistics.median(c["steps"]) - base_med) * 1000, "peak_mib": c.get("peak_mib")}
        if "state" in c:
            entry["bias_cache_entries"] = len(c["state"].attention._cache)
        results.append(entry)

    env = C.environment(args.device)
    env.update(attention_backend=comfy_attention.optimized_attention.__name__, dtype=str(dtype),
               compile=compile_label,
               size=size, model_channels=spec["channels"], num_heads=spec["heads"], latent=lat, pixels=px, steps_per_run=spec["steps"],
               rounds=spec["repeats"], controlnet=not args.no_controlnet, wall_s=round(total_s, 1), clock=clock,
               vram_state=str(comfy.model_management.vram_state))
    mem_label = "peak alloc MiB" if args.device == "cuda" else "peak RSS MiB (process, coarse)"
    rows = [[r["config"], f"{r['median_ms']:.2f}", f"{r['p25_ms']:.2f}–{r['p75_ms']:.2f}",
             f"{r['min_ms']:.2f}", f"{r['max_ms']:.2f}", r["samples"], f"{r['ratio']:.3f}",
             f"{r['paired_ratio']:.3f}", f"{r[other_clock + '_median_ms']:.2f}", f"{r[other_clock + '_ratio']:.3f}",
             f"{r['peak_mib']:.0f}" if r["peak_mib"] else "-"] for r in results]
    table = C.markdown_table(["config", f"median ms/step ({clock})", "IQR ms", "min", "max", "steps", "ratio",
                              "paired ratio", f"{other_clock} ms", f"{other_clock} ratio", mem_label], rows)
    eager = [r for r in results if r["compile"] == (args.compile or "no")]  # the pivot and targets
    pivot_modes = modes + [v for v in ("tokens",) if v in args.variants]
    pivot_rows = []
    for n in counts:
        row = [str(n)]
        for mode in pivot_modes:
            r = next(x for x in eager if x["n"] == n and x["mode"] == mode)
            row.append(f"{r['ratio']:.3f}")
        pivot_rows.append(row)
    pivot = C.markdown_table(["N"] + [f"{m} ×" for m in pivot_modes], pivot_rows)

    verdicts = []
    for n, limit in TARGETS[args.device].items():
        r = next((x for x in eager if x["n"] == n and x["mode"] == "additive"), None)
        if r is not None:
            ok = r["ratio"] <= limit
            verdicts.append({"n": n, "limit": limit, "ratio": r["ratio"], "paired_ratio": r["paired_ratio"], "clock": clock,
                             "met": ok})
    lines = [f"## Sampling step, {args.device} ({env.get('gpu', env['cpu'])}), {size}",
             "",
             f"{env['date']} · torch {env['torch']} · ComfyUI {env.get('comfyui', '?')} · {dtype} · "
             f"UNet{' + ControlNet' if not args.no_controlnet else ''} {spec['channels']} ch, {spec['heads']} heads, {px}×{px} px "
             f"(latent {lat}×{lat}), CFG batch 2, 50 tokens per identity · torch.compile: {env['compile']} · attention "
             f"`{env['attention_backend']}` · {env['torch_threads']} threads · clock: {clock} · {spec['repeats']} rounds × "
             f"{spec['steps'] - 1} steps per config · run {total_s:.0f}s",
             "", table, "", f"Ratio to text-only (median / median{', eager' if args.compare_compile else ''}):", "",
             pivot, ""]
    for v in verdicts:
        lines.append(f"- target additive N={v['n']}: ≤ {v['limit']:.2f}× → measured {v['ratio']:.3f}× "
                     f"(paired {v['paired_ratio']:.3f}×, {clock} time): **{'met' if v['met'] else 'NOT met'}**")
    compare = []  # --compare-compile: per N and mode, eager vs compiled, each against its own text-only
    if args.compare_compile:
        pair = {(r["n"], r["mode"], r["compile"]): r for r in results}
        compare = [{"n": n, "mode": m, **{f"{kind}_{k}": pair[(n, m, b)][k] for kind, b in
                    (("eager", "no"), ("compiled", args.compare_compile)) for k in ("ratio", "added_ms")}}
                   for n in counts for m in modes]
        te, tk = pair[(0, "-", "no")], pair[(0, "-", args.compare_compile)]
        lines += ["", f"Eager vs compiled ({args.compare_compile}) in the same rounds, each against its own text-only "
                  f"({clock} time; added ms = median − text-only median; text-only {te['median_ms']:.2f} ms eager, "
                  f"{tk['median_ms']:.2f} ms compiled):", "",
                  C.markdown_table(["N", "mode", "eager ×", "compiled ×", "eager added ms", "compiled added ms",
                                    "compiled − eager ms"],
                                   [[x["n"], x["mode"], f"{x['eager_ratio']:.3f}", f"{x['compiled_ratio']:.3f}",
                                     f"{x['eager_added_ms']:.2f}", f"{x['compiled_added_ms']:.2f}",
                                     f"{x['compiled_added_ms'] - x['eager_added_ms']:+.2f}"] for x in compare]), ""]
        for n in counts:
            xs = [x for x in compare if x["n"] == n]
            ok = all(x["compiled_added_ms"] <= x["eager_added_ms"] for x in xs)
            lines.append(f"- N={n}: compiled added ms ≤ eager added ms → " + ", ".join(
                f"{x['mode']} {x['compiled_added_ms']:.2f} vs {x['eager_added_ms']:.2f}" for x in xs)
                + f": **{'yes' if ok else 'no'}**")
    C.write_outputs(args.out, "results", "\n".join(lines), {"environment": env, "results": results,
                    "targets": verdicts, **({"compile_compare": compare} if compare else {})})
    return 0 if args.report_only or all(v["met"] for v in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
