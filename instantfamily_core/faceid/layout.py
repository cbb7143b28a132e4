"""Where each ``ip_adapter.<p>.*`` weight of an SD1.5 IP-Adapter-FaceID file belongs.

The reference (tencent-ailab/IP-Adapter ``ip_adapter_faceid.py``) saves ``ModuleList(unet.attn_processors.values())``,
so ``p`` is the position of the processor in diffusers' order: for transformer block ``b`` (in the order of
:data:`SD15_TRANSFORMERS`: ``down_blocks`` before ``up_blocks`` before ``mid_block``, as ``UNet2DConditionModel``
registers them) ``p = 2b`` is its self-attention ``attn1`` and ``p = 2b + 1`` its cross-attention ``attn2``.

ComfyUI names the same blocks ``("input", n)``, ``("middle", 0)``, ``("output", n)`` (``extra_options["block"]``
in an attn2 patch); the middle block is ``("middle", 0)``.
"""

from __future__ import annotations

from dataclasses import dataclass

CROSS_ATTENTION_DIM = 768
LORA_RANK = 128
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out")


@dataclass(frozen=True)
class TransformerSlot:
    """One SD1.5 transformer block: its diffusers path, ComfyUI block key and width."""

    index: int  # b: position in diffusers' processor order
    diffusers: str  # e.g. "down_blocks.0.attentions.0"
    block: tuple  # ComfyUI ("input", 1) / ("middle", 0) / ("output", 3)
    hidden: int  # inner width of the block's attention (to_q output)

    @property
    def attn1(self) -> int:
        return 2 * self.index

    @property
    def attn2(self) -> int:
        return 2 * self.index + 1

    def attention_path(self, which: int) -> str:
        """diffusers module path of attn1 (``which=1``) or attn2 (``which=2``)."""
        return f"{self.diffusers}.transformer_blocks.0.attn{which}"


def _sd15_slots() -> tuple:
    slots = []
    # down_blocks.{0,1,2}.attentions.{0,1} = ldm input_blocks 1,2 / 4,5 / 7,8
    for level, width in enumerate((320, 640, 1280)):
        for i in range(2):
            slots.append((f"down_blocks.{level}.attentions.{i}", ("input", 1 + 3 * level + i), width))
    # up_blocks.{1,2,3}.attentions.{0,1,2} = ldm output_blocks 3..5 / 6..8 / 9..11 (up_blocks.0 has none)
    for level, width in zip((1, 2, 3), (1280, 640, 320)):
        for i in range(3):
            slots.append((f"up_blocks.{level}.attentions.{i}", ("output", 3 * level + i), width))
    slots.append(("mid_block.attentions.0", ("middle", 0), 1280))
    return tuple(TransformerSlot(b, path, block, width) for b, (path, block, width) in enumerate(slots))


SD15_TRANSFORMERS: tuple = _sd15_slots()
NUM_PROCESSORS = 2 * len(SD15_TRANSFORMERS)  # 32
BY_BLOCK: dict = {s.block: s for s in SD15_TRANSFORMERS}
ATTN2_INDICES = tuple(s.attn2 for s in SD15_TRANSFORMERS)  # 1, 3, …, 31


def slot_for_block(block) -> TransformerSlot | None:
    """The SD1.5 transformer of a ComfyUI block key (2- or 3-part; the transformer index must be 0)."""
    key = (str(block[0]), int(block[1]))
    if len(block) > 2 and int(block[2]) != 0:
        return None
    return BY_BLOCK.get(key)


def processor_width(p: int) -> tuple[int, int]:
    """``(in_features, hidden)`` of processor ``p``'s k/v projections (attn2 reads the 768-d text)."""
    slot = SD15_TRANSFORMERS[p // 2]
    return (CROSS_ATTENTION_DIM if p % 2 else slot.hidden), slot.hidden


def lora_to_comfy(ip_adapter: dict) -> dict:
    """The embedded LoRA (``<p>.to_X_lora.{down,up}.weight``) renamed to the diffusers-LoRA keys ComfyUI's loader
    maps onto the UNet: ``unet.<attention path>.processor.to_X_lora.{down,up}.weight`` (``to_out`` → ``to_out.0``).
    Non-LoRA keys (``to_k_ip``/``to_v_ip``) are not included."""
    out = {}
    for key, value in ip_adapter.items():
        parts = key.split(".")
        if len(parts) != 4 or not parts[1].endswith("_lora") or parts[3] != "weight":
            continue
        p = int(parts[0])
        slot = SD15_TRANSFORMERS[p // 2]
        path = slot.attention_path(1 + p % 2)
        out[f"unet.{path}.processor.{parts[1]}.{parts[2]}.weight"] = value
    return out
