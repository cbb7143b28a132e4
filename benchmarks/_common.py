"""Shared helpers of the benchmark scripts: the ComfyUI host, random SD1.5- and SDXL-shaped models, statistics,
tables.

The host is found and imported with the development helpers (``tools/devkit/comfy_host.py``: ``COMFYUI_PATH``, this pack
inside ``ComfyUI/custom_nodes``, or ``~/comfy/ComfyUI``) and the pack is loaded through ComfyUI's own custom-node
loader, so every benchmark runs the pack's real node code.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import runpy
import statistics
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
runpy.run_path(str(REPO / "training" / "_bootstrap.py"))  # the one import bootstrap: the repository root first

from instantfamily_core.fileio import write_text_atomic  # noqa: E402
from tools.devkit.comfy_host import HOW_TO_PROVIDE, find_comfyui, import_host, load_pack  # noqa: E402
from tools.devkit.identities import random_identities as identities  # noqa: E402,F401

# ---------------------------------------------------------------------------------------------------------------
# host

_HOST: dict = {}


def load_host(device: str = "cpu", extra_args: Sequence[str] = ()):
    """Import ComfyUI in this process (``--cpu`` for ``device == "cpu"``) and load this pack through ComfyUI's
    custom-node loader (``tools.devkit.comfy_host``); return ``(nodes, mods)``, ``mods`` the pack's node modules."""
    if _HOST:
        return _HOST["nodes"], _HOST["mods"]
    if find_comfyui() is None:
        sys.exit(HOW_TO_PROVIDE)
    import logging
    nodes = import_host(tuple(extra_args), cpu=device == "cpu")
    name = load_pack().__name__
    logging.getLogger().setLevel(logging.WARNING)  # ComfyUI logs every model load at INFO
    mods = {m: sys.modules[f"{name}.nodes.{m}"] for m in ("patch", "controlnet", "model_nodes")}
    _HOST.update(nodes=nodes, mods=mods)
    return nodes, mods


# ---------------------------------------------------------------------------------------------------------------
# SD1.5- and SDXL-shaped random models built with ComfyUI's own classes

SD15_FULL = {"use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4,
             "use_spatial_transformer": True, "legacy": False, "adm_in_channels": None,
             "model_channels": 320, "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
             "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
             "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
             "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768,
             "use_temporal_attention": False, "use_temporal_resblock": False}
"""SD1.5's UNet config as ComfyUI detects it (``SD15`` adds ``num_heads = 8``, ``num_head_channels = -1``)."""


def unet_config(model_channels: int = 320, num_heads: int = 8) -> dict:
    """SD1.5's topology (4 levels, 2 res blocks, 16 cross-attentions, context 768) at a given width and head count
    (SD1.5: 320 channels, 8 heads → head dims 40/80/160; a narrower model keeps realistic head dims with fewer
    heads, e.g. 64 channels and 2 heads → 32/64/128)."""
    cfg = dict(SD15_FULL)
    cfg["model_channels"] = int(model_channels)
    cfg["num_heads"] = int(num_heads)
    cfg["num_head_channels"] = -1
    return cfg


SDXL_FULL = {"use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
             "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "out_channels": 4,
             "model_channels": 320, "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4],
             "transformer_depth": [0, 0, 2, 2, 10, 10], "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
             "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048,
             "use_temporal_resblock": False, "use_temporal_attention": False, "num_heads": -1,
             "num_head_channels": 64}
"""SDXL base's UNet config as ComfyUI detects it (``model_config_from_unet(...).unet_config`` of sd_xl_base_1.0,
``SDXL``'s ``num_heads = -1``, ``num_head_channels = 64`` included): 70 cross-attentions at 640/1280, 2048-d text,
ADM ``y`` of 2816 (pooled 1280 + 6 size embeddings of 256)."""

SDXL_POOLED_DIM = 1280
"""Width of SDXL's pooled text (CLIP-G) in ``y``; the rest of the 2816 are the six size/crop embeddings."""


def sdxl_unet_config(model_channels: int = 320, head_channels: int = 64, depth: int = 10) -> dict:
    """SDXL's topology (3 levels, 2 res blocks, cross-attention at input 4, 5, 7, 8, the middle and output 0..5,
    linear projections, context 2048, ADM 2816) at a given width and depth: level-1 blocks keep SDXL's 2
    transformers, level-2 blocks and the middle get ``depth`` (SDXL: 10); heads of ``head_channels`` (SDXL: 64),
    narrowed to the level-1 width when the model is narrower than that. The defaults are :data:`SDXL_FULL`."""
    cfg = dict(SDXL_FULL)
    depth = int(depth)
    cfg["model_channels"] = int(model_channels)
    cfg["transformer_depth"] = [0, 0, 2, 2, depth, depth]
    cfg["transformer_depth_output"] = [0, 0, 0, 2, 2, 2, depth, depth, depth]
    cfg["transformer_depth_middle"] = depth
    cfg["num_heads"] = -1
    cfg["num_head_channels"] = min(int(head_channels), 2 * int(model_channels))
    return cfg


def randomise(module, seed: int, std: float = 0.02):
    """ComfyUI layers allocate with ``torch.empty``: fill them in place on their device (seeded normal for weights
    and biases, 1 for norm weights)."""
    import torch
    with torch.no_grad():
        for i, (name, p) in enumerate(module.named_parameters()):
            if p.ndim <= 1 and "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                g = torch.Generator(device=p.device).manual_seed(seed * 100003 + i)
                p.normal_(0.0, std, generator=g)
    return module


def build_unet(cfg: dict, dtype, device: str, seed: int = 0, model_class: str = "SD15"):
    """A ``ModelPatcher`` around a random UNet of ComfyUI's ``comfy.supported_models.<model_class>``: SD1.5
    architecture by default, ``"SDXL"`` for an :func:`sdxl_unet_config` (ComfyUI's ``model_base.SDXL``: ADM ``y``
    from the pooled text and the image size)."""
    import torch
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    mc = getattr(comfy.supported_models, model_class)(dict(cfg))
    if model_class == "SD15":
        mc.unet_config.update(num_heads=cfg.get("num_heads", 8), num_head_channels=-1)  # SD15 forces 8 heads
    else:  # the config's own heads (SDXL forces heads of 64 channels)
        mc.unet_config.update({k: cfg[k] for k in ("num_heads", "num_head_channels") if k in cfg})
    mc.set_inference_dtype(dtype, None)
    base = mc.get_model({}, device=torch.device(device))
    randomise(base.diffusion_model, seed)
    base.diffusion_model.to(torch.device(device))
    return comfy.model_patcher.ModelPatcher(base, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def build_instantfamily(mods: dict, cfg: dict, dtype, seed: int = 1, mask_mode: str = "additive"):
    """An ``InstantFamilyModel`` (the loader node's output) with a random ControlNet of the UNet's shape, built
    through the pack's ``build_controlnet`` (ldm layout), and a random identity projector (50 tokens per ID)."""
    import torch
    import comfy.cldm.cldm
    import comfy.ops
    from instantfamily_core.checkpoint import CheckpointMeta
    from instantfamily_core.projector import IdentityProjector, ProjectorConfig
    cn_cfg = {k: v for k, v in cfg.items() if k not in ("out_channels", "transformer_depth_output",
                                                           "use_temporal_attention", "use_temporal_resblock")}
    cn_cfg.update(hint_channels=3, num_heads=cfg.get("num_heads", 8), num_head_channels=-1)
    with torch.device("meta"):
        shapes = comfy.cldm.cldm.ControlNet(**cn_cfg, operations=comfy.ops.disable_weight_init).state_dict()
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in shapes.items():
        if v.ndim <= 1 and "norm" in k and k.endswith("weight"):
            sd[k] = torch.ones(v.shape, dtype=dtype)
        else:
            sd[k] = (torch.randn(v.shape, generator=g) * 0.02).to(dtype)
    cn = mods["controlnet"].build_controlnet(sd, "ldm", cn_cfg, "bench_controlnet")
    del sd
    pc = ProjectorConfig(global_dim=512, local_dim=512, grid=7, token_dim=cfg["context_dim"], hidden_dim=256)
    torch.manual_seed(seed)
    projector = IdentityProjector(pc).eval()
    meta = CheckpointMeta(face_pack="", projector=pc, mask_mode=mask_mode, controlnet_layout="ldm",
                          controlnet_config=cn_cfg)
    return mods["model_nodes"].InstantFamilyModel(projector, cn, meta, "bench")


def face_masks(n: int, height: int, width: int):
    """``(n, H, W)`` face-sized boxes on a grid (one per identity, like PoseToMasks' face masks)."""
    import math
    import torch
    masks = torch.zeros(n, height, width)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    ch, cw = height / rows, width / cols
    for i in range(n):
        r, c = divmod(i, cols)
        y0, x0 = int(r * ch + ch * 0.2), int(c * cw + cw * 0.25)
        masks[i, y0:max(int(y0 + ch * 0.5), y0 + 1), x0:max(int(x0 + cw * 0.5), x0 + 1)] = 1.0
    return masks


def conditioning(seed: int, length: int = 77, dim: int = 768, pooled_dim: int = 0, size: Optional[tuple] = None):
    """One random text conditioning ``[[cond (1, length, dim), extras]]``; for SDXL also ``pooled_output``
    (``pooled_dim`` wide) and, with ``size = (width, height)`` in pixels, the size/crop entries SDXL's
    ``encode_adm`` reads (width, height, crop_w/h 0, target_width/height)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(1, length, dim, generator=g)
    extras: dict = {}
    if pooled_dim:
        extras["pooled_output"] = torch.randn(1, int(pooled_dim), generator=g)
    if size is not None:
        w, h = (int(x) for x in size)
        extras.update(width=w, height=h, crop_w=0, crop_h=0, target_width=w, target_height=h)
    return [[cond, extras]]


# ---------------------------------------------------------------------------------------------------------------
# statistics, memory, environment


def add_step_arguments(p, stem: str) -> None:
    """The sizing, timing and output options the SDXL-capable step benchmarks share (``--head-dim``/``--depth``
    resize SDXL topologies; ``--out`` writes ``<stem>.md`` + ``<stem>.json``)."""
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--latent", type=int, default=None)
    p.add_argument("--channels", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=None, help="sdxl: channels per head (SDXL 64)")
    p.add_argument("--depth", type=int, default=None,
                   help="sdxl: transformers per level-2 and middle block (SDXL 10; level-1 blocks keep 2)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1 on cpu)")
    p.add_argument("--compile", default=None, metavar="BACKEND",
                   help="compile every configuration's UNet with ComfyUI's set_torch_compile_wrapper (what its "
                        "TorchCompileModel node does), e.g. inductor; the warm-up run compiles")
    p.add_argument("--report-only", action="store_true", help="accepted for the smoke runs (no targets here)")
    p.add_argument("--out", default=None, help=f"folder for {stem}.md + {stem}.json")


def check_steps(p, args) -> None:
    if args.steps is not None and args.steps < 2:
        p.error("--steps must be at least 2 (the first step of each run is not timed)")


def bench_setup(args, sizes: dict):
    """What the SDXL-capable step benchmarks share at start: ``(size, spec, counts, nodes, mods, threads)`` — the
    size's settings with the command line's over them (``--head-dim``/``--depth`` too), the people counts of
    ``--n``, the host loaded, torch's CPU threads set (``--threads``, default 1 on cpu)."""
    import torch
    size, spec = model_spec(args, sizes)
    for k in ("head_dim", "depth"):
        if getattr(args, k, None) is not None:
            spec[k] = getattr(args, k)
    counts = [int(x) for x in args.n.split(",") if x.strip()]
    nodes, mods = load_host(args.device)
    threads = args.threads if args.threads is not None else (1 if args.device == "cpu" else 0)
    if threads:
        torch.set_num_threads(threads)
    return size, spec, counts, nodes, mods, threads


def step_clock(device: str, threads: int):
    """``(clock, name)``: this process's CPU time on CPU with one thread (other processes on a shared machine do
    not inflate it), else wall clock."""
    clock = time.process_time if device == "cpu" and threads == 1 else time.perf_counter
    return clock, "cpu" if clock is time.process_time else "wall"


def time_configs(configs: list, args, spec: dict, sample, clock, what: str, threads: int) -> float:
    """Time sampling steps of every configuration: each configuration's model compiled first when ``--compile``
    asks (:func:`compile_models`), a banner printed, a warm-up run of each, then :func:`alternate_rounds`. One run
    is ``sample(c, steps, callback)``; a step is the time between two consecutive callbacks on ``clock`` (the first
    step dropped), peak VRAM per configuration on CUDA (:class:`CudaPeak`). Returns the seconds of it all."""
    if args.compile:
        compile_models(configs, args.compile)
    print(f"# {what}, {args.device}, {threads or 'default'} threads, {len(configs)} configs × {spec['repeats']} "
          f"rounds × {spec['steps'] - 1} timed steps", flush=True)

    def run(c):
        stamps = []
        with CudaPeak(args.device, c):
            sample(c, spec["steps"], lambda *a: stamps.append(clock()))
        return [b - a for a, b in zip(stamps, stamps[1:])]
    t0 = time.perf_counter()
    for c in configs:
        run(c)
        c["steps"], c["rounds"] = [], []
    alternate_rounds(configs, spec["repeats"], run, t0)
    return time.perf_counter() - t0


def step_result(c: dict, base: dict) -> dict:
    """Median, IQR and step count (ms) of configuration ``c`` and its ratio and paired ratio to ``base``."""
    s = summarize([t * 1000 for t in c["steps"]])
    return {"config": c["name"], "n": c["n"], "kind": c["kind"], "median_ms": s["median"], "p25_ms": s["p25"],
            "p75_ms": s["p75"], "steps": s["n"], "ratio": statistics.median(c["steps"]) / statistics.median(
                base["steps"]),
            "paired_ratio": statistics.median(a / b for a, b in zip(c["rounds"], base["rounds"])),
            "peak_mib": c.get("peak_mib")}


def kv_weights(topology, seed: int = 7) -> dict:
    """Random ``{p.to_k_ip.weight, p.to_v_ip.weight}`` ``(hidden, context)`` for every attn2 processor p of
    ``topology`` (the one read from the live model)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    out = {}
    for p in topology.attn2_indices:
        context, hidden = topology.processor_width(p)
        out[f"{p}.to_k_ip.weight"] = torch.randn(hidden, context, generator=g) * 0.05
        out[f"{p}.to_v_ip.weight"] = torch.randn(hidden, context, generator=g) * 0.05
    return out


def compile_models(configs: list, backend: str) -> None:
    """ComfyUI's TorchCompileModel path (``set_torch_compile_wrapper``) on a clone of every configuration's
    ``"model"``, with room in dynamo's cache for all of them (they compile the same UNet module, each with its own
    guards); the first (warm-up) run of each compiles."""
    import torch._dynamo
    from comfy_api.torch_helpers.torch_compile import set_torch_compile_wrapper
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 4 * len(configs))
    for c in configs:
        c["model"] = c["model"].clone()
        set_torch_compile_wrapper(c["model"], backend=backend)


class CudaPeak:
    """``with CudaPeak(device, c):`` records the run's ``torch.cuda.max_memory_allocated`` as ``c["peak_mib"]``
    (the largest over runs); nothing on CPU."""

    def __init__(self, device: str, config: dict):
        self.on, self.config = device == "cuda", config

    def __enter__(self):
        if self.on:
            import torch
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        if self.on:
            import torch
            peak = torch.cuda.max_memory_allocated() / 2 ** 20
            self.config["peak_mib"] = max(self.config.get("peak_mib") or 0.0, peak)


def alternate_rounds(configs: list, repeats: int, measure, t_start: float) -> None:
    """Measure every config once per round, alternating the order (A B C, then C B A, …) so drift on a shared
    machine hits all configs alike; ``measure(c)`` returns that round's step times, collected in ``c["steps"]``
    and, as the round's median, in ``c["rounds"]``."""
    for r in range(repeats):
        for c in (configs if r % 2 == 0 else configs[::-1]):
            times = measure(c)
            c["steps"] += times
            c["rounds"].append(statistics.median(times))
        print(f"round {r + 1}/{repeats} done ({time.perf_counter() - t_start:.1f}s)", flush=True)


def summarize(samples: Sequence[float]) -> dict:
    s = sorted(samples)
    if not s:
        return {"n": 0}
    q = statistics.quantiles(s, n=4, method="inclusive") if len(s) > 1 else [s[0]] * 3
    return {"n": len(s), "median": statistics.median(s), "p25": q[0], "p75": q[2], "iqr": q[2] - q[0],
            "min": s[0], "max": s[-1], "mean": statistics.fmean(s)}


def peak_rss_mib() -> float:
    """Process peak resident set size (high-water mark, never decreases), MiB. Coarse."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024.0 if sys.platform != "darwin" else r / (1024.0 * 1024.0)


def current_rss_mib() -> float:
    try:
        import psutil
        return psutil.Process().memory_info().rss / (1024.0 * 1024.0)
    except ImportError:
        return float("nan")


def environment(device: str) -> dict:
    import torch
    env = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
           "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads()}
    try:
        import comfyui_version  # type: ignore
        env["comfyui"] = comfyui_version.__version__
    except ImportError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    env["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if device == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    return env


class Timer:
    """Wall-clock timer that synchronises CUDA first when timing a GPU."""

    def __init__(self, device: str):
        import torch
        self.sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def now(self) -> float:
        self.sync()
        return time.perf_counter()


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    for r in rows:
        out.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(out)


def write_outputs(out_dir: Optional[str], stem: str, markdown: str, data: dict) -> None:
    print(markdown)
    if not out_dir:
        return
    d = Path(out_dir)
    write_text_atomic(d / f"{stem}.md", markdown + "\n")
    write_text_atomic(d / f"{stem}.json", json.dumps(data, indent=2, default=str) + "\n")
    print(f"\nwrote {d / (stem + '.md')} and {d / (stem + '.json')}")


def model_spec(args, sizes: dict) -> tuple[str, dict]:
    """The model size (``--size``; default full on cuda, reduced on cpu) and its settings, with any of
    ``--channels/--heads/--latent/--steps/--repeats`` given on the command line put over them."""
    size = args.size or ("full" if args.device == "cuda" else "reduced")
    spec = dict(sizes[size])
    for k in ("channels", "heads", "latent", "steps", "repeats"):
        if getattr(args, k, None) is not None:
            spec[k] = getattr(args, k)
    return size, spec
