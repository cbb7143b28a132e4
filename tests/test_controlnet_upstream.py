"""``nodes/controlnet.py``'s MaskedControlNetModel.forward re-implements ComfyUI's ``comfy.cldm.cldm.ControlNet.
forward`` (ComfyUI 0.3.64) so that every block receives ``transformer_options``. These tests pin the upstream
method it mirrors, so a ComfyUI update that changes it fails here with a message saying what to re-check, and
prove that without InstantFamily options the re-implementation gives upstream's output exactly."""

from __future__ import annotations

import ast
import hashlib
import inspect
import sys
import textwrap

import pytest
import torch

from tools.devkit.comfy_host import HOW_TO_PROVIDE, find_comfyui

pytestmark = pytest.mark.skipif(find_comfyui() is None, reason=HOW_TO_PROVIDE)

MIRRORED_VERSION = "0.3.64"
UPSTREAM_SIGNATURE = "(self, x, hint, timesteps, context, y=None, **kwargs)"
UPSTREAM_SOURCE_SHA256 = "ba0bd0eb4cbadc055dfb68a6e93d3059282b84da7a3f482fd2a3c6d79ef96966"
UPSTREAM_SELF_ATTRIBUTES = {"control_add_embedding", "input_blocks", "input_hint_block", "label_emb", "middle_block",
                            "middle_block_out", "model_channels", "num_classes", "num_control_type", "time_embed",
                            "union_controlnet_merge", "zero_convs"}
RECHECK = (f"ComfyUI's comfy.cldm.cldm.ControlNet.forward is no longer the one of ComfyUI {MIRRORED_VERSION} that "
           "nodes/controlnet.py MaskedControlNetModel.forward mirrors. Re-check MaskedControlNetModel.forward "
           "against it: the arguments, the time embedding, the hint block (and union ControlNet handling), the "
           "label embedding, the input blocks + zero convs loop, the middle block and the returned "
           "{'middle', 'output'} dict; then record the new signature/hash here")


@pytest.fixture(scope="module")
def host():
    from tools.devkit.comfy_host import import_host, load_pack
    import_host()
    pack = load_pack()
    import comfy.cldm.cldm
    return comfy.cldm.cldm, sys.modules[f"{pack.__name__}.nodes.controlnet"]


def _self_attributes(fn) -> set:
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    return {n.attr for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "self"}


def test_docstring_names_the_mirrored_version(host):
    _, cn = host
    assert f"ComfyUI {MIRRORED_VERSION}" in cn.MaskedControlNetModel.__doc__
    assert f"ComfyUI {MIRRORED_VERSION}" in cn.__doc__


def test_upstream_forward_signature_is_the_mirrored_one(host):
    cldm, cn = host
    sig = inspect.signature(cldm.ControlNet.forward)
    assert str(sig) == UPSTREAM_SIGNATURE, f"signature is now {sig}. {RECHECK}"
    ours = list(inspect.signature(cn.MaskedControlNetModel.forward).parameters)
    assert ours[:len(sig.parameters) - 1] == list(sig.parameters)[:-1], "our forward must accept upstream's arguments"


def test_upstream_forward_uses_the_mirrored_blocks(host):
    cldm, _ = host
    used = _self_attributes(cldm.ControlNet.forward)
    added, gone = sorted(used - UPSTREAM_SELF_ATTRIBUTES), sorted(UPSTREAM_SELF_ATTRIBUTES - used)
    assert used == UPSTREAM_SELF_ATTRIBUTES, f"upstream forward now also uses {added} and no longer {gone}. {RECHECK}"


def test_upstream_forward_source_is_the_mirrored_one(host):
    cldm, _ = host
    digest = hashlib.sha256(inspect.getsource(cldm.ControlNet.forward).encode()).hexdigest()
    assert digest == UPSTREAM_SOURCE_SHA256, f"source hash is now {digest}. {RECHECK}"


def test_our_forward_covers_every_block_upstream_calls(host):
    """Apart from the union-ControlNet path (never built by this pack), our forward uses the same modules."""
    cldm, cn = host
    ours = _self_attributes(cn.MaskedControlNetModel.forward)
    union = {"control_add_embedding", "num_control_type", "union_controlnet_merge"}
    assert UPSTREAM_SELF_ATTRIBUTES - union <= ours, sorted(UPSTREAM_SELF_ATTRIBUTES - union - ours)


def _pair(cldm, cn):
    import comfy.ops
    from support.comfy_models import tiny_controlnet_ldm
    sd, cfg = tiny_controlnet_ldm(seed=3)
    upstream = cldm.ControlNet(**cfg, operations=comfy.ops.disable_weight_init)
    ours = cn.MaskedControlNetModel(**cfg, operations=comfy.ops.disable_weight_init)
    for m in (upstream, ours):
        missing, unexpected = m.load_state_dict(sd, strict=True)
        assert not missing and not unexpected
        m.eval()
    return upstream, ours


@pytest.mark.parametrize("options", [None, {}], ids=["transformer_options=None", "transformer_options={}"])
def test_without_identities_forward_equals_upstream(host, options):
    """None delegates to upstream; an empty options dict runs our own loop, which must match upstream exactly."""
    cldm, cn = host
    upstream, ours = _pair(cldm, cn)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    hint = torch.rand(2, 3, 128, 128, generator=g)
    t = torch.tensor([999.0, 250.0])
    context = torch.randn(2, 77, 768, generator=g)
    with torch.no_grad():
        want = upstream(x, hint, t, context)
        got = ours(x, hint, t, context, transformer_options=options)
    assert set(got) == set(want) == {"middle", "output"}
    assert len(got["output"]) == len(want["output"]) == len(upstream.input_blocks)
    for key in ("middle", "output"):
        for a, b in zip(got[key], want[key]):
            assert a.shape == b.shape
            assert torch.equal(a, b), f"{key}: max |diff| {(a - b).abs().max().item()}"
    assert any(o.abs().max() > 0 for o in want["output"])  # random zero convs: the outputs carry signal
    if options is not None:
        assert options["block"] == ("middle", 0) and options["original_shape"] == [2, 4, 16, 16]


def test_blocks_are_called_as_the_mirror_calls_them(host):
    """The mirror calls each block as ``module(h, emb, context, transformer_options)`` (positionally), which
    ``TimestepEmbedSequential.forward(*args, **kwargs)`` hands to ``forward_timestep_embed``: pin that order."""
    import comfy.ldm.modules.diffusionmodules.openaimodel as oai
    params = list(inspect.signature(oai.forward_timestep_embed).parameters)
    assert params[:5] == ["ts", "x", "emb", "context", "transformer_options"], f"now {params}. {RECHECK}"


def test_controlnet_operations_are_picked_as_comfyuis_loaders_pick_them(host, monkeypatch):
    """Like ComfyUI's own ControlNet loaders: the load device and no fast-fp8 ops (``--fast`` leaves ControlNets
    alone)."""
    import comfy.ops
    from support.comfy_models import tiny_controlnet_ldm
    _, cn = host
    seen = []
    original = comfy.ops.pick_operations
    monkeypatch.setattr(comfy.ops, "pick_operations", lambda *a, **kw: seen.append(kw) or original(*a, **kw))
    sd, cfg = tiny_controlnet_ldm(seed=3)
    cn.build_controlnet(sd, "ldm", cfg)
    assert len(seen) == 1 and seen[0]["disable_fast_fp8"] is True and "load_device" in seen[0]
