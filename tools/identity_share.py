#!/usr/bin/env python
"""Identity share: the attention mass the face tokens take inside their mask, in a training row against inference.

A one-face training row has N slots, N − 1 of them padding (null tokens, all-zero masks); inference has only the
one identity. Both must give the identity the same share, or the model trains under one attention budget and runs
under another (issue 9: paper mode gave 0.235 in training against 0.399 at inference before padding keys were
excluded). Random queries and keys at SD1.5's widths (8 heads of 40, 77 text tokens, 50 tokens per identity).

    python tools/identity_share.py [--slots 4] [--rows 8]
"""

from __future__ import annotations

import argparse
import sys

import torch

if not __package__:  # run as a file, not as python -m tools.identity_share
    import _bootstrap  # noqa: F401  (tools/_bootstrap.py: the repository root first on sys.path)

from instantfamily_core.attention import MODES, MaskedCrossAttention  # noqa: E402

TEXT, T, HEADS, DH, HW = 77, 50, 8, 40, (16, 16)


def share(mode: str, slots: int, training: bool, rows: int, seed: int = 0) -> float:
    """Mean attention mass on the identity's keys over the queries inside its mask."""
    g = torch.Generator().manual_seed(seed)
    face = torch.zeros(*HW)
    face[4:10, 5:11] = 1
    out = []
    for _ in range(rows):
        q = torch.randn(1, HW[0] * HW[1], HEADS * DH, generator=g)
        text, ident, null = (torch.randn(1, n, HEADS * DH, generator=g) for n in (TEXT, T, T))
        if training:  # the face in slot 1, padding elsewhere
            masks = torch.zeros(1, slots, *HW)
            masks[0, 1 % slots] = face
            k = torch.cat([text] + [ident if s == 1 % slots else null for s in range(slots)], 1)
            start = TEXT + (1 % slots) * T
        else:
            masks, k, start = face[None], torch.cat([text, ident], 1), TEXT
        v = torch.zeros_like(k)
        v[:, start:start + T] = 1.0  # value 1 on the identity's keys: the output is its attention mass
        a = MaskedCrossAttention(masks, T, mode=mode)(q, k, v, HEADS, HW)[0, :, 0]
        out.append(a[face.flatten() > 0].mean())
    return float(torch.stack(out).mean())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slots", type=int, default=4)
    p.add_argument("--rows", type=int, default=8)
    args = p.parse_args(argv)
    for mode in MODES:
        print(f"{mode:9s} training (1 face, {args.slots} slots) {share(mode, args.slots, True, args.rows):.3f}   "
              f"inference (1 identity) {share(mode, args.slots, False, args.rows):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
