"""torch.compile: a patched model compiles as cleanly as the same graph without identities.

ComfyUI's own compile path (``comfy_api.torch_helpers.set_torch_compile_wrapper``, what its TorchCompileModel node
calls) with dynamo's ``eager`` backend (tracing, guards and graph breaks are dynamo's; no compiler needed). The
baseline is the same graph with a stock ControlNet and no identities. ComfyUI's CPU default attention
(sub-quadratic) graph-breaks on its own in every call (psutil reads /proc/meminfo through ``open``), so both runs
use ComfyUI's PyTorch attention, as GPU installs do.
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
