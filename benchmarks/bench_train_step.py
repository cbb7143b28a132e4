"""Training-step cost: masked vs unmasked ControlNet training step (``training.model.predict_noise``).

One step = ``InstantFamilyNet`` forward (projector → identity tokens → ControlNet + frozen UNet, both with the
masked attn2 processors) → MSE to the noise → backward → AdamW step on ControlNet + projector. Random
SD1.5-topology diffusers models (``training/configs/sd15`` with the width reduced for CPU, or full size on CUDA).
Configurations, alternated in each round after a warm-up:

* ``text``            — no identities: plain ControlNet training (the unmasked baseline);
* ``tokens N=n``      — identity tokens with full masks (no bias: the cost of the extra keys alone);
* ``<mode> N=n``      — identity tokens, per-row face masks, mask_mode additive / paper.

Target: masked (additive) ≤ 1.10× unmasked (``tokens``, same N); the ratio to ``text`` is reported too.

    python benchmarks/bench_train_step.py --out benchmarks/out/cpu
    python benchmarks/bench_train_step.py --device cuda --size full --out benchmarks/out/gpu
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

SIZES = {"full": {"channels": 320, "heads": 8, "latent": 64, "batch": 2},
         "reduced": {"channels": 64, "heads": 2, "latent": 32, "batch": 2}}
TARGET = 1.10


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--size", choices=list(SIZES), default=None, help="default: full on cuda, reduced on cpu")
    p.add_argument("--n", default="4")
    p.add_argument("--modes", default="additive,paper")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=2, help="timed training steps per config per round")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--report-only", action="store_true", help="exit 0 even when a target is missed (smoke runs "
                   "on tiny settings, where timings mean nothing)")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        from training.model import IdentityBatch, InstantFamilyNet, make_controlnet  # noqa: F401
    except ImportError as e:
        print(f"bench_train_step: SKIPPED — the training code is not available ({e}); this benchmark needs "
              "training.model.predict_noise / InstantFamilyNet / make_controlnet (the training issue)")
        return 0
    import torch
    from diffusers import UNet2DConditionModel
    from instantfamily_core.projector import IdentityProjector, ProjectorConfig
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device available")
    size = args.size or ("full" if args.device == "cuda" else "reduced")
    spec = dict(SIZES[size])
    if args.batch:
        spec["batch"] = args.batch
    dev = torch.device(args.device)
    counts = [int(x) for x in args.n.split(",") if x.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]

    config_dir = C.REPO / "training" / "configs" / "sd15" / "unet"
    cfg = json.loads((config_dir / "config.json").read_text())
    ch = spec["channels"]
    cfg.update(block_out_channels=[ch, 2 * ch, 4 * ch, 4 * ch], attention_head_dim=spec["heads"])
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(cfg).to(dev)
    unet.requires_grad_(False).eval()
    controlnet = make_controlnet(unet).to(dev).train()
    projector = IdentityProjector(ProjectorConfig(hidden_dim=256)).to(dev).train()
    if args.device == "cuda":
        unet.half()
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if args.device == "cuda" else None)

    b, lat = spec["batch"], spec["latent"]
    px = lat * 8
    g = torch.Generator().manual_seed(1)
    text = torch.randn(b, 77, 768, generator=g).to(dev)
    control = torch.rand(b, 3, px, px, generator=g).to(dev)
    latents = torch.randn(b, 4, lat, lat, generator=g).to(dev)
    noise = torch.randn(b, 4, lat, lat, generator=g).to(dev)
    timesteps = torch.randint(0, 1000, (b,), generator=g).to(dev)

    def identity_batch(n):
        return IdentityBatch(torch.nn.functional.normalize(torch.randn(b, n, 512, generator=g), dim=-1).to(dev),
                             torch.randn(b, n, 512, 7, 7, generator=g).to(dev), torch.ones(b, n, dtype=torch.bool,
                                                                                         device=dev))

    configs = [{"name": "text", "n": 0, "mode": "additive", "ids": identity_batch(0),
                "masks": torch.zeros(b, 0, px, px, device=dev)}]
    for n in counts:
        configs.append({"name": f"tokens N={n}", "n": n, "mode": "additive", "ids": identity_batch(n),
                        "masks": torch.ones(b, n, px, px, device=dev)})
        for mode in modes:
            masks = C.face_masks(n, px, px).to(dev)
            configs.append({"name": f"{mode} N={n}", "n": n, "mode": mode, "ids": identity_batch(n),
                            "masks": masks.unsqueeze(0).expand(b, -1, -1, -1).contiguous()})
    nets = {}
    for c in configs:
        nets[c["mode"]] = nets.get(c["mode"]) or InstantFamilyNet(controlnet, projector, c["mode"])
    opt = torch.optim.AdamW(list(controlnet.parameters()) + list(projector.parameters()), lr=1e-6)
    timer = C.Timer(args.device)
    # one thread on CPU: this process's CPU time, which other processes on a shared machine do not inflate
    clock = "cpu" if args.device == "cpu" and args.threads == 1 else "wall"

    def step(c):
        net = nets[c["mode"]]
        noisy = latents + noise
        if autocast is not None:
            with autocast:
                pred = net(unet, noisy.half(), timesteps, text.half(), c["ids"], c["masks"], control.half())
        else:
            pred = net(unet, noisy, timesteps, text, c["ids"], c["masks"], control)
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def run(c, k):
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        out = []
        for _ in range(k):
            t0, c0 = timer.now(), time.process_time()
            step(c)
            out.append(time.process_time() - c0 if clock == "cpu" else timer.now() - t0)
        if args.device == "cuda":
            c["peak_mib"] = max(c.get("peak_mib", 0.0), torch.cuda.max_memory_allocated() / 2 ** 20)
        return out

    print(f"# bench_train_step: {size} ({ch} ch, {spec['heads']} heads, {px}×{px} px, batch {b}), {args.device}, "
          f"{len(configs)} configs × {args.repeats} rounds × {args.steps} steps", flush=True)
    t_start = time.perf_counter()
    for c in configs:
        run(c, 1)
        if args.device == "cpu":
            c["peak_mib"] = C.peak_rss_mib()
        c["steps"], c["rounds"] = [], []
    C.alternate_rounds(configs, args.repeats, lambda c: run(c, args.steps), t_start)
    total_s = time.perf_counter() - t_start

    base = configs[0]
    base_med = statistics.median(base["steps"])
    results, rows = [], []
    for c in configs:
        s = C.summarize([t * 1000 for t in c["steps"]])
        ratio = statistics.median(c["steps"]) / base_med
        paired = statistics.median(a / b_ for a, b_ in zip(c["rounds"], base["rounds"]))
        results.append({"config": c["name"], "n": c["n"], "mode": c["mode"], "stats_ms": s, "ratio": ratio,
                        "paired_ratio": paired, "peak_mib": c.get("peak_mib")})
        rows.append([c["name"], f"{s['median']:.1f}", f"{s['p25']:.1f}–{s['p75']:.1f}", f"{s['min']:.1f}",
                     f"{s['max']:.1f}", s["n"], f"{ratio:.3f}", f"{paired:.3f}",
                     f"{c['peak_mib']:.0f}" if c.get("peak_mib") else "-"])
    env = C.environment(args.device)
    env.update(clock=clock, size=size, channels=ch, heads=spec["heads"], pixels=px, batch=b, wall_s=round(total_s, 1))
    verdicts = []
    for r in results:
        if r["config"].startswith("additive"):
            unmasked = next(x for x in results if x["config"] == f"tokens N={r['n']}")
            vs = statistics.median(next(c for c in configs if c["name"] == r["config"])["steps"]) / statistics.median(
                next(c for c in configs if c["name"] == unmasked["config"])["steps"])
            verdicts.append({"n": r["n"], "masked_vs_unmasked": vs, "vs_text": r["ratio"], "limit": TARGET,
                             "met": vs <= TARGET})
    mem = "peak alloc MiB" if args.device == "cuda" else "peak RSS MiB (process, coarse)"
    md = [f"## Training step, {args.device} ({env.get('gpu', env['cpu'])}), {size}", "",
          f"{env['date']} · torch {env['torch']} · ControlNet + projector trained, UNet frozen · {ch} ch, "
          f"{spec['heads']} heads, {px}×{px} px, batch {b}, 50 tokens per identity · "
          f"{'bf16 autocast' if autocast else 'fp32'} · {env['torch_threads']} threads · clock: {clock} · {args.repeats} rounds × "
          f"{args.steps} steps · run {total_s:.0f}s", "",
          C.markdown_table(["config", "median ms/step", "IQR ms", "min", "max", "steps", "ratio", "paired ratio",
                            mem], rows), ""]
    for v in verdicts:
        md.append(f"- target masked (additive) ≤ {v['limit']:.2f}× unmasked (tokens, full masks) at N={v['n']}: "
                  f"measured {v['masked_vs_unmasked']:.3f}× → **{'met' if v['met'] else 'NOT met'}**; vs the "
                  f"text-only ControlNet step {v['vs_text']:.3f}×")
    C.write_outputs(args.out, "train_step", "\n".join(md), {"environment": env, "results": results,
                                                            "targets": verdicts})
    return 0 if args.report_only or all(v["met"] for v in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
