"""torch.compile: a patched model compiles as cleanly as the same graph without identities.

ComfyUI's own compile path (``comfy_api.torch_helpers.set_torch_compile_wrapper``, what its TorchCompileModel node
calls) with dynamo's ``eager`` backend (tracing, guards and graph breaks are dynamo's; no compiler needed). The
baseline is the same graph without identities (InstantFamily: with a stock ControlNet). Modes: InstantFamily
(additive and paper masks) on a tiny SD1.5, the FaceID rule on a tiny SD1.5 and a tiny SDXL topology (middle block
included). Most runs use ComfyUI's PyTorch attention, as GPU installs do; ComfyUI's CPU default attention
(sub-quadratic) graph-breaks on its own in every call (psutil reads /proc/meminfo through ``open``), and with it the
patched model must break no more often than the stock one (its masked calls run on PyTorch attention while
compiling).
"""

from __future__ import annotations

import pytest
import torch

from tools.devkit.comfy_host import HOW_TO_PROVIDE, find_comfyui
from test_nodes_inprocess import apply, cond, host, ifmodel, sample  # noqa: F401  (fixtures)

pytestmark = pytest.mark.skipif(find_comfyui() is None, reason=HOW_TO_PROVIDE)


@pytest.fixture
def pytorch_attention(host, monkeypatch):
    import comfy.ldm.modules.attention as A
    monkeypatch.setattr(A, "optimized_attention", A.attention_pytorch)


def stock_controlnet_graph(nodes, model):
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.ops
    from support.comfy_models import tiny_controlnet_ldm
    sd, cfg = tiny_controlnet_ldm(2)
    cn = comfy.cldm.cldm.ControlNet(**cfg, operations=comfy.ops.disable_weight_init)
    cn.load_state_dict(sd)
    control = comfy.controlnet.ControlNet(cn, load_device=torch.device("cpu"), manual_cast_dtype=None)
    pos, neg = nodes.ControlNetApplyAdvanced().apply_controlnet(cond(1), cond(2), control,
                                                                torch.zeros(1, 128, 128, 3), 1.0, 0.0, 1.0)[:2]
    return model.clone(), pos, neg


def compiled_runs(nodes, model, pos, neg):
    """Two sampling runs (3 steps each, new seed) compiled with dynamo's eager backend; returns the outputs and
    dynamo's graph-break and graph counts."""
    import torch._dynamo as dynamo
    from comfy_api.torch_helpers.torch_compile import set_torch_compile_wrapper
    from torch._dynamo.utils import counters
    dynamo.reset()
    counters.clear()
    compiled = model.clone()
    set_torch_compile_wrapper(compiled, backend="eager")
    outs = [sample(nodes, compiled, pos, neg, seed=s, steps=3) for s in (0, 1)]
    stats = {"graph_breaks": sum(counters["graph_break"].values()),
             "graphs": counters["stats"]["unique_graphs"],
             "frames": counters["frames"]["total"]}
    dynamo.reset()
    return outs, stats


def test_patched_model_compiles_like_the_unpatched_graph(host, ifmodel, pytorch_attention):
    from support.comfy_models import tiny_sd15
    nodes, _, _ = host
    _, base_stats = compiled_runs(nodes, *stock_controlnet_graph(nodes, tiny_sd15()))
    assert base_stats["graphs"] >= 1
    for mode, weights in (("additive", ""), ("paper", "1.0, 0.5")):
        patched, pos, neg = apply(host, ifmodel, tiny_sd15(), 2, mask_mode=mode, identity_weights=weights)
        outs, stats = compiled_runs(nodes, patched, pos, neg)
        assert stats == base_stats, (mode, stats, base_stats)  # no graph break, graph or recompile of our own
        for seed, out in zip((0, 1), outs):
            eager = sample(nodes, patched, pos, neg, seed=seed, steps=3)
            torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)


def test_start_end_gate_is_evaluated_before_the_traced_call(host, ifmodel, pytorch_attention):
    """The sigma gate is set once per model call outside the compiled region: identities still switch on and
    off at start/end under compile, with the eager result."""
    from support.comfy_models import tiny_sd15
    nodes, _, _ = host
    patched, pos, neg = apply(host, ifmodel, tiny_sd15(), 2, start_at=0.3, end_at=0.7)
    outs, stats = compiled_runs(nodes, patched, pos, neg)
    assert stats["graph_breaks"] == 0
    for seed, out in zip((0, 1), outs):
        torch.testing.assert_close(out, sample(nodes, patched, pos, neg, seed=seed, steps=3), rtol=1e-5, atol=1e-5)


# -- the FaceID rule -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def faceid_host(host):
    import importlib
    _, pack, _ = host
    return {m: importlib.import_module(f"{pack.__name__}.nodes.{m}") for m in ("patch", "faceid_nodes")}


def _text(seed: int, base: str):
    g = torch.Generator().manual_seed(seed)
    if base == "sd15":
        return [[torch.randn(1, 77, 768, generator=g), {}]]
    return [[torch.randn(1, 77, 2048, generator=g), {"pooled_output": torch.randn(1, 1280, generator=g)}]]


def _faceid_models(faceid_host, base: str, n: int):
    """``(unpatched tiny model, the same with Apply FaceID of n people in side-by-side masks)``."""
    from support import sdxl_files as sx
    from support.comfy_models import TINY_UNET, tiny_sd15
    from test_faceid_sdxl import _apply, _tiny_faceid
    from tools.devkit.identities import random_identities
    tiny = tiny_sd15() if base == "sd15" else sx.tiny_sdxl(0)
    faceid = _tiny_faceid(faceid_host, tiny, unet_config=TINY_UNET if base == "sd15" else None)
    masks = torch.zeros(n, 64, 64)
    for i in range(n):
        masks[i, :, i * 64 // n:(i + 1) * 64 // n] = 1.0
    return tiny, _apply(faceid_host, tiny, faceid, random_identities(n, 3), masks)


@pytest.mark.parametrize("base,n", [("sd15", 2), ("sdxl", 1), ("sdxl", 3)])
def test_faceid_rule_compiles_like_the_unpatched_model(host, faceid_host, pytorch_attention, base, n):
    nodes, _, _ = host
    tiny, patched = _faceid_models(faceid_host, base, n)
    pos, neg = _text(1, base), _text(2, base)
    _, base_stats = compiled_runs(nodes, tiny, pos, neg)
    assert base_stats["graphs"] >= 1
    outs, stats = compiled_runs(nodes, patched, pos, neg)
    assert stats == base_stats, (stats, base_stats)  # no graph break, graph or recompile of the rule's own
    for seed, out in zip((0, 1), outs):
        eager = sample(nodes, patched, pos, neg, seed=seed, steps=3)
        assert (eager - sample(nodes, tiny, pos, neg, seed=seed, steps=3)).abs().max() > 1e-4  # the rule acts
        torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)


# -- ComfyUI's sub-quadratic attention -------------------------------------------------------------------------------

@pytest.fixture
def sub_quad_attention(host, monkeypatch):
    import comfy.ldm.modules.attention as A
    monkeypatch.setattr(A, "optimized_attention", A.attention_sub_quad)


def test_with_sub_quadratic_attention_the_patched_model_breaks_no_more_than_the_stock_one(
        host, ifmodel, faceid_host, sub_quad_attention):
    """The stock graph breaks in every sub-quadratic call (its free-memory query); the patched models add no
    break, graph or frame of their own, and their compiled outputs equal the eager ones (which use the selected
    kernel)."""
    from support.comfy_models import tiny_sd15
    nodes, _, _ = host
    _, stock = compiled_runs(nodes, *stock_controlnet_graph(nodes, tiny_sd15()))
    assert stock["graph_breaks"] > 0  # the premise: sub-quadratic attention breaks dynamo's graph by itself
    patched, pos, neg = apply(host, ifmodel, tiny_sd15(), 2, mask_mode="additive")
    tiny, faceid = _faceid_models(faceid_host, "sd15", 2)
    _, plain = compiled_runs(nodes, tiny, _text(1, "sd15"), _text(2, "sd15"))
    for model, p, q, base in ((patched, pos, neg, stock), (faceid, _text(1, "sd15"), _text(2, "sd15"), plain)):
        outs, stats = compiled_runs(nodes, model, p, q)
        assert stats["graph_breaks"] <= base["graph_breaks"] and stats["graphs"] <= base["graphs"], (stats, base)
        for seed, out in zip((0, 1), outs):
            torch.testing.assert_close(out, sample(nodes, model, p, q, seed=seed, steps=3), rtol=1e-4, atol=1e-4)
