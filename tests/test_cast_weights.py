"""Identity keys/values when ComfyUI casts weights per call ("lowvram" partial loading) instead of holding them
loaded: the UNet and the InstantFamily ControlNet, with LoRA-style weight patches on their ``attn2.to_k`` /
``attn2.to_v``, through the real ComfyUI 0.3.64 host in-process.

**How sampling loads a model** (ComfyUI 0.3.64). ``comfy/sampler_helpers.py:138`` (``_prepare_sampling``) calls
``comfy.model_management.load_models_gpu([model] + ControlNets…)``, which picks a weight budget per model,
``lowvram_model_memory`` (``comfy/model_management.py:669-684``), and calls ``LoadedModel.model_load(budget)``
(``:686``) → ``model_use_more_vram`` (``:523-524``) → ``ModelPatcher.partially_load``
(``comfy/model_patcher.py:865``) → ``ModelPatcher.load(device, lowvram_model_memory=…, full_load=…)`` (``:636``).
Budget 0 means everything (``model_load`` makes it 1e32, ``model_management.py:492-494``, so ``partially_load`` sets
``full_load``, ``model_patcher.py:879-880``): ``load`` bakes each weight patch into ``.weight`` and
``model_lowvram`` is False. A small budget makes every ``comfy_cast_weights`` module over it "lowvram"
(``model_patcher.py:657-660``): its weight stays as it is, its patches become ``m.weight_function =
[LowVramPatch(key, patches)]`` (``:670-676``), applied at each call by ``comfy/ops.py:87-92``
(``cast_bias_weight``); ``m.comfy_cast_weights = True`` (``:694-696``), ``model.model_lowvram = True`` (``:726``),
``lowvram_patch_counter`` += the call-time patches (``:734``).

**Why it is forced, and how.** The test host runs with ``--cpu``: the load device is the CPU, so
``load_models_gpu`` takes ``VRAMState.DISABLED`` (``model_management.py:671-672``) and the budget stays 0 whatever
``vram_state``, ``--lowvram``/``--novram`` or the free-memory figures say — monkeypatching those changes nothing
here — and ``ModelPatcher.force_cast_weights`` alone only makes modules cast while their patches are still baked
into ``.weight`` (``model_patcher.py:664,694``; ``full_load`` skips the lowvram branch). :func:`lowvram_loads`
therefore wraps ``comfy.model_management.LoadedModel.model_load`` and passes it the budget that ``load_models_gpu``
itself passes under ``VRAMState.NO_VRAM`` (``lowvram_model_memory = 0.1``, ``model_management.py:683-684``);
everything after that (``model_use_more_vram`` → ``partially_load`` → ``load(full_load=False)``) is ComfyUI's own
code, for the UNet and the ControlNet alike (one ``load_models_gpu`` call loads both). Every model is unloaded
before and after (``unload_all_models``), since a model already loaded in full would stay so (``partially_load``
returns early, ``model_patcher.py:876-878``). :func:`full_loads` is the host's own path, from the same clean slate,
and asserts that the host chose budget 0.

**Proof that the path is taken.** A ``CALC_COND_BATCH`` wrapper (:class:`Probe`) runs at every model call of the
sampling, beside the pack's ``regions_wrapper`` — i.e. where ``prepare()`` projects the identities — and records
``model_lowvram`` of the UNet and of the ControlNet, the UNet's ``lowvram_patch_counter``, and for every
``attn2.to_k``/``to_v``: ``comfy_cast_weights``, its number of ``weight_function`` and whether ``.weight`` still is
the unpatched tensor. Under :func:`lowvram_loads` everything is lowvram, each patched module carries one call-time
patch and ``.weight`` is unpatched; under :func:`full_loads` the opposite, ``.weight`` being weight + delta.

**Why each assertion can fail** (each was tried on a scratch copy of this file, the pack's
``InstantFamilyAttention._project`` or this file's forcing replaced at run time; the repository untouched):

* forcing that does nothing (budget 0 passed on): both tests fail at "the partial (lowvram) load was not taken";
  a full-load run that is secretly partial fails :func:`check_full_taken` (an early draft of this file did that);
* projecting by reading ``.weight`` (``F.linear(x, attn.to_k.weight)``) instead of calling the module: under lowvram
  ``.weight`` lacks the patch, so :func:`check_identity_kv` (the cached keys against ``tokens @ (W + delta).T``
  computed here, and far from ``tokens @ W.T``) fails, and with that check disabled the lowvram sample differs
  from the full-load one (the full-load path bakes the patch into ``.weight``);
* projecting once and keeping the keys across runs: the second run's keys miss the second patch
  (:func:`check_identity_kv`), and with that check disabled the second run's sample differs from the reference built
  fresh with both patches. (Its text keys do change, so "the second run differs from the first" alone would not
  catch it: the reference comparison does.)

On the CPU host the lowvram and full-load samples agree bit for bit (the same ``calculate_weight`` either way); the
tolerance is 1e-5 relative, and "differs" means beyond 1e-4 relative (the patches move the samples by ~1e-3).
Every test runs under both clone rules (``clone_rule``); tiny models, 16×16 latents, one euler step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re

import pytest
import torch

from tools.devkit.comfy_host import HOW_TO_PROVIDE, find_comfyui
from test_nodes_inprocess import cond, host, identities, ifmodel, pose_for  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.skipif(find_comfyui() is None, reason=HOW_TO_PROVIDE),
              pytest.mark.usefixtures("clone_rule")]  # every test under 0.3.64's and 0.38's clone()

LOWVRAM_BUDGET = 0.1
"""What ``load_models_gpu`` passes to ``model_load`` under ``VRAMState.NO_VRAM`` (model_management.py:683-684)."""
ATTN2_KV = re.compile(r"(^|\.)attn2\.to_[kv]$")
PROBE_KEY = "test_cast_weights_probe"


# ----------------------------------------------------------------------------------------------- load paths


@contextlib.contextmanager
def _loads(budget):
    """Sampling inside loads every model with ``budget`` (``None``: the one the host chooses), from a clean slate;
    yields the budgets the host chose."""
    import comfy.model_management as mm
    original = mm.LoadedModel.model_load
    chosen = []

    def model_load(self, lowvram_model_memory=0, force_patch_weights=False):
        chosen.append(lowvram_model_memory)
        return original(self, lowvram_model_memory if budget is None else budget,
                        force_patch_weights=force_patch_weights)
    mm.unload_all_models()
    mm.LoadedModel.model_load = model_load
    try:
        yield chosen
    finally:
        mm.LoadedModel.model_load = original
        mm.unload_all_models()


def lowvram_loads():
    """Every model partially loaded (see the module docstring)."""
    return _loads(LOWVRAM_BUDGET)


@contextlib.contextmanager
def full_loads():
    """The host's own path (everything loaded, patches baked into ``.weight``)."""
    with _loads(None) as chosen:
        yield chosen
    assert chosen and all(b == 0 for b in chosen), f"the CPU host chose budgets {chosen}, not a full load"


LOADS = {"lowvram": lowvram_loads, "full": full_loads}


# ------------------------------------------------------------------------------------------------- helpers


def sample(nodes, model, positive, negative, seed=0, steps=1, size=16, cfg=5.0):
    latent = {"samples": torch.zeros(1, 4, size, size)}
    return nodes.common_ksampler(model, seed, steps, cfg, "euler", "normal", positive, negative, latent)[0]["samples"]


def apply(host, ifm, model, n=2):
    """Apply InstantFamily (ControlNet strength 1.0) to ``model``; returns ``(patched, positive, negative)``."""
    _, _, m = host
    pose_image, masks, _ = m["pose_nodes"].PoseToMasks().run(identities(n), "none (use pose_keypoint)", 128, 128,
                                                             0.25, "auto", pose_keypoint=pose_for(n))
    return m["model_nodes"].ApplyInstantFamily().apply(model, ifm, identities(n), pose_image, masks, cond(1),
                                                       cond(2), weight=1.0, identity_weights="",
                                                       controlnet_strength=1.0, start_at=0.0, end_at=1.0,
                                                       mask_mode="checkpoint")


def kv_linears(root: torch.nn.Module) -> dict:
    """``{patch key of the weight: module}`` for every ``attn2.to_k`` / ``attn2.to_v`` under ``root`` (the module a
    ModelPatcher wraps, so the keys are its patch keys)."""
    return {f"{name}.weight": mod for name, mod in root.named_modules() if ATTN2_KV.search(name)}


def deltas(linears: dict, seed: int, scale: float = 0.05) -> dict:
    """LoRA-style "diff" patches ``{key: (delta,)}`` for ``ModelPatcher.add_patches``."""
    g = torch.Generator().manual_seed(seed)
    return {key: (torch.randn(mod.weight.shape, generator=g) * scale,) for key, mod in sorted(linears.items())}


def unet_kv(model) -> dict:
    """The UNet's attn2 k/v projections under ComfyUI's patch keys (``diffusion_model.….attn2.to_k.weight``)."""
    return kv_linears(model.model)


def fresh_ifmodel(host, ifmodel, patches: dict | None = None):
    """The loaded InstantFamily model with its own ControlNet (the same weights, another ModelPatcher), carrying
    ``patches`` on the ControlNet's attn2 k/v (keys ``input_blocks.….attn2.to_k.weight``)."""
    from support.comfy_models import tiny_controlnet_ldm
    _, _, m = host
    sd, cfg = tiny_controlnet_ldm(seed=2)  # the ControlNet of write_tiny_checkpoint(seed=2)
    cn = m["controlnet"].build_controlnet(sd, "ldm", cfg)
    if patches:
        assert set(cn.control_model_wrapped.add_patches(patches, 1.0)) == set(patches)
    return dataclasses.replace(ifmodel, controlnet=cn, name="cast-weights"), cn


def state_of(patched):
    hooks = patched.model_options["transformer_options"]["patches_replace"]["attn2"].values()
    states = {id(h.state): h.state for h in hooks}
    assert len(states) == 1
    return next(iter(states.values()))


class Probe:
    """``CALC_COND_BATCH`` wrapper recording, at every model call of a sampling, how the UNet's and the
    ControlNet's attn2 k/v modules are loaded (see the module docstring)."""

    def __init__(self, unet: dict, cn_model, cn: dict, originals: dict):
        self.unet, self.cn_model, self.cn, self.originals = unet, cn_model, cn, originals
        self.calls: list = []

    def __call__(self, executor, model, conds, x_in, timestep, model_options):
        modules = {**self.unet, **self.cn}
        self.calls.append({
            "unet_lowvram": bool(model.model_lowvram), "unet_counter": int(model.lowvram_patch_counter),
            "cn_lowvram": bool(self.cn_model.model_lowvram),
            "cast": {k: bool(mod.comfy_cast_weights) for k, mod in modules.items()},
            "functions": {k: len(mod.weight_function) for k, mod in modules.items()},
            "unpatched": {k: torch.equal(mod.weight, self.originals[k]) for k, mod in modules.items()},
            "patched_weight": {k: mod.weight.detach().clone() for k, mod in modules.items()},
        })
        return executor(model, conds, x_in, timestep, model_options)


def run(host, ifmodel, path: str, unet_patches: dict | None, cn_patches: dict | None, steps: int = 1):
    """Apply + sample a fresh tiny UNet (``unet_patches`` on it) with a fresh ControlNet (``cn_patches``) under load
    path ``path``; returns ``(latent, probe, identity state, UNet k/v modules, ControlNet k/v modules, their
    unpatched weights)``."""
    import comfy.patcher_extension as ext
    from support.comfy_models import tiny_sd15
    nodes, _, _ = host
    model = tiny_sd15()
    unet = unet_kv(model)
    if unet_patches:
        assert set(model.add_patches(unet_patches, 1.0)) == set(unet_patches)
    ifm, cn = fresh_ifmodel(host, ifmodel, cn_patches)
    cn_mods = kv_linears(cn.control_model)
    originals = {k: mod.weight.detach().clone() for k, mod in {**unet, **cn_mods}.items()}
    patched, pos, neg = apply(host, ifm, model)
    probe = Probe(unet, cn.control_model, cn_mods, originals)
    patched.add_wrapper_with_key(ext.WrappersMP.CALC_COND_BATCH, PROBE_KEY, probe)
    with LOADS[path]():
        out = sample(nodes, patched, pos, neg, steps=steps)
    assert probe.calls, "the probe never ran: no model call went through CALC_COND_BATCH"
    return out, probe, state_of(patched), unet, cn_mods, originals


def assert_same(a: torch.Tensor, b: torch.Tensor, what: str):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()), msg=what)


def assert_differs(a: torch.Tensor, b: torch.Tensor, what: str):
    """Far outside :func:`assert_same`'s tolerance (≥ 10× its absolute part everywhere it matters)."""
    assert (a - b).abs().max() > 1e-4 * float(b.abs().max()), what


def check_identity_kv(state, modules: dict, originals: dict, patches: dict | None, data: dict | None = None):
    """The run's cached identity keys/values (``state``'s cache, or ``data``: a copy of it taken after a run) of
    every module equal ``tokens @ (W + delta).T`` computed here from the unpatched weights and the patch, and (with
    a patch) are far from ``tokens @ W.T``."""
    kv = {k[1]: v for k, v in (state.cache.data if data is None else data).items() if k[0] == "kv"}
    real = state.tokens.flatten(0, 1)
    null = state.null_tokens
    null = null.flatten(0, 1) if null.ndim == 3 else null.repeat(state.num_identities, 1)
    for key, mod in modules.items():
        attn = None
        for a in kv:
            if mod is a.to_k or mod is a.to_v:
                attn = a
        assert attn is not None, f"{key}: no identity projection cached for its attn2 in this run"
        kr, vr, kn, vn = kv[attn]
        got_real, got_null = (kr, kn) if mod is attn.to_k else (vr, vn)
        w = originals[key] + (patches[key][0] if patches else 0)
        torch.testing.assert_close(got_real, real @ w.t(), rtol=1e-4, atol=1e-5, msg=f"{key}: identity keys")
        torch.testing.assert_close(got_null, null @ w.t(), rtol=1e-4, atol=1e-5, msg=f"{key}: null keys")
        if patches:
            assert not torch.allclose(got_real, real @ originals[key].t(), atol=1e-3), \
                f"{key}: identity keys ignore the weight patch"


def check_lowvram_taken(probe: Probe, unet_patches: dict, cn_patches: dict):
    for call in probe.calls:
        assert call["unet_lowvram"] and call["cn_lowvram"], "the partial (lowvram) load was not taken"
        assert call["unet_counter"] == len(unet_patches), "call-time patches of the UNet"
        for key, cast in call["cast"].items():
            patched = key in unet_patches or key in cn_patches
            assert cast, f"{key}: comfy_cast_weights is off under the lowvram load"
            assert call["functions"][key] == (1 if patched else 0), f"{key}: weight_function"
            assert call["unpatched"][key], f"{key}: .weight was patched in place under the lowvram load"


def check_full_taken(probe: Probe, unet_patches: dict, cn_patches: dict, originals: dict):
    for call in probe.calls:
        assert not call["unet_lowvram"] and not call["cn_lowvram"] and call["unet_counter"] == 0
        for key, cast in call["cast"].items():
            patch = unet_patches.get(key) or cn_patches.get(key)
            assert not cast and call["functions"][key] == 0, f"{key}: cast per call under the full load"
            if patch is not None:
                torch.testing.assert_close(call["patched_weight"][key], originals[key] + patch[0])


# --------------------------------------------------------------------------------------------------- tests


def test_lowvram_sample_equals_full_load_and_the_patches_reach_the_identity_keys(host, ifmodel):
    """Patches on every attn2 k/v weight of the UNet and of the InstantFamily ControlNet: the lowvram sample equals
    the full-load one, the identity keys/values went through the patched weights on both paths, and dropping
    either model's patches changes the sample."""
    from support.comfy_models import tiny_sd15
    unet_patches = deltas(unet_kv(tiny_sd15()), seed=11)
    cn_patches = deltas(kv_linears(fresh_ifmodel(host, ifmodel)[1].control_model), seed=12, scale=0.25)
    assert unet_patches and cn_patches

    low, probe_low, state_low, unet, cn, originals = run(host, ifmodel, "lowvram", unet_patches, cn_patches)
    full, probe_full, state_full, unet_f, cn_f, originals_f = run(host, ifmodel, "full", unet_patches, cn_patches)

    # the two paths really were the two paths
    check_lowvram_taken(probe_low, unet_patches, cn_patches)
    check_full_taken(probe_full, unet_patches, cn_patches, originals_f)

    # the identity keys/values went through the patched weights on both paths, UNet and ControlNet
    check_identity_kv(state_low, unet, originals, unet_patches)
    check_identity_kv(state_low, cn, originals, cn_patches)
    check_identity_kv(state_full, unet_f, originals_f, unet_patches)
    check_identity_kv(state_full, cn_f, originals_f, cn_patches)

    assert torch.isfinite(low).all()
    assert_same(low, full, "lowvram (call-time patches) vs full load (patches baked into .weight)")

    # and the patches matter: without either, the sample is another one
    no_unet, *_ = run(host, ifmodel, "lowvram", None, cn_patches)
    no_cn, *_ = run(host, ifmodel, "lowvram", unet_patches, None)
    assert_differs(low, no_unet, "the UNet's attn2 patch changed nothing")
    assert_differs(low, no_cn, "the ControlNet's attn2 patch changed nothing")


def test_a_patch_added_between_runs_reaches_the_next_run(host, ifmodel):
    """One apply: one identity state, one per-run cache and one set of attn2 modules (one BaseModel). The second run
    samples a clone of the patched model with another patch on the same k/v weights, the third the first model
    again, all under the lowvram load. The cache must project anew each run: the second run equals a model built
    fresh with both patches, the third repeats the first."""
    import comfy.patcher_extension as ext
    from support.comfy_models import tiny_sd15
    nodes, _, _ = host
    first_patches = deltas(unet_kv(tiny_sd15()), seed=21)
    more_patches = deltas(unet_kv(tiny_sd15()), seed=22)

    model = tiny_sd15()
    unet = unet_kv(model)
    originals = {k: mod.weight.detach().clone() for k, mod in unet.items()}
    model.add_patches(first_patches, 1.0)
    ifm, cn = fresh_ifmodel(host, ifmodel)
    patched, pos, neg = apply(host, ifm, model)
    cn_mods = kv_linears(cn.control_model)
    cn_originals = {k: mod.weight.detach().clone() for k, mod in cn_mods.items()}
    probe = Probe(unet, cn.control_model, cn_mods, {**originals, **cn_originals})
    patched.add_wrapper_with_key(ext.WrappersMP.CALC_COND_BATCH, PROBE_KEY, probe)
    state = state_of(patched)
    second = patched.clone()  # copies the probe wrapper too
    second.add_patches(more_patches, 1.0)
    assert state_of(second) is state and second.model is patched.model
    kv_runs = []
    with lowvram_loads():
        a = sample(nodes, patched, pos, neg)
        kv_runs.append(dict(state.cache.data))
        b = sample(nodes, second, pos, neg)
        kv_runs.append(dict(state.cache.data))
        again = sample(nodes, patched, pos, neg)
    assert len(probe.calls) == 3
    check_lowvram_taken(probe, first_patches, {})  # one LowVramPatch per key, holding one or both patches

    both = {k: (first_patches[k][0] + more_patches[k][0],) for k in first_patches}
    check_identity_kv(state, unet, originals, first_patches, kv_runs[0])
    check_identity_kv(state, unet, originals, both, kv_runs[1])
    check_identity_kv(state, unet, originals, first_patches)  # the third run: the first model again
    check_identity_kv(state, cn_mods, cn_originals, None)  # the ControlNet (unpatched here) in the same runs

    reference = tiny_sd15()
    reference.add_patches(first_patches, 1.0)
    reference.add_patches(more_patches, 1.0)
    ref_ifm, _ = fresh_ifmodel(host, ifmodel)
    ref_patched, ref_pos, ref_neg = apply(host, ref_ifm, reference)
    with lowvram_loads():
        ref = sample(nodes, ref_patched, ref_pos, ref_neg)

    assert_differs(b, a, "the second patch changed nothing")
    assert_same(b, ref, "second run vs a model built fresh with both patches")
    assert_same(again, a, "the first model again vs its first run")
