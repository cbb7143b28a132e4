#!/usr/bin/env python
"""Check a ComfyUI + InstantFamily installation and say exactly what to fix.

    python tools/doctor.py [--comfyui /path/to/ComfyUI] [--json]

Run it with the Python that runs ComfyUI. ComfyUI is found via --comfyui, $COMFYUI_PATH, this pack sitting in
ComfyUI/custom_nodes, or ~/comfy/ComfyUI; model folders are ComfyUI's defaults plus extra_model_paths.yaml.
Prints one row per check (ok / warn / FAIL, with the fix under each problem) — the SD1.5 and SDXL model files
(FaceID, OpenPose ControlNets, base checkpoints, CLIP ViT-H) included — and which modes are ready (InstantFamily,
public weights on SD1.5, on SDXL); exits 0 when everything needed is there, 1 otherwise. The *InstantFamily
Doctor* node shows the same report inside ComfyUI.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from dataclasses import asdict
from pathlib import Path

if not __package__:  # run as a file, not as python -m tools.doctor
    import _bootstrap  # noqa: F401  (tools/_bootstrap.py: the repository root first on sys.path)

ROOT = Path(__file__).resolve().parents[1]


def load_doctor():
    """``instantfamily_core/doctor.py`` loaded on its own: the package's ``__init__`` imports torch, and a broken
    torch is one of the things the doctor must be able to report."""
    spec = importlib.util.spec_from_file_location("instantfamily_doctor", ROOT / "instantfamily_core" / "doctor.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--comfyui", default=None, help="the ComfyUI folder (default: found automatically)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    p.add_argument("--quiet", action="store_true", help="no 'checking …' lines on stderr")
    args = p.parse_args(argv)
    doctor = load_doctor()
    root, tried = doctor.find_comfyui(args.comfyui, ROOT)
    loc = doctor.locations_for(root)
    progress = None if args.quiet else (lambda name: print(f"checking {name} …", file=sys.stderr, flush=True))
    rows = doctor.run_checks(loc, tried, progress=progress)
    if args.json:
        print(json.dumps({"rows": [asdict(r) for r in rows], "exit_code": doctor.exit_code(rows)}, indent=1))
    else:
        print(doctor.format_report(rows))
    return doctor.exit_code(rows)


if __name__ == "__main__":
    sys.exit(main())
