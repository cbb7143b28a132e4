"""The attn2 hook that puts identities into ComfyUI's cross-attention — UNet and ControlNet alike — and lets other
packs' attention patches run beside it.

**Where the hook sits.** ComfyUI's ``BasicTransformerBlock`` (comfy/ldm/modules/attention.py) projects the text
context with the block's ``to_k``/``to_v`` and hands q, k, v to the ``attn2`` replace patch it finds under the
3-part key ``(block, number, transformer_index)`` or, failing that, the 2-part key ``(block, number)``. This pack
registers one :class:`Attn2Hook` per model under the **2-part keys**, where IPAdapter-style packs look, so that
both kinds of pack compose instead of one silently shadowing the other.

**The protocol of IPAdapter-style packs** (a fact about their behaviour, implemented here from scratch): a pack
that finds a replace patch under ``(block, number)`` calls ``patch.add(callback, **kwargs)`` on it; otherwise it
puts its own patch there, holding lists ``callback`` and ``kwargs``. At run time each callback is called as
``callback(out, q, k, v, extra_options, **kwargs)`` after the base attention, when
``kwargs["sigma_end"] <= sigma <= kwargs["sigma_start"]``, and its result is **added** to ``out``. The hook
accepts ``.add``; when it is installed over such a patch it takes over that patch's callbacks. A replace patch
that follows no known protocol is replaced with one warning naming the blocks (composition is impossible: both
compute the whole attention).

**Clones.** ``.add`` on a later clone must never reach an earlier model. ComfyUI 0.3.64's ``ModelPatcher.clone()``
deep-copies ``model_options`` (a hook's deep copy is a :meth:`Attn2Hook.twin`); since ComfyUI PR #12382 (0.38)
it copies only dicts and lists and shares every other object, hooks included. So every model this pack patches
carries a ``CallbacksMP.ON_CLONE`` callback (:func:`isolate_hooks`, copied to each clone with the model's other
callbacks) that gives the clone twins of the hooks it shares with its parent: own callback lists, the same rules
and modules. Either clone rule gives the same result.

**Two attention rules share this hook:**

* the InstantFamily rule (:class:`InstantFamilyAttention`): the *base* attention of the block becomes the joint
  masked attention over ``[text; identities]`` — the identity tokens' keys and values are the block's own
  ``to_k``/``to_v`` applied to them — run by the core :class:`MaskedCrossAttention`;
* additive rules, e.g. the public-weights (IP-Adapter-FaceID) mode: callbacks added through the protocol above,
  which compute their own term per block.

Both build on :class:`IdentityState`: identity tokens, masks at each block's real size (with per-row crops for
area conditioning), cond/uncond row selection, the start/end sigma gate, and per-run caches.

**Rows and areas.** Real tokens go on cond rows, uncond tokens on uncond rows (``cond_or_uncond``). ComfyUI runs
area conditionings (ConditioningSetArea, ConditioningSetMask with "mask bounds") on crops of the latent and
batches crops of equal size from different places. A ``CALC_COND_BATCH`` wrapper (:func:`regions_wrapper`)
records the full latent size and each conditioning's area under ``transformer_options["instantfamily_regions"]``;
each row's masks are cropped to its area before they are resized to the block, so a face keeps its place in the
picture. A model call on a crop whose area is unknown is refused with a message.

**Backends.** Masked calls need a kernel that honours an additive mask. ComfyUI's sub-quadratic, PyTorch SDPA,
split, basic and xformers kernels do. In 0.3.64 sage ignores it and flash rejects it; newer ComfyUI routes masked
sage/flash calls to SDPA itself and adds kernels (Comfy-Kitchen int8, sage3) not checked here, and an
``optimized_attention_override`` installed by another pack may drop masks. Masked calls therefore run on ComfyUI's
PyTorch kernel whenever the selected backend is not one of :data:`MASK_BACKENDS`, and unmasked calls keep the
selected one. While ``torch.compile`` traces, the hooks' calls run on the PyTorch kernel instead of ComfyUI's
sub-quadratic one, whose free-memory query breaks dynamo's graph in every call: a patched model then breaks the graph
no more often than the stock one (same math; eager runs keep the selected kernel).

Identities never travel inside CONDITIONING, so ComfyUI's batching of conditionings of different lengths (LCM
repetition) cannot misplace them. Keys/values of identity tokens are projected once per block and sampling run (a
new ``sample_sigmas`` projects again, picking up weight patches such as LoRAs); the FaceID/InstantID rule projects
with the adapter file's own weights, which no patch reaches, once per device and dtype for the rule's life. Outside the start/end range a rule
steps aside: plain text attention, exactly as without the patch.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

from instantfamily_core.attention import MaskedCrossAttention
from instantfamily_core.errors import MaskError
from instantfamily_core.masks import resize_masks

logger = logging.getLogger("InstantFamily")

ASPECT_TOLERANCE = 0.05
REGIONS_KEY = "instantfamily_regions"
WRAPPER_KEY = "instantfamily_regions"
CLONE_KEY = "instantfamily_hooks"
MASK_BACKENDS = ("attention_basic", "attention_sub_quad", "attention_split", "attention_pytorch",
                 "attention_xformers")
"""ComfyUI kernels that apply an additive ``mask`` argument."""

_warned: set = set()


def _warn_once(key, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)


def comfy_attention(extra_options: dict) -> Callable:
    """The core's ``attention_fn`` contract on top of ComfyUI's selected backend (read at call time).

    Unmasked calls use ComfyUI's selected kernel (and any ``optimized_attention_override``); masked calls use it
    only when it is one of :data:`MASK_BACKENDS`, else ComfyUI's PyTorch kernel, without an override that might
    drop the mask. While dynamo traces, calls that would go to the sub-quadratic kernel go to the PyTorch one (see
    the module docstring)."""
    import comfy.ldm.modules.attention as attention

    selected = attention.optimized_attention
    masked_ok = any(selected is getattr(attention, name, None) for name in MASK_BACKENDS)
    override = "optimized_attention_override" in extra_options

    def fn(q, k, v, heads, mask=None):
        precision = extra_options.get("attn_precision")
        if selected is attention.attention_sub_quad and not override and torch.compiler.is_compiling():
            return attention.attention_pytorch(q, k, v, heads, mask=mask, attn_precision=precision,
                                               transformer_options=extra_options)
        if mask is None:
            return selected(q, k, v, heads, attn_precision=precision, transformer_options=extra_options)
        kernel = selected if masked_ok else attention.attention_pytorch
        if override or not masked_ok:
            _warn_once(("backend", getattr(selected, "__name__", repr(selected)), override),
                       f"InstantFamily: masked identity attention runs on ComfyUI's PyTorch attention because the "
                       f"selected attention ({getattr(selected, '__name__', selected)}"
                       f"{' with an optimized_attention_override' if override else ''}) may ignore masks; "
                       "unmasked attention keeps it")
            kernel = attention.attention_pytorch
            return kernel(q, k, v, heads, mask=mask, attn_precision=precision)
        return kernel(q, k, v, heads, mask=mask, attn_precision=precision, transformer_options=extra_options)
    return fn


class RunCache:
    """Values built once per sampling run (identified by the ``sample_sigmas`` tensor) and key."""

    def __init__(self):
        self.run = None
        self.data: dict = {}

    def get(self, run, key, build: Callable):
        if self.run is not run:
            self.run, self.data = run, {}
        if key not in self.data:
            self.data[key] = build()
        return self.data[key]


def chunk_of_rows(extra_options: dict, rows: int) -> list[int]:
    """For each batch row, the index of its chunk in ``cond_or_uncond`` / ``uuids``."""
    chunks = len(extra_options.get("cond_or_uncond") or (0,))
    per = max(1, rows // chunks)
    return [min(r // per, chunks - 1) for r in range(rows)]


def uncond_rows(extra_options: dict, rows: int) -> tuple[bool, ...]:
    """For each batch row, whether it belongs to the unconditional (negative) branch."""
    chunks = tuple(extra_options.get("cond_or_uncond") or (0,))
    return tuple(chunks[c] == 1 for c in chunk_of_rows(extra_options, rows))


class IdentityState:
    """What every identity rule shares: N identities' tokens, their masks and weights, the start/end gate, the
    latent check, per-row masks for area conditioning, and per-run caches.

    ``tokens``: ``(N, T, D)``; ``uncond_tokens``: ``(T, D)`` for every identity, or ``(N, T, D)``; ``masks``:
    ``(N, H, W)`` at image resolution (slot order); ``sigma_range``: (sigma_start, sigma_end), active while
    ``sigma_end <= sigma <= sigma_start``.
    """

    def __init__(self, tokens: torch.Tensor, uncond_tokens: torch.Tensor, masks: torch.Tensor,
                 sigma_range: Optional[tuple[float, float]] = None):
        self.tokens = tokens.detach()
        self.null_tokens = uncond_tokens.detach()
        self.masks = masks
        self.mask_hw = tuple(int(v) for v in masks.shape[-2:])
        self.sigma_range = sigma_range
        self._gate: tuple = (None, True)
        self.cache = RunCache()

    def __deepcopy__(self, memo):  # shared by a model and its clones under either clone rule (see the module doc)
        return self

    @property
    def num_identities(self) -> int:
        return int(self.tokens.shape[0])

    def check_latent(self, latent_hw) -> None:
        """Masks are resized to each feature map by stretching: their aspect ratio must be the latent's, or faces
        would land beside their masks (and beside the ControlNet's centre-cropped pose image)."""
        if not latent_hw or self.num_identities == 0:
            return
        lh, lw = int(latent_hw[-2]), int(latent_hw[-1])
        mh, mw = self.mask_hw
        if abs((mw / mh) / (lw / lh) - 1) > ASPECT_TOLERANCE:
            raise MaskError(f"masks: {mw}×{mh} px (aspect {mw / mh:.2f}) but the latent is {lw * 8}×{lh * 8} px "
                            f"(aspect {lw / lh:.2f}); make the pose and masks at the generation size (set width and "
                            "height of 'InstantFamily Pose to Masks' to the latent's)")

    def active(self, extra_options: dict) -> bool:
        """Whether identities act at this call's sigma (evaluated once per sigma tensor: one device sync per
        model call, not one per block)."""
        if self.num_identities == 0:
            return False
        sigmas = extra_options.get("sigmas")
        if self.sigma_range is None or sigmas is None:
            return True
        if self._gate[0] is not sigmas:
            sigma = float(sigmas.detach().flatten()[0])
            start, end = self.sigma_range
            self._gate = (sigmas, end <= sigma <= start)
        return self._gate[1]

    def row_areas(self, extra_options: dict, rows: int) -> Optional[tuple]:
        """Per batch row, the latent area ``(h, w, y, x)`` it was cropped to, or ``None`` when every row is the
        whole latent. Checks the masks' aspect against the full latent once per run."""
        regions = extra_options.get(REGIONS_KEY)
        shape = extra_options.get("original_shape")
        run = extra_options.get("sample_sigmas")
        full = tuple(regions["latent_hw"]) if regions else (tuple(shape[-2:]) if shape else None)
        self.cache.get(run, ("latent", full), lambda: self.check_latent(full))
        if shape is None or full is None or tuple(shape[-2:]) == full:
            return None
        uuids = list(extra_options.get("uuids") or ())
        areas = (regions or {}).get("areas", {})
        chunk = chunk_of_rows(extra_options, rows)
        found = tuple(areas.get(uuids[c]) if c < len(uuids) else None for c in chunk)
        if any(a is None or tuple(a[:2]) != tuple(shape[-2:]) for a in found):
            raise MaskError(f"area conditioning: the model runs on a {shape[-1] * 8}×{shape[-2] * 8} px crop of the "
                            f"{full[1] * 8}×{full[0] * 8} px latent, but which area it is is unknown, so identity "
                            "masks cannot be placed; use ConditioningSetMask without 'mask bounds', or apply "
                            "InstantFamily to a model whose conditionings cover the whole image")
        return found

    def row_masks(self, extra_options: dict, rows: int) -> Optional[torch.Tensor]:
        """``None`` when the masks apply as they are (whole latent), else per-row masks ``(rows, N, h, w)``: each
        row's masks cropped to its area (at 8 px per latent cell)."""
        areas = self.row_areas(extra_options, rows)
        if areas is None:
            return None

        def build():
            regions = extra_options[REGIONS_KEY]
            lh, lw = regions["latent_hw"]
            full = resize_masks(self.masks, (lh * 8, lw * 8)) if self.masks.shape[-2:] != (lh * 8, lw * 8) else \
                self.masks
            return torch.stack([full[..., y * 8:(y + h) * 8, x * 8:(x + w) * 8] for h, w, y, x in areas])
        return self.cache.get(extra_options.get("sample_sigmas"), ("row_masks", areas), build)

    region_scale: Optional[torch.Tensor] = None
    """Per-identity factor of :meth:`region` (``None``: the masks as they are)."""

    def mask_region(self, run, row_masks: Optional[torch.Tensor], hw: tuple[int, int]) -> torch.Tensor:
        """``(1 or rows, h·w, N)``: each identity's mask (``row_masks``: per row, area conditioning) at feature
        size ``hw`` times :attr:`region_scale`, built once per run, size and set of rows."""
        def build():
            small = resize_masks(self.masks if row_masks is None else row_masks, hw)
            small = (small.unsqueeze(0) if small.ndim == 3 else small).flatten(-2).transpose(-1, -2)
            return small.contiguous() if self.region_scale is None else small * self.region_scale
        return self.cache.get(run, ("region", hw, None if row_masks is None else id(row_masks)), build)

    def region(self, extra_options: dict, rows: int, hw: tuple[int, int]) -> torch.Tensor:
        """:meth:`mask_region` for this call's rows and block size."""
        return self.mask_region(extra_options.get("sample_sigmas"), self.row_masks(extra_options, rows), hw)

    def per_row(self, key, extra_options: dict, rows: int, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        """``(rows, …)``: ``cond`` on cond rows, ``uncond`` on uncond rows (cached per run and layout)."""
        flags = uncond_rows(extra_options, rows)
        if torch.compiler.is_compiling():  # a graph op: no Python-side cache for dynamo to guard on
            return torch.stack([uncond if u else cond for u in flags])
        return self.cache.get(extra_options.get("sample_sigmas"), ("rows", key, flags),
                              lambda: torch.stack([uncond if u else cond for u in flags]))

    def prepare(self, call: "ModelCall") -> None:
        """Once per model call, outside any compiled region (see :func:`regions_wrapper`): the sigma gate and the
        latent check, so that the traced hooks only read what is ready. Rules extend it with their own per-run
        work (projections, masks per feature size)."""
        if self.sigma_range is not None and call.sigmas is not None:
            start, end = self.sigma_range
            self._gate = (call.sigmas, end <= float(call.sigmas.detach().flatten()[0]) <= start)
        self.cache.get(call.run, ("latent", call.latent_hw), lambda: self.check_latent(call.latent_hw))


class InstantFamilyAttention(IdentityState):
    """The InstantFamily rule: joint masked attention over ``[text; identities]`` as a block's base attention.

    ``attention``: the core masked attention for these identities' masks, weights and mode; ``attention_fn``: a
    fixed backend (default: ComfyUI's, per call, see :func:`comfy_attention`).
    """

    def __init__(self, tokens: torch.Tensor, null_tokens: torch.Tensor, attention: MaskedCrossAttention,
                 sigma_range: Optional[tuple[float, float]] = None, attention_fn: Optional[Callable] = None):
        super().__init__(tokens, null_tokens, attention.masks, sigma_range)
        self.attention = attention
        self.attention_fn = attention_fn

    def attention_for(self, extra_options: dict, rows: int) -> MaskedCrossAttention:
        """The masked attention for this call's rows: the apply node's, or one over each row's cropped masks
        (area conditioning), built once per run and set of areas."""
        row_masks = self.row_masks(extra_options, rows)
        if row_masks is None:
            return self.attention
        a = self.attention
        return self.cache.get(extra_options.get("sample_sigmas"), ("attention", id(row_masks)),
                              lambda: MaskedCrossAttention(row_masks, a.tokens_per_identity, a.weights.tolist(),
                                                           a.mode))

    def prepare(self, call: "ModelCall") -> None:
        super().prepare(call)
        if not self.num_identities:
            return
        like = torch.empty(0, device=call.device, dtype=call.dtype)
        for attn in call.modules_of(self):
            self._project(attn, like, call.run)
        key_lengths = [t + self.num_identities * self.attention.tokens_per_identity for t in call.text_lengths]
        for hw in call.feature_sizes:
            for length in key_lengths:
                self.attention.prepare(hw, length, call.dtype, call.device)

    def _project(self, attn, like: torch.Tensor, run):
        def project():
            real = self.tokens.to(like.device, like.dtype).flatten(0, 1).unsqueeze(0)
            null = self.null_tokens.to(like.device, like.dtype)
            null = (null.flatten(0, 1) if null.ndim == 3 else null.repeat(self.num_identities, 1)).unsqueeze(0)
            return attn.to_k(real)[0], attn.to_v(real)[0], attn.to_k(null)[0], attn.to_v(null)[0]
        return self.cache.get(run, ("kv", attn, like.device, like.dtype), project)

    def identity_kv(self, attn, like: torch.Tensor, extra_options: dict):
        """``(rows, N·T, C)`` keys and values of the identities through block ``attn``'s ``to_k``/``to_v``: real
        identities on cond rows, the null identity on uncond rows; projected once per block and run."""
        kr, vr, kn, vn = self._project(attn, like, extra_options.get("sample_sigmas"))
        rows = like.shape[0]
        return (self.per_row(("k", attn, like.device, like.dtype), extra_options, rows, kr, kn),
                self.per_row(("v", attn, like.device, like.dtype), extra_options, rows, vr, vn))

    def __call__(self, attn, q, k, v, extra_options: dict, fn: Callable) -> torch.Tensor:
        k_ids, v_ids = self.identity_kv(attn, k, extra_options)
        attention = self.attention_for(extra_options, q.shape[0])
        return attention(q, torch.cat([k, k_ids], dim=1), torch.cat([v, v_ids], dim=1), extra_options["n_heads"],
                         tuple(extra_options["activations_shape"][-2:]), attention_fn=fn)


def attn2_modules(diffusion_model) -> dict:
    """``{(block_name, number, transformer_index): attn2}`` for every cross-attention of a UNet-shaped model
    (``input_blocks``, ``middle_block``, ``output_blocks``), found from the live module tree."""
    from comfy.ldm.modules.attention import SpatialTransformer
    found = {}
    groups = [("input", getattr(diffusion_model, "input_blocks", []))]
    if getattr(diffusion_model, "middle_block", None) is not None:
        groups.append(("middle", [diffusion_model.middle_block]))
    groups.append(("output", getattr(diffusion_model, "output_blocks", [])))
    for name, blocks in groups:
        for number, block in enumerate(blocks):
            for layer in block:
                if isinstance(layer, SpatialTransformer):
                    for idx, tb in enumerate(layer.transformer_blocks):
                        if getattr(tb, "attn2", None) is not None:
                            found[(name, number, idx)] = tb.attn2
    return found


BASES = {"SD15": ("Stable Diffusion 1.5", "SD1.5"), "SDXL": ("SDXL", "SDXL")}
"""ComfyUI model-config classes (``comfy.supported_models``) this pack knows: (long name, short name)."""


def live_topology(model, name: str = ""):
    """The core :class:`~instantfamily_core.faceid.Topology` of a ModelPatcher's (or a UNet's) cross-attentions,
    read from the live modules: each block's transformer count, width, heads, and the text width. Named after the
    published topology it equals (SD1.5, SDXL), else ``name`` or the model config's class."""
    from instantfamily_core.faceid import PUBLISHED, Topology
    diffusion_model = getattr(getattr(model, "model", None), "diffusion_model", model)
    modules = attn2_modules(diffusion_model)
    if not modules:
        raise ValueError("the model has no cross-attention blocks")
    sites = {key: (int(a.to_q.weight.shape[0]), int(a.heads)) for key, a in modules.items()}
    context = {int(a.to_k.weight.shape[1]) for a in modules.values()}
    res = getattr(diffusion_model, "num_res_blocks", None)
    res = int(res[0]) if isinstance(res, (list, tuple)) else int(res or 2)
    if len(context) != 1:
        raise ValueError(f"cross-attentions read text of several widths {sorted(context)}")
    config = getattr(getattr(model, "model", None), "model_config", None)
    family = BASES.get(type(config).__name__, (None, type(config).__name__))[1] if config is not None else \
        "SD-family"
    topo = Topology.from_sites(name or f"a non-standard {family} UNet", sites, context.pop(), res)
    known = PUBLISHED.get(topo.context_dim)
    if known is not None and (known.blocks, known.res_blocks) == (topo.blocks, topo.res_blocks):
        topo = known
    return topo


def sigma_of(extra_options: dict) -> Optional[float]:
    sigmas = extra_options.get("sigmas")
    return None if sigmas is None else float(sigmas.detach().flatten()[0])


class Attn2Hook:
    """The ``attn2`` replace patch of one model (UNet or ControlNet: their block keys overlap, so each model has
    its own hook bound to its own ``attn2`` modules).

    ``state``: the base rule (:class:`InstantFamilyAttention`) or ``None`` for plain attention; ``callback`` /
    ``kwargs``: additive rules in the IPAdapter-style protocol (see the module docstring)."""

    def __init__(self, state: Optional[InstantFamilyAttention], modules: dict):
        self.state = state
        self.modules = modules
        self.callback: list = []
        self.kwargs: list = []

    def add(self, callback: Callable, **kwargs) -> None:
        """Protocol entry: ``callback(out, q, k, v, extra_options, **kwargs)`` is added to the output while
        ``kwargs["sigma_end"] <= sigma <= kwargs["sigma_start"]`` (always, without those keys)."""
        self.callback.append(callback)
        self.kwargs.append(kwargs)

    def twin(self) -> "Attn2Hook":
        """A hook with the same rules and modules and its own callback lists (what a clone of the model gets)."""
        twin = Attn2Hook(self.state, self.modules)
        twin.callback, twin.kwargs = list(self.callback), list(self.kwargs)
        return twin

    def __deepcopy__(self, memo):  # ComfyUI before PR #12382 (0.3.64): clone() deep-copies model_options
        return self.twin()

    def __call__(self, q, k, v, extra_options):
        st = self.state
        fn = (st.attention_fn if st is not None else None) or comfy_attention(extra_options)
        if st is not None and st.active(extra_options):
            key = (extra_options["block"][0], extra_options["block"][1], extra_options["block_index"])
            out = st(self.modules[key], q, k, v, extra_options, fn)
        else:
            out = fn(q, k, v, extra_options["n_heads"])
        if self.callback:
            dtype = out.dtype
            foreign = [kw for cb, kw in zip(self.callback, self.kwargs) if not isinstance(cb, IdentityState)]
            sigma = sigma_of(extra_options) if any("sigma_start" in kw for kw in foreign) else None
            for callback, kw in zip(self.callback, self.kwargs):
                if isinstance(callback, IdentityState):  # our rules: their own gate, evaluated once per call
                    if not callback.active(extra_options):
                        continue
                elif sigma is not None and "sigma_start" in kw and not (
                        kw.get("sigma_end", 0.0) <= sigma <= kw["sigma_start"]):
                    continue
                out = out + callback(out, q, k, v, extra_options, **kw)
            out = out.to(dtype)
        return out

    def rules(self) -> list:
        """This hook's identity rules (base and additive)."""
        return ([self.state] if self.state is not None else []) + [
            cb for cb in self.callback if isinstance(cb, IdentityState)]


def _describe(patch) -> str:
    """``module.name`` of a patch: the function's own for functions, else its class's."""
    named = patch if hasattr(patch, "__qualname__") else type(patch)
    return f"{getattr(named, '__module__', '?')}.{named.__qualname__}"


def follows_protocol(patch) -> bool:
    return callable(getattr(patch, "add", None)) and isinstance(getattr(patch, "callback", None), list) \
        and isinstance(getattr(patch, "kwargs", None), list)


def install_hooks(model, state: Optional[InstantFamilyAttention], callbacks: tuple = (), owner: str = "InstantFamily"):
    """Put this pack's hook on every cross-attention block of ``model`` (a ModelPatcher, modified in place — pass a
    clone), with ``state`` as the base rule (``None`` keeps an existing one) and ``callbacks`` (``(fn, kwargs)``)
    added. Composes with what is there: our hook is copied and extended, a protocol patch's callbacks are taken
    over, anything else is replaced with one warning naming the blocks."""
    modules = attn2_modules(model.model.diffusion_model)
    to = model.model_options.setdefault("transformer_options", {})
    replace = to.setdefault("patches_replace", {}).setdefault("attn2", {})
    replaced = []
    for name, number in dict.fromkeys((n, b) for n, b, _ in modules):
        block_modules = {key: m for key, m in modules.items() if key[:2] == (name, number)}
        found = [(key, replace.pop(key)) for key in list(replace) if len(key) == 3 and key[:2] == (name, number)]
        if (name, number) in replace:
            found.append(((name, number), replace.pop((name, number))))
        hook = Attn2Hook(None, block_modules)
        for key, patch in found:
            if isinstance(patch, Attn2Hook):
                if patch.state is not None and state is not None and patch.state is not state:
                    replaced.append(f"{key} (an earlier InstantFamily apply)")
                hook.state = patch.state
                hook.modules = {**patch.modules, **block_modules}
                hook.callback += patch.callback
                hook.kwargs += patch.kwargs
            elif follows_protocol(patch):
                hook.callback += list(patch.callback)
                hook.kwargs += list(patch.kwargs)
            else:
                replaced.append(f"{key} ({_describe(patch)})")
        if state is not None:
            hook.state = state
        for fn, kwargs in callbacks:
            hook.add(fn, **kwargs)
        replace[(name, number)] = hook
    if replaced:
        logger.warning("%s: replaced attn2 patches that follow no known protocol (they compute the whole "
                       "attention, so they cannot run beside ours): %s", owner, ", ".join(replaced))
    _add_regions_wrapper(model)
    _add_clone_callback(model)
    return model


def _attn2_replace(model) -> dict:
    return model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})


def isolate_hooks(parent, clone) -> None:
    """``CallbacksMP.ON_CLONE`` callback: each :class:`Attn2Hook` that ``clone`` shares with ``parent`` (ComfyUI's
    dict/list-only copy of ``model_options``, PR #12382) is replaced in the clone by its :meth:`~Attn2Hook.twin`.
    Under a deep copy (ComfyUI 0.3.64, before that PR) nothing is shared and nothing changes. The clone's ``attn2``
    dict is its own under either rule; the parent's is never touched."""
    theirs = _attn2_replace(parent)
    mine = _attn2_replace(clone)
    if not theirs or mine is theirs:
        return
    for key, patch in list(mine.items()):
        if isinstance(patch, Attn2Hook) and theirs.get(key) is patch:
            mine[key] = patch.twin()


def _add_clone_callback(model) -> None:
    import comfy.patcher_extension as ext
    if isolate_hooks not in model.get_callbacks(ext.CallbacksMP.ON_CLONE, CLONE_KEY):
        model.add_callback_with_key(ext.CallbacksMP.ON_CLONE, CLONE_KEY, isolate_hooks)


def regions_wrapper(executor, model, conds, x_in, timestep, model_options):
    """``CALC_COND_BATCH`` wrapper: records the full latent size and each conditioning's latent area (by uuid) for
    the hooks, in a copy of ``model_options``."""
    areas = {}
    hw = tuple(int(s) for s in x_in.shape[-2:])
    for cond in conds:
        for c in cond or ():
            if "area" in c and "uuid" in c:
                a = list(c["area"])
                if len(a) == 4:  # (h, w, y, x) in latent cells, clipped as ComfyUI clips them
                    h, w, y, x = (int(v) for v in a)
                    areas[c["uuid"]] = (min(h, hw[0] - y), min(w, hw[1] - x), y, x)
    options = dict(model_options)
    transformer_options = model_options.get("transformer_options", {})
    options["transformer_options"] = {**transformer_options, REGIONS_KEY: {"latent_hw": hw, "areas": areas}}
    call = ModelCall(model, conds, x_in, timestep, transformer_options, areas)
    for rule in call.rules():
        rule.prepare(call)
    return executor(model, conds, x_in, timestep, options)


class ModelCall:
    """What the rules need to prepare one model call: the run, sigma, latent size, feature sizes, compute dtype and
    device, the text lengths the conditionings can batch to, and the attention modules each rule serves."""

    def __init__(self, model, conds, x_in, timestep, transformer_options: dict, areas: dict):
        self.run = transformer_options.get("sample_sigmas")
        self.sigmas = timestep
        self.latent_hw = tuple(int(s) for s in x_in.shape[-2:])
        self.device = x_in.device
        self.dtype = getattr(model, "manual_cast_dtype", None) or model.get_dtype()
        levels = len(getattr(getattr(model, "diffusion_model", None), "channel_mult", ()) or ()) or 8
        self.feature_sizes = feature_sizes(self.latent_hw)[:levels]
        self.text_lengths = text_lengths(conds)
        replace = transformer_options.get("patches_replace", {}).get("attn2", {})
        self.hooks = [h for h in replace.values() if isinstance(h, Attn2Hook)]

    def rules(self) -> list:
        return list({id(r): r for h in self.hooks for r in h.rules()}.values())

    def modules_of(self, rule) -> list:
        return list({id(m): m for h in self.hooks if rule in h.rules() for m in h.modules.values()}.values())


def feature_sizes(latent_hw: tuple[int, int]) -> list[tuple[int, int]]:
    """Every feature size a UNet makes from this latent (downsampling halves, rounding up)."""
    h, w = latent_hw
    sizes = [(h, w)]
    while (h, w) != (1, 1) and len(sizes) < 8:
        h, w = (h + 1) // 2, (w + 1) // 2
        sizes.append((h, w))
    return sizes


def text_lengths(conds) -> list[int]:
    """Context lengths of the conditionings and what ComfyUI's batching repeats them to (LCM, at most 4×)."""
    import math
    found = set()
    for cond in conds:
        for c in cond or ():
            cross = (c.get("model_conds") or {}).get("c_crossattn")
            tensor = getattr(cross, "cond", None)
            if isinstance(tensor, torch.Tensor) and tensor.ndim == 3:
                found.add(int(tensor.shape[1]))
    lengths = set(found)
    for a in found:
        for b in found:
            m = a * b // math.gcd(a, b)
            if m // min(a, b) <= 4:
                lengths.add(m)
    return sorted(lengths) or [77]


def _add_regions_wrapper(model) -> None:
    """One :func:`regions_wrapper` per model however many rules are chained: ``ModelPatcher.wrappers`` holds it
    (ComfyUI merges it into ``model_options`` only when sampling starts), and clones copy it."""
    import comfy.patcher_extension as ext
    if regions_wrapper not in model.get_wrappers(ext.WrappersMP.CALC_COND_BATCH, WRAPPER_KEY):
        model.add_wrapper_with_key(ext.WrappersMP.CALC_COND_BATCH, WRAPPER_KEY, regions_wrapper)


def patch_model(model, state: InstantFamilyAttention):
    """A clone of ``model`` (ModelPatcher) with the InstantFamily rule on every cross-attention block."""
    return install_hooks(model.clone(), state)
