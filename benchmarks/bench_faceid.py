"""Public-weights (IP-Adapter-FaceID) mode: sampling-step cost of N people in one op vs N chained patches.

Every configuration is a real ComfyUI sampling run (``comfy.sample.sample``, euler, CFG → cond + uncond in one batch
of 2) of a random UNet built with ComfyUI's own model classes, ``--base sd15`` (``supported_models.SD15``, the
default) or ``--base sdxl`` (``supported_models.SDXL``: ADM ``y`` of 2816 from the pooled text and the image size,
2048-d context, cross-attention at input 4, 5, 7, 8, the middle and output 0..5 with several transformers per
block). The ControlNet of this mode is a stock one, identical in every configuration, so it is left out.

* ``text``        — the unpatched model;
* ``one-op N=n``  — the pack's FaceID rule (:class:`nodes.faceid_patch.FaceIDRule`): all n people in one batched
  op per block (``identity_term``), added through the attn2 hook's ``.add`` protocol;
* ``chained N=n`` — n single-person FaceID rules added one after another to every block, each with its own
  attention and mask — the way users chain one IP-Adapter node per person.

Tokens: 4 per person (FaceID v1), as wide as the model's text (768 / 2048). The ``to_k_ip``/``to_v_ip`` weights
are random at the live model's widths for every attn2 processor of the topology read from the model
(``nodes.patch.live_topology``; the reduced models keep their base's block layout — SD1.5's 16 cross-attentions,
SDXL's input/middle/output blocks with 2 and ``--depth`` transformers — at smaller widths, so the published files
do not fit them; the rule's math is the same). The FaceID LoRA is merged into the weights and costs nothing per
step. Before timing, one untimed step of every configuration with counting rules records at which cross-attention
transformers the rule really ran (``coverage`` in the JSON), next to the model's own count of them.

A step is the time between two consecutive sampler callbacks (first step dropped) — this process's CPU time on CPU
with one thread (immune to other processes on a shared machine), else wall clock; rounds alternate the order of
configurations (benchmarks/_common.py); ratios are median(config) / median(text) from the same process.

    python benchmarks/bench_faceid.py --device cpu --out benchmarks/out/faceid_cpu
    python benchmarks/bench_faceid.py --device cpu --base sdxl --out benchmarks/out/faceid_sdxl_cpu
    python benchmarks/bench_faceid.py --device cuda --base sdxl --size full --out benchmarks/out/faceid_sdxl_gpu
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

# sd15: "heads" = heads per block (SD1.5: 8); sdxl: "head_dim" = channels per head (SDXL: 64), "depth" =
# transformers per level-2 / middle block (SDXL: 10; level-1 blocks keep 2). sdxl full = ComfyUI's SDXL base UNet.
SIZES = {
    "sd15": {
        "full": {"channels": 320, "heads": 8, "latent": 64, "steps": 6, "repeats": 3},
        "reduced": {"channels": 64, "heads": 2, "latent": 32, "steps": 4, "repeats": 3},
    },
    "sdxl": {
        "full": {"channels": 320, "head_dim": 64, "depth": 10, "latent": 128, "steps": 6, "repeats": 3},
        "reduced": {"channels": 64, "head_dim": 64, "depth": 4, "latent": 32, "steps": 5, "repeats": 8},
    },
}
MODEL_CLASS = {"sd15": "SD15", "sdxl": "SDXL"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--base", choices=list(SIZES), default="sd15",
                   help="model family: sd15 (SD1.5 topology) or sdxl (SDXL topology, ADM y, 2048-d text)")
    p.add_argument("--size", choices=["full", "reduced"], default=None,
                   help="default: full on cuda, reduced on cpu (sdxl full = the real SDXL base UNet, GPU only in "
                        "practice)")
    p.add_argument("--n", default="1,2,4,8", help="people counts, comma separated")
    p.add_argument("--tokens", type=int, default=4, help="tokens per person (FaceID 4, Portrait 16 per photo)")
    p.add_argument("--heads", type=int, default=None, help="sd15: heads per block")
    p.add_argument("--no-chained", action="store_true", help="skip the chained baseline")
    C.add_step_arguments(p, "faceid")
    args = p.parse_args(argv)
    C.check_steps(p, args)
    if args.base == "sd15" and (args.head_dim is not None or args.depth is not None):
        p.error("--head-dim and --depth are for --base sdxl only (SD1.5: --heads)")
    if args.base == "sdxl" and args.heads is not None:
        p.error("--heads is for --base sd15 only (SDXL: --head-dim, channels per head)")
    return args


def model_config(base: str, spec: dict) -> dict:
    if base == "sdxl":
        return C.sdxl_unet_config(spec["channels"], spec["head_dim"], spec["depth"])
    return C.unet_config(spec["channels"], spec["heads"])


def block_name(key) -> str:
    return f"{key[0]} {key[1]}"


def main(argv=None):
    args = parse_args(argv)
    size, spec, counts, nodes, mods, threads = C.bench_setup(args, SIZES[args.base])
    import torch
    import comfy.ldm.modules.attention as comfy_attention
    import comfy.sample
    from instantfamily_core.faceid import PUBLISHED, FaceIDWeights
    pack = mods["patch"].__name__.rsplit(".", 2)[0]
    fp = sys.modules[f"{pack}.nodes.faceid_patch"]
    patch = mods["patch"]
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    cfg = model_config(args.base, spec)
    model = C.build_unet(cfg, dtype, args.device, model_class=MODEL_CLASS[args.base])
    topology = patch.live_topology(model)  # read from the live modules, not from cfg
    sites = patch.attn2_modules(model.model.diffusion_model)  # the model's own cross-attentions
    context = topology.context_dim
    weights = FaceIDWeights("faceid", args.tokens, {}, C.kv_weights(topology), "bench", topology)
    lat, px = spec["latent"], spec["latent"] * 8
    sampling = model.get_model_object("model_sampling")
    sigma_range = (float(sampling.percent_to_sigma(0.0)), float(sampling.percent_to_sigma(1.0)))
    g = torch.Generator().manual_seed(11)

    class CountingRule(fp.FaceIDRule):
        """The FaceID rule, recording where it ran (for the untimed coverage step only)."""

        def __call__(self, out, q, k, v, extra_options, **kwargs):
            term = super().__call__(out, q, k, v, extra_options, **kwargs)
            block = extra_options["block"]
            key = (str(block[0]), int(block[1]), int(extra_options.get("block_index", 0)))
            self.seen[key] = self.seen.get(key, 0) + 1
            self.sane = self.sane and tuple(term.shape) == tuple(out.shape) and bool(torch.isfinite(term).all())
            self.max_abs = max(self.max_abs, float(term.detach().abs().max()))
            return term

    def rule(cls, tokens, masks):
        r = cls(weights, tokens, torch.zeros_like(tokens), masks, [1.0] * tokens.shape[0], None, sigma_range,
                topology)
        r.seen, r.sane, r.max_abs = {}, True, 0.0
        return r

    def build(kind, tokens, masks, cls):
        """``(model, rules)`` of one configuration."""
        m = model.clone()
        if kind == "one-op":
            rules = [rule(cls, tokens, masks)]
        else:
            rules = [rule(cls, tokens[i:i + 1], masks[i:i + 1]) for i in range(tokens.shape[0])]
        for r in rules:
            fp.install_faceid(m, r, sigma_range)
        return m, rules

    def hooked(m, r) -> set:
        """The transformers whose installed attn2 hook carries rule ``r``."""
        replace = m.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
        return {key for hook in replace.values() if isinstance(hook, patch.Attn2Hook) and r in hook.callback
                for key in hook.modules}

    configs = [{"name": "text", "n": 0, "kind": "text", "model": model}]
    for n in counts:
        tokens = torch.randn(n, args.tokens, context, generator=g)
        masks = C.face_masks(n, px, px)
        for kind in ("one-op",) + (() if args.no_chained else ("chained",)):
            m, _ = build(kind, tokens, masks, fp.FaceIDRule)
            configs.append({"name": f"{kind} N={n}", "n": n, "kind": kind, "model": m, "tokens": tokens,
                            "masks": masks})
    if args.base == "sdxl":
        pos = C.conditioning(1, dim=context, pooled_dim=C.SDXL_POOLED_DIM, size=(px, px))
        neg = C.conditioning(2, dim=context, pooled_dim=C.SDXL_POOLED_DIM, size=(px, px))
    else:
        pos, neg = C.conditioning(1, dim=context), C.conditioning(2, dim=context)
    latent = torch.zeros(1, 4, lat, lat)
    noise = torch.randn(1, 4, lat, lat, generator=torch.Generator().manual_seed(0))

    clock, clock_name = C.step_clock(args.device, threads)

    def sample(m, steps, callback=None):
        return comfy.sample.sample(m, noise, steps, 5.0, "euler", "normal", pos, neg, latent, callback=callback,
                                   disable_pbar=True, seed=0)

    all_sites = set(sites)
    model_info = {
        "base": args.base, "model_class": type(model.model).__name__, "topology": topology.describe(),
        "published": PUBLISHED.get(context) is topology, "context_dim": context,
        "adm_in_channels": cfg.get("adm_in_channels"),
        "cross_attention_transformers": len(sites),
        "cross_attention_blocks": {block_name(b): sum(1 for s in sites if s[:2] == b)
                                   for b in dict.fromkeys(s[:2] for s in sites)},
        "topology_transformers": len(topology.slots), "topology_blocks": len(topology.blocks),
        "heads": {block_name(b): h for b, (_, _, h) in topology.blocks.items()},
        "widths": topology.widths(), "unet_config": cfg}

    # coverage: one untimed step of every configuration, counting rules, same tokens/masks/model; the one-op and
    # the chained N-person terms are the same sum, so their outputs must agree (and differ from text-only)
    text_out = sample(model, 1)
    one_op_out = {}
    for c in configs[1:]:
        m, rules = build(c["kind"], c["tokens"], c["masks"], CountingRule)
        out = sample(m, 1)
        if c["kind"] == "one-op":
            one_op_out[c["n"]] = out
        ran = [set(r.seen) for r in rules]
        c["coverage"] = {
            "rules": len(rules),
            "hooked_transformers": min(len(hooked(m, r) & all_sites) for r in rules),
            "ran_transformers": min(len(s & all_sites) for s in ran),
            "ran_outside_model": sorted(block_name(k) + f"/{k[2]}" for s in ran for k in s - all_sites),
            "ran_blocks": sorted({block_name(k) for s in ran for k in s}),
            "calls_per_transformer": sorted({v for r in rules for v in r.seen.values()}),
            "sane": all(r.sane for r in rules),
            "max_abs_term": max(r.max_abs for r in rules),
            "changed_vs_text": float((out - text_out).abs().max())}
        if c["kind"] == "chained" and c["n"] in one_op_out:
            c["coverage"]["diff_vs_one_op"] = float((out - one_op_out[c["n"]]).abs().max())
        del m, rules, out

    total = C.time_configs(configs, args, spec, lambda c, steps, cb: sample(c["model"], steps, cb), clock,
                           f"bench_faceid: {args.base} {size} ({spec['channels']} ch, {topology.describe()}, "
                           f"{px}×{px} px)", threads)
    results = []
    for c in configs:
        r = C.step_result(c, configs[0])
        if "coverage" in c:
            r["coverage"] = c["coverage"]
        results.append(r)
    rows = [[r["config"], f"{r['median_ms']:.1f}", f"{r['p25_ms']:.1f}–{r['p75_ms']:.1f}", f"{r['ratio']:.3f}",
             f"{r['paired_ratio']:.3f}", r["coverage"]["ran_transformers"] if "coverage" in r else "-",
             f"{r['peak_mib']:.0f}" if r["peak_mib"] else "-"] for r in results]
    table = C.markdown_table(["config", "median ms/step", "IQR ms", "× text", "paired ×", "patched attn2",
                              "peak alloc MiB"], rows)
    text_ms = results[0]["median_ms"]
    pivot = []
    for n in counts:
        one = next(r for r in results if r["n"] == n and r["kind"] == "one-op")
        ch = next((r for r in results if r["n"] == n and r["kind"] == "chained"), None)
        pivot.append([str(n), f"{one['ratio']:.3f}", f"{ch['ratio']:.3f}" if ch else "-",
                      f"{ch['median_ms'] / one['median_ms']:.2f}" if ch else "-",
                      f"{one['median_ms'] - text_ms:+.1f}", f"{ch['median_ms'] - text_ms:+.1f}" if ch else "-"])
    env = C.environment(args.device)
    env.update(attention_backend=comfy_attention.optimized_attention.__name__, base=args.base, size=size,
               tokens=args.tokens, model_channels=spec["channels"], heads=spec.get("heads"),
               head_dim=spec.get("head_dim"), depth=spec.get("depth"), latent=lat, steps=spec["steps"],
               repeats=spec["repeats"], wall_s=round(total, 1), clock=clock_name, compile=args.compile or "no")
    shape = (f"{spec['heads']} heads" if args.base == "sd15" else
             f"heads of {cfg['num_head_channels']} ch, depth 2/{spec['depth']}, ADM y {cfg['adm_in_channels']}")
    md = "\n".join([
        f"## FaceID mode step time, {args.base}, {args.device} ({env.get('gpu', env['cpu'])}), {size}", "",
        f"{env['date']} · torch {env['torch']} · {model_info['model_class']} UNet {spec['channels']} ch, {shape}: "
        f"{topology.describe()} · {px}×{px} px (latent {lat}×{lat}), CFG batch 2, {args.tokens} tokens per person "
        f"· attention `{env['attention_backend']}` · compile {env['compile']} · {env['torch_threads']} threads · "
        f"{clock_name} clock · "
        f"{spec['repeats']} rounds × {spec['steps'] - 1} steps · run {total:.0f}s", "", table, "",
        "Ratio to text-only, chained / one-op, and the step time each adds to text-only:", "",
        C.markdown_table(["N", "one-op ×", "chained ×", "chained / one-op", "one-op +ms", "chained +ms"], pivot),
        ""])
    bad = [r["config"] for r in results if not (math.isfinite(r["ratio"]) and r["ratio"] > 0)]
    C.write_outputs(args.out, "faceid", md, {"environment": env, "model": model_info, "results": results})
    if bad:
        print(f"non-finite or non-positive ratios: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
