"""Public-weights (IP-Adapter-FaceID) mode: sampling-step cost of N people in one op vs N chained patches.

Every configuration is a real ComfyUI sampling run (``comfy.sample.sample``, euler, CFG → cond + uncond in one batch
of 2) of a random SD1.5-topology UNet (the ControlNet of this mode is a stock one, identical in every configuration,
so it is left out):

* ``text``        — the unpatched model;
* ``one-op N=n``  — the pack's FaceID rule (:class:`nodes.faceid_patch.FaceIDRule`): all n people in one batched
  op per block (``identity_term``), added through the attn2 hook's ``.add`` protocol;
* ``chained N=n`` — n single-person FaceID rules added one after another to every block, each with its own
  attention and mask — the way users chain one IP-Adapter node per person.

Tokens: 4 per person (FaceID v1); the ``to_k_ip``/``to_v_ip`` weights are random at the model's widths (the
reduced topology keeps SD1.5's 16 cross-attentions and head dims, so the published 320/640/1280 files do not fit
it; the rule's math is the same). The FaceID LoRA is merged into the weights and costs nothing per step.
A step is the time between two consecutive sampler callbacks (first step dropped) — this process's CPU time on CPU
with one thread (immune to other processes on a shared machine), else wall clock; rounds alternate the order of
configurations (benchmarks/_common.py); ratios are median(config) / median(text) from the same process.

    python benchmarks/bench_faceid.py --device cpu --out benchmarks/out/faceid_cpu
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
    "full": {"channels": 320, "heads": 8, "latent": 64, "steps": 6, "repeats": 3},
    "reduced": {"channels": 64, "heads": 2, "latent": 32, "steps": 4, "repeats": 3},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--size", choices=list(SIZES), default=None, help="default: full on cuda, reduced on cpu")
    p.add_argument("--n", default="1,2,4,8", help="people counts, comma separated")
    p.add_argument("--tokens", type=int, default=4, help="tokens per person (FaceID 4, Portrait 16 per photo)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--latent", type=int, default=None)
    p.add_argument("--channels", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1 on cpu)")
    p.add_argument("--no-chained", action="store_true", help="skip the chained baseline")
    p.add_argument("--report-only", action="store_true", help="accepted for the smoke runs (no targets here)")
    p.add_argument("--out", default=None, help="folder for faceid.md + faceid.json")
    args = p.parse_args(argv)
    if args.steps is not None and args.steps < 2:
        p.error("--steps must be at least 2 (the first step of each run is not timed)")
    return args


def kv_weights(cfg: dict, seed: int = 7) -> dict:
    """Random ``{p: (to_k_ip, to_v_ip)}`` at the model's widths for every attn2 processor p."""
    import torch
    from instantfamily_core.faceid import SD15_TRANSFORMERS
    g = torch.Generator().manual_seed(seed)
    scale = cfg["model_channels"] / 320
    out = {}
    for s in SD15_TRANSFORMERS:
        hidden = int(round(s.hidden * scale))
        out[f"{s.attn2}.to_k_ip.weight"] = torch.randn(hidden, 768, generator=g) * 0.05
        out[f"{s.attn2}.to_v_ip.weight"] = torch.randn(hidden, 768, generator=g) * 0.05
    return out


def main(argv=None):
    args = parse_args(argv)
    size, spec = C.model_spec(args, SIZES)
    counts = [int(x) for x in args.n.split(",") if x.strip()]
    nodes, mods = C.load_host(args.device)
    import torch
    import comfy.ldm.modules.attention as comfy_attention
    import comfy.sample
    from instantfamily_core.faceid import FaceIDWeights
    pack = mods["patch"].__name__.rsplit(".", 2)[0]
    fp = sys.modules[f"{pack}.nodes.faceid_patch"]
    threads = args.threads if args.threads is not None else (1 if args.device == "cpu" else 0)
    if threads:
        torch.set_num_threads(threads)
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    cfg = C.unet_config(spec["channels"], spec["heads"])
    model = C.build_unet(cfg, dtype, args.device)
    weights = FaceIDWeights("faceid", args.tokens, {}, kv_weights(cfg), "bench")
    lat, px = spec["latent"], spec["latent"] * 8
    sampling = model.get_model_object("model_sampling")
    sigma_range = (float(sampling.percent_to_sigma(0.0)), float(sampling.percent_to_sigma(1.0)))
    g = torch.Generator().manual_seed(11)

    def rule(tokens, masks):
        return fp.FaceIDRule(weights, tokens, torch.zeros_like(tokens), masks, [1.0] * tokens.shape[0], None,
                             sigma_range)

    configs = [{"name": "text", "n": 0, "kind": "text", "model": model}]
    for n in counts:
        tokens = torch.randn(n, args.tokens, 768, generator=g)
        masks = C.face_masks(n, px, px)
        configs.append({"name": f"one-op N={n}", "n": n, "kind": "one-op",
                        "model": fp.install_faceid(model.clone(), rule(tokens, masks), sigma_range)})
        if not args.no_chained:
            chained = model.clone()
            for i in range(n):
                fp.install_faceid(chained, rule(tokens[i:i + 1], masks[i:i + 1]), sigma_range)
            configs.append({"name": f"chained N={n}", "n": n, "kind": "chained", "model": chained})
    pos, neg = C.conditioning(1), C.conditioning(2)
    latent = torch.zeros(1, 4, lat, lat)
    noise = torch.randn(1, 4, lat, lat, generator=torch.Generator().manual_seed(0))

    # on CPU with one thread, this process's CPU time: other processes on a shared machine do not inflate it
    clock = time.process_time if args.device == "cpu" and threads == 1 else time.perf_counter
    clock_name = "cpu" if clock is time.process_time else "wall"

    def run(c):
        stamps = []
        comfy.sample.sample(c["model"], noise, spec["steps"], 5.0, "euler", "normal", pos, neg, latent,
                            callback=lambda *a: stamps.append(clock()), disable_pbar=True, seed=0)
        return [b - a for a, b in zip(stamps, stamps[1:])]

    print(f"# bench_faceid: {size} ({spec['channels']} ch, {px}×{px} px), {args.device}, {threads or 'default'} "
          f"threads, {len(configs)} configs × {spec['repeats']} rounds × {spec['steps'] - 1} timed steps", flush=True)
    t0 = time.perf_counter()
    for c in configs:
        run(c)
        c["steps"], c["rounds"] = [], []
    C.alternate_rounds(configs, spec["repeats"], run, t0)
    total = time.perf_counter() - t0
    base = statistics.median(configs[0]["steps"])
    results = []
    for c in configs:
        s = C.summarize([t * 1000 for t in c["steps"]])
        results.append({"config": c["name"], "n": c["n"], "kind": c["kind"], "median_ms": s["median"],
                        "p25_ms": s["p25"], "p75_ms": s["p75"], "ratio": statistics.median(c["steps"]) / base,
                        "paired_ratio": statistics.median(a / b for a, b in zip(c["rounds"], configs[0]["rounds"]))})
    rows = [[r["config"], f"{r['median_ms']:.1f}", f"{r['p25_ms']:.1f}–{r['p75_ms']:.1f}", f"{r['ratio']:.3f}",
             f"{r['paired_ratio']:.3f}"] for r in results]
    table = C.markdown_table(["config", "median ms/step", "IQR ms", "× text", "paired ×"], rows)
    pivot = []
    for n in counts:
        one = next(r for r in results if r["n"] == n and r["kind"] == "one-op")
        ch = next((r for r in results if r["n"] == n and r["kind"] == "chained"), None)
        pivot.append([str(n), f"{one['ratio']:.3f}", f"{ch['ratio']:.3f}" if ch else "-",
                      f"{ch['median_ms'] / one['median_ms']:.2f}" if ch else "-"])
    env = C.environment(args.device)
    env.update(attention_backend=comfy_attention.optimized_attention.__name__, size=size, tokens=args.tokens,
               model_channels=spec["channels"], heads=spec["heads"], latent=lat, wall_s=round(total, 1),
               clock=clock_name)
    md = "\n".join([
        f"## FaceID mode step time, {args.device} ({env.get('gpu', env['cpu'])}), {size}", "",
        f"{env['date']} · torch {env['torch']} · UNet {spec['channels']} ch, {spec['heads']} heads, {px}×{px} px "
        f"(latent {lat}×{lat}), CFG batch 2, {args.tokens} tokens per person · attention `{env['attention_backend']}` "
        f"· {env['torch_threads']} threads · {clock_name} clock · {spec['repeats']} rounds × {spec['steps'] - 1} steps · run "
        f"{total:.0f}s", "", table, "", "Ratio to text-only, and chained / one-op:", "",
        C.markdown_table(["N", "one-op ×", "chained ×", "chained / one-op"], pivot), ""])
    C.write_outputs(args.out, "faceid", md, {"environment": env, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
