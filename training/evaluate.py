#!/usr/bin/env python
"""Evaluate generated multi-identity images: identity similarity, MultiSim, mixing, placement, TextSim.

    python training/evaluate.py --cases cases.json --images outputs/ckpt-5000 --recognizer dlib \
        --out eval/ckpt-5000 [--clip-model models/clip-vit-large-patch14] [--label ckpt-5000]

Writes summary.md / summary.json / summary.csv / per_image.csv / contact_sheet.png / similarity_hist.png to
``--out``. See ``docs/evaluation.md`` for the cases file format and the metric definitions.
"""

from __future__ import annotations

import argparse
import os
import sys

if not __package__:  # run as a file, not as python -m training.evaluate
    import _bootstrap  # noqa: F401  (training/_bootstrap.py: the repository root first on sys.path)

from instantfamily_core.errors import InstantFamilyError  # noqa: E402
from training.evaluation.cases import load_cases  # noqa: E402
from training.evaluation.pipeline import evaluate_cases, summarize  # noqa: E402
from training.evaluation.recognizers import parse_recognizer  # noqa: E402
from training.evaluation.report import write_all  # noqa: E402
from training.evaluation.textsim import make_text_scorer  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", required=True, help="cases file (.json or .jsonl)")
    p.add_argument("--images", default=None,
                   help="folder of generated images named <case id>.png, <case id>_<n>.png or <case id>/*.png")
    p.add_argument("--recognizer", default="dlib",
                   help="dlib[:mtcnn|:hog] | insightface:<root>:<pack> | facenet:<weights.pt> (default: dlib)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--clip-model", default=None, help="local transformers CLIP folder for TextSim (optional)")
    p.add_argument("--label", default=None, help="row label in the table (default: the --images folder name)")
    p.add_argument("--sheet-rows", type=int, default=40, help="at most this many images on the contact sheet")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cases = load_cases(args.cases)
        recognizer = parse_recognizer(args.recognizer)
        scorer, text_msg = make_text_scorer(args.clip_model)
        print(text_msg, file=sys.stderr)
        results = evaluate_cases(cases, recognizer, args.images, os.path.dirname(os.path.abspath(args.cases)),
                                 scorer, progress=not args.no_progress)
        summary = summarize(results)
        label = args.label or os.path.basename(os.path.normpath(args.images or args.cases))
        meta = {"label": label, "recognizer": recognizer.name, "recognizer_spec": args.recognizer,
                "cases": os.path.abspath(args.cases), "images": args.images,
                "textsim": text_msg if scorer is None else f"TextSim: CLIP {scorer.name}",
                "similarity": "cosine"}
        paths = write_all(args.out, results, summary, meta, args.sheet_rows)
    except InstantFamilyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    m = summary["metrics"]
    print(" · ".join(f"{k} {v['text']}" for k, v in m.items()))
    for r in results:
        if not r.record["count_ok"]:
            print(f"count: {r.record['case_id']} {os.path.basename(r.record['image'])}: "
                  f"{r.record['count_message']}")
    print(f"wrote {', '.join(paths.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
