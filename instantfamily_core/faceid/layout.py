"""Where each ``ip_adapter.<p>.*`` weight of an IP-Adapter file belongs, for any UNet of the SD family.

A :class:`Topology` describes a UNet's cross-attentions: for each ComfyUI block ``("input", n)``, ``("middle", 0)``,
``("output", n)`` that has a ``SpatialTransformer``, its width, its number of transformer blocks (depth) and heads,
plus the text-context width. The node layer reads it from the live model (:meth:`Topology.from_sites`); the
published files' topologies (:data:`PUBLISHED`, SD1.5 and SDXL) are facts about those files, checked in the tests
against ComfyUI's own full-size UNets. Everything else — processor indices, LoRA key names, expected file layouts —
is derived from a topology by one rule:

* the reference (tencent-ailab/IP-Adapter, InstantID) saves ``ModuleList(unet.attn_processors.values())``, and
  diffusers' ``UNet2DConditionModel`` registers ``down_blocks`` before ``up_blocks`` before ``mid_block``; so with
  transformer blocks ``b`` numbered over input blocks, then output blocks (ascending), then the middle block, each
  in transformer-index order, ``p = 2b`` is block b's self-attention ``attn1`` and ``p = 2b + 1`` its cross-attention
  ``attn2`` (SD1.5: 16 transformers, 32 processors; SDXL: 70 and 140);
* diffusers paths: input block ``n`` is ``down_blocks.{(n-1)//(r+1)}.attentions.{(n-1)%(r+1)}``, output block ``n``
  is ``up_blocks.{n//(r+1)}.attentions.{n%(r+1)}``, the middle block ``mid_block.attentions.0`` (``r`` = resnets
  per level), then ``.transformer_blocks.{j}``.

ComfyUI hands an attn2 patch ``extra_options["block"]`` (2-part) and ``["block_index"]`` (the transformer index);
the middle block is ``("middle", 0)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

LORA_RANK = 128
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out")
_ORDER = {"input": 0, "output": 1, "middle": 2}


@dataclass(frozen=True)
class TransformerSlot:
    """One transformer block (attn1 + attn2): processor position, ComfyUI key, diffusers path, width, heads."""

    index: int  # b: position in diffusers' processor order
    block: tuple  # ComfyUI 3-part key ("input", 4, j) / ("middle", 0, j) / ("output", 3, j)
    diffusers: str  # e.g. "down_blocks.1.attentions.0.transformer_blocks.1"
    hidden: int  # inner width of the block's attention (to_q output)
    heads: int

    @property
    def attn1(self) -> int:
        return 2 * self.index

    @property
    def attn2(self) -> int:
        return 2 * self.index + 1

    def attention_path(self, which: int) -> str:
        """diffusers module path of attn1 (``which=1``) or attn2 (``which=2``)."""
        return f"{self.diffusers}.attn{which}"


def _diffusers_path(name: str, number: int, res_blocks: int) -> str:
    per = res_blocks + 1
    if name == "input":
        return f"down_blocks.{(number - 1) // per}.attentions.{(number - 1) % per}"
    if name == "output":
        return f"up_blocks.{number // per}.attentions.{number % per}"
    return "mid_block.attentions.0"


@dataclass(frozen=True)
class Topology:
    """The cross-attention layout of a UNet: ``blocks`` maps ``(name, number)`` to ``(hidden, depth, heads)``."""

    name: str
    context_dim: int
    blocks: dict
    res_blocks: int = 2
    slots: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        order = sorted(self.blocks, key=lambda k: (_ORDER[k[0]], int(k[1])))
        slots = []
        for name, number in order:
            hidden, depth, heads = self.blocks[(name, number)]
            base = _diffusers_path(name, int(number), self.res_blocks)
            for j in range(depth):
                slots.append(TransformerSlot(len(slots), (name, int(number), j), f"{base}.transformer_blocks.{j}",
                                             int(hidden), int(heads)))
        object.__setattr__(self, "slots", tuple(slots))
        object.__setattr__(self, "_by_block", {s.block: s for s in slots})

    @classmethod
    def from_sites(cls, name: str, sites: dict, context_dim: int, res_blocks: int = 2) -> "Topology":
        """From a live model's cross-attentions ``{(name, number, j): (hidden, heads)}``; every block's transformer
        indices must run 0..depth-1."""
        blocks: dict = {}
        for (block, number, j), (hidden, heads) in sites.items():
            blocks.setdefault((block, int(number)), []).append((int(j), int(hidden), int(heads)))
        desc = {}
        for key, entries in blocks.items():
            entries.sort()
            if [j for j, _, _ in entries] != list(range(len(entries))) or len({(h, n) for _, h, n in entries}) != 1:
                raise ValueError(f"block {key}: transformer indices/widths {entries} are not one uniform stack")
            desc[key] = (entries[0][1], len(entries), entries[0][2])
        return cls(name, int(context_dim), desc, int(res_blocks))

    @property
    def num_processors(self) -> int:
        return 2 * len(self.slots)

    @property
    def attn2_indices(self) -> tuple:
        return tuple(s.attn2 for s in self.slots)

    def slot(self, block) -> TransformerSlot | None:
        """The transformer of a ComfyUI key: 3-part, or 2-part meaning transformer index 0."""
        key = (str(block[0]), int(block[1]), int(block[2]) if len(block) > 2 else 0)
        return self._by_block.get(key)

    def processor_width(self, p: int) -> tuple[int, int]:
        """``(in_features, hidden)`` of processor ``p``'s k/v projections (attn2 reads the text context)."""
        slot = self.slots[p // 2]
        return (self.context_dim if p % 2 else slot.hidden), slot.hidden

    def widths(self) -> list[int]:
        return sorted({s.hidden for s in self.slots})

    def describe(self) -> str:
        return (f"{self.name} ({len(self.slots)} cross-attentions at {'/'.join(map(str, self.widths()))}, "
                f"{self.context_dim}-d text)")

    def differences(self, other: "Topology") -> list[str]:
        """What differs from ``other`` (empty when both address the same processors at the same widths)."""
        out = []
        if self.context_dim != other.context_dim:
            out.append(f"text width {self.context_dim} vs {other.context_dim}")
        if len(self.slots) != len(other.slots):
            out.append(f"{len(self.slots)} vs {len(other.slots)} cross-attentions")
        for a, b in zip(self.slots, other.slots):
            if (a.block, a.hidden) != (b.block, b.hidden):
                out.append(f"processor {a.attn2}: {a.block} {a.hidden} wide vs {b.block} {b.hidden} wide")
                break
        return out


def _published(name: str, context_dim: int, heads, blocks: dict) -> Topology:
    return Topology(name, context_dim, {k: (w, d, heads(w)) for k, (w, d) in blocks.items()})


SD15 = _published("SD1.5", 768, lambda w: 8, {
    **{("input", n): (w, 1) for n, w in ((1, 320), (2, 320), (4, 640), (5, 640), (7, 1280), (8, 1280))},
    ("middle", 0): (1280, 1),
    **{("output", n): (1280 if n < 6 else 640 if n < 9 else 320, 1) for n in range(3, 12)}})
"""SD1.5 (ComfyUI ``SD15``): one transformer in input 1,2 / 4,5 / 7,8, the middle, output 3..11; 8 heads."""

SDXL = _published("SDXL", 2048, lambda w: w // 64, {
    ("input", 4): (640, 2), ("input", 5): (640, 2), ("input", 7): (1280, 10), ("input", 8): (1280, 10),
    ("middle", 0): (1280, 10),
    **{("output", n): (1280, 10) for n in range(3)}, **{("output", n): (640, 2) for n in range(3, 6)}})
"""SDXL base (ComfyUI ``SDXL``): 70 cross-attentions, heads of 64, 2048-d context (the concatenated text)."""

PUBLISHED = {t.context_dim: t for t in (SD15, SDXL)}
"""The published IP-Adapter files' bases, told apart by the text width their ``to_k_ip`` reads."""


def lora_to_comfy(ip_adapter: dict, topology: Topology) -> dict:
    """The embedded LoRA (``<p>.to_X_lora.{down,up}.weight``) renamed to the diffusers-LoRA keys ComfyUI's loader
    maps onto the UNet: ``unet.<attention path>.processor.to_X_lora.{down,up}.weight`` (``to_out`` → ``to_out.0``).
    Non-LoRA keys (``to_k_ip``/``to_v_ip``) are not included."""
    out = {}
    for key, value in ip_adapter.items():
        parts = key.split(".")
        if len(parts) != 4 or not parts[1].endswith("_lora") or parts[3] != "weight":
            continue
        p = int(parts[0])
        path = topology.slots[p // 2].attention_path(1 + p % 2)
        out[f"unet.{path}.processor.{parts[1]}.{parts[2]}.weight"] = value
    return out
