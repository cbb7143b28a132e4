"""InstantID mode: sampling-step cost of N people in one pass vs the N-conditioning recipe.

Every configuration is a real ComfyUI sampling run (``comfy.sample.sample``, euler, CFG 5) of a random SDXL-topology
UNet (``supported_models.SDXL``: ADM ``y``, 2048-d context, cross-attention at input 4, 5, 7, 8, the middle and
output 0..5; reduced widths and depth on CPU) with a random IdentityNet of the same encoder (ComfyUI's cldm
ControlNet, wrapped as ControlNetLoader returns it), both built with ComfyUI's own classes:

* ``text``       — the unpatched model; the same ControlNet reading the text (1 UNet + 1 ControlNet per call);
* ``one-pass N=n`` — *Apply InstantFamily InstantID* with n identities: the masked UNet term on every
  cross-attention, **one** masked IdentityNet whose context is the n people's 16-token groups, each visible only in
  its region; cond and uncond carry the same control, so ComfyUI evaluates them in one batch;
* ``n-cond N=n`` — the recipe users build today: per person, Apply InstantID with that one identity (its UNet term
  masked to its face, as the popular pack's ``attn_mask``) on the model of the previous person, and the person's
  positive and negative restricted to their face with the stock ConditioningSetMask, then combined: every
  conditioning has its own IdentityNet, so ComfyUI evaluates n UNet + n IdentityNet per CFG half and step.

The adapter is random at the live model's widths (the topology read from the model); the Resampler is InstantID's
at its published size with random weights. Before timing, one untimed step of each configuration counts the UNet
and IdentityNet forward calls and the rows they process (``evaluations`` in the JSON).

A step is the time between two consecutive sampler callbacks (first step dropped) — this process's CPU time on CPU
with one thread, else wall clock; rounds alternate the order of configurations; ratios are medians from one process.

    python benchmarks/bench_instantid.py --device cpu --out benchmarks/out/instantid_cpu
    python benchmarks/bench_instantid.py --device cuda --size full --out benchmarks/out/instantid_gpu
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

SIZES = {  # "head_dim" = channels per head (SDXL 64), "depth" = transformers per level-2 / middle block (SDXL 10)
    "full": {"channels": 320, "head_dim": 64, "depth": 10, "latent": 128, "steps": 4, "repeats": 3},
    "reduced": {"channels": 64, "head_dim": 64, "depth": 2, "latent": 32, "steps": 4, "repeats": 5},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--size", choices=list(SIZES), default=None,
                   help="default: full on cuda, reduced on cpu (full = SDXL's UNet and IdentityNet)")
    p.add_argument("--n", default="2,4", help="people counts, comma separated")
    C.add_step_arguments(p, "instantid")
    args = p.parse_args(argv)
    C.check_steps(p, args)
    return args


def build_controlnet(cfg: dict, dtype, device: str, seed: int = 1):
    """A random ControlNet of the UNet config's encoder (ComfyUI's cldm ``ControlNet``, 3-channel hint), wrapped
    as ``comfy.controlnet.ControlNet`` like ControlNetLoader's output."""
    import torch
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.ops
    net = comfy.cldm.cldm.ControlNet(**{k: v for k, v in cfg.items() if k not in ("out_channels",
                                                                                   "transformer_depth_output")},
                                     hint_channels=3, dtype=dtype, device=torch.device(device),
                                     operations=comfy.ops.disable_weight_init)
    C.randomise(net, seed)
    return comfy.controlnet.ControlNet(net, load_device=torch.device(device), manual_cast_dtype=None)


def random_adapter(topology, seed: int = 3):
    """An InstantID adapter for ``topology``: the published Resampler shapes, ``to_k_ip``/``to_v_ip`` at the live
    widths, random values (norm scales 1), validated by the pack's reader."""
    import torch
    from instantfamily_core.instantid import validate
    from instantfamily_core.instantid.files import expected_image_proj
    g = torch.Generator().manual_seed(seed)
    image_proj = {k: torch.ones(s) if "norm" in k and k.endswith("weight") else torch.randn(s, generator=g) * 0.02
                  for k, s in expected_image_proj(topology.context_dim).items()}
    return validate(image_proj, C.kv_weights(topology, seed), "bench ip-adapter.bin", topology=topology)


class Counter:
    """Forward calls and rows (batch entries) of one module, through a forward pre-hook."""

    def __init__(self, module):
        self.calls = self.rows = 0
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.calls += 1
        self.rows += int(args[0].shape[0])

    def take(self) -> tuple[int, int]:
        out = (self.calls, self.rows)
        self.calls = self.rows = 0
        return out


def main(argv=None):
    args = parse_args(argv)
    size, spec, counts, nodes, mods, threads = C.bench_setup(args, SIZES)
    import torch
    import comfy.ldm.modules.attention as comfy_attention
    import comfy.sample
    pack = mods["patch"].__name__.rsplit(".", 2)[0]
    iid = sys.modules[f"{pack}.nodes.instantid_nodes"]
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    cfg = C.sdxl_unet_config(spec["channels"], spec["head_dim"], spec["depth"])
    model = C.build_unet(cfg, dtype, args.device, model_class="SDXL")
    control = build_controlnet(cfg, dtype, args.device)
    topology = mods["patch"].live_topology(model)
    instantid = iid.InstantIDModel(random_adapter(topology))
    lat, px = spec["latent"], spec["latent"] * 8
    pos = C.conditioning(1, dim=topology.context_dim, pooled_dim=C.SDXL_POOLED_DIM, size=(px, px))
    neg = C.conditioning(2, dim=topology.context_dim, pooled_dim=C.SDXL_POOLED_DIM, size=(px, px))
    kps = torch.rand(1, px, px, 3, generator=torch.Generator().manual_seed(5))
    apply = iid.ApplyInstantID().apply
    set_mask = nodes.ConditioningSetMask().append
    settings = dict(ip_weight=0.8, cn_strength=0.8, identity_weights="", start_at=0.0, end_at=1.0, noise=0.0)

    def people(n):
        g = torch.Generator().manual_seed(100 + n)
        return [dataclasses.replace(i, extra={**i.extra, "raw_embeddings": [torch.randn(512, generator=g) * 20]})
                for i in C.identities(n, n, face_pack="antelopev2")]

    def text_config():
        return model, nodes.ControlNetApplyAdvanced().apply_controlnet(pos, neg, control, kps, 0.8, 0.0, 1.0)

    def one_pass(ids, masks):
        m, p, q = apply(model, instantid, control, ids, masks, kps, pos, neg, **settings)
        return m, (p, q)

    def n_cond(ids, masks):
        m, all_pos, all_neg = model, [], []
        for i, ident in enumerate(ids):
            m, p, q = apply(m, instantid, control, [ident], masks[i:i + 1], kps, pos, neg, **settings)
            all_pos += set_mask(p, masks[i:i + 1], "default", 1.0)[0]
            all_neg += set_mask(q, masks[i:i + 1], "default", 1.0)[0]
        return m, (all_pos, all_neg)

    configs = [{"name": "text", "n": 0, "kind": "text", "build": text_config}]
    for n in counts:
        ids, masks = people(n), C.face_masks(n, px, px)
        for kind, fn in (("one-pass", one_pass), ("n-cond", n_cond)):
            configs.append({"name": f"{kind} N={n}", "n": n, "kind": kind,
                            "build": (lambda fn=fn, ids=ids, masks=masks: fn(ids, masks))})
    for c in configs:
        c["model"], (c["pos"], c["neg"]) = c["build"]()

    latent = torch.zeros(1, 4, lat, lat)
    noise = torch.randn(1, 4, lat, lat, generator=torch.Generator().manual_seed(0))
    clock, clock_name = C.step_clock(args.device, threads)

    def sample(c, steps, callback=None):
        return comfy.sample.sample(c["model"], noise, steps, 5.0, "euler", "normal", c["pos"], c["neg"], latent,
                                   callback=callback, disable_pbar=True, seed=0)

    # evaluations: one untimed step per configuration, counting UNet and ControlNet forwards (rows: the batch of
    # x / of the timestep embedding; the masked view shares the ControlNet's modules, so its time_embed counts the
    # IdentityNet runs of every configuration)
    unet_count = Counter(model.model.diffusion_model)
    cn_count = Counter(control.control_model.time_embed)
    text_out = None
    for c in configs:
        out = sample(c, 1)
        (uc, ur), (cc, cr) = unet_count.take(), cn_count.take()
        text_out = out if text_out is None else text_out
        c["evaluations"] = {"unet_calls": uc, "unet_rows": ur, "controlnet_calls": cc, "controlnet_rows": cr,
                            "finite": bool(torch.isfinite(out).all()),
                            "changed_vs_text": float((out - text_out).abs().max())}
    unet_count.handle.remove()
    cn_count.handle.remove()

    total = C.time_configs(configs, args, spec, sample, clock,
                           f"bench_instantid: sdxl {size} ({spec['channels']} ch, {topology.describe()}, "
                           f"{px}×{px} px)", threads)
    results = [dict(C.step_result(c, configs[0]), evaluations=c["evaluations"]) for c in configs]
    rows = [[r["config"], f"{r['median_ms']:.1f}", f"{r['p25_ms']:.1f}–{r['p75_ms']:.1f}", f"{r['ratio']:.2f}",
             f"{r['paired_ratio']:.2f}", f"{r['evaluations']['unet_calls']} ({r['evaluations']['unet_rows']} rows)",
             f"{r['evaluations']['controlnet_calls']} ({r['evaluations']['controlnet_rows']} rows)",
             f"{r['peak_mib']:.0f}" if r["peak_mib"] else "-"] for r in results]
    pivot = []
    for n in counts:
        one = next(r for r in results if r["n"] == n and r["kind"] == "one-pass")
        rec = next(r for r in results if r["n"] == n and r["kind"] == "n-cond")
        pivot.append([str(n), f"{one['ratio']:.2f}", f"{rec['ratio']:.2f}",
                      f"{rec['median_ms'] / one['median_ms']:.2f}"])
    env = C.environment(args.device)
    env.update(attention_backend=comfy_attention.optimized_attention.__name__, size=size,
               model_channels=spec["channels"], head_dim=spec["head_dim"], depth=spec["depth"], latent=lat,
               steps=spec["steps"], repeats=spec["repeats"], wall_s=round(total, 1), clock=clock_name,
               compile=args.compile or "no")
    md = "\n".join([
        f"## InstantID mode step time, sdxl, {args.device} ({env.get('gpu', env['cpu'])}), {size}", "",
        f"{env['date']} · torch {env['torch']} · SDXL UNet + IdentityNet {spec['channels']} ch, heads of "
        f"{cfg['num_head_channels']} ch, depth 2/{spec['depth']}: {topology.describe()} · {px}×{px} px (latent "
        f"{lat}×{lat}), CFG 5 · attention `{env['attention_backend']}` · compile {env['compile']} · "
        f"{env['torch_threads']} threads · "
        f"{clock_name} clock · {spec['repeats']} rounds × {spec['steps'] - 1} steps · run {total:.0f}s", "",
        C.markdown_table(["config", "median ms/step", "IQR ms", "× text", "paired ×", "UNet calls/step",
                          "IdentityNet calls/step", "peak alloc MiB"], rows), "",
        "Ratio to text-only, and how many times slower the N-conditioning recipe is than one pass:", "",
        C.markdown_table(["N", "one-pass ×", "n-cond ×", "n-cond / one-pass"], pivot), ""])
    C.write_outputs(args.out, "instantid", md, {"environment": env, "topology": topology.describe(),
                                                "unet_config": cfg, "results": results})
    bad = [r["config"] for r in results if not (math.isfinite(r["ratio"]) and r["ratio"] > 0
                                                and r["evaluations"]["finite"])]
    if bad:
        print(f"non-finite results or ratios: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
