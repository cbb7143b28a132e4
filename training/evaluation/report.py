"""Write the evaluation: Markdown + JSON + CSV tables, a PNG contact sheet and a similarity histogram.

Every file is written atomically with normal permissions (``instantfamily_core.fileio``: a temporary file in the same
folder, then ``os.replace``).
"""

from __future__ import annotations

import csv
import io
import json
import os

import numpy as np

from instantfamily_core.fileio import write_bytes_atomic, write_text_atomic

COLUMNS = [("SingleSim", "Identity (SingleSim) ↑"), ("MultiSim", "MultiSim ↑"), ("TextSim", "Text (CLIP) ↑"),
           ("MixingRate", "ID mixing ↓"), ("PlacementRate", "Placement ↑"), ("CountOK", "Face count OK ↑")]


def _fmt(x, digits=3):
    return "–" if x is None else (f"{x:.{digits}f}" if isinstance(x, float) else str(x))


def markdown(summary: dict, records: list[dict], meta: dict) -> str:
    m = summary["metrics"]
    lines = [f"# InstantFamily evaluation — {meta['label']}", "",
             f"Recognizer: **{meta['recognizer']}** (cosine similarity) · {summary['n_images']} images · "
             f"{meta['textsim']}", ""]
    if meta["recognizer"].startswith("dlib"):
        lines += ["> dlib 128-d scores are cosines like the paper's, but not numerically comparable to its "
                  "FaceNet numbers (different model); compare checkpoints with the same recognizer only.", ""]
    lines += ["| Method | Images | " + " | ".join(h for _, h in COLUMNS) + " |",
              "| --- | --- | " + " | ".join("---" for _ in COLUMNS) + " |",
              f"| {meta['label']} | {summary['n_images']} | " + " | ".join(m[k]["text"] for k, _ in COLUMNS) + " |",
              "", f"Faces detected {summary['faces_detected']} / expected {summary['faces_expected']}; images with "
              f"missing faces: {summary['images_with_missing_faces']}, with extra faces: "
              f"{summary['images_with_extra_faces']}.", "", "## Per image", "",
              "| case | image | faces (found/expected) | SingleSim | MultiSim | mixing | placement | TextSim | "
              "notes |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in records:
        notes = [] if r["count_ok"] else [r["count_message"]]
        notes += [f"{i['name']} missing" if i["matched_face"] is None else f"{i['name']} not in its slot"
                  for i in r["identities"] if i["placed_in_slot"] is False or i["matched_face"] is None]
        notes += [f"face {k} ({f['owner']}) looks like {f['closest_identity']}" for k, f in enumerate(r["faces"])
                  if f["mixed"]]
        lines.append(f"| {r['case_id']} | {os.path.basename(r['image'])} | {r['detected_faces']}/"
                     f"{r['expected_faces']} | {_fmt(r['single_sim_mean'])} | {_fmt(r['multisim'])} | "
                     f"{_fmt(r['mixing_rate'], 2)} | {_fmt(r['placement_rate'], 2)} | {_fmt(r['text_sim'])} | "
                     f"{'; '.join(notes)} |")
    return "\n".join(lines) + "\n"


def _csv(rows: list[list]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def summary_csv(summary: dict, label: str) -> str:
    rows = [["method", "metric", "mean", "std", "n", "mean_pm_std"]]
    rows += [[label, k, v["mean"], v["std"], v["n"], v["text"]] for k, v in summary["metrics"].items()]
    return _csv(rows)


def per_image_csv(records: list[dict]) -> str:
    names = sorted({i["name"] for r in records for i in r["identities"]})
    head = ["case_id", "image", "expected_faces", "detected_faces", "count_error", "single_sim_mean", "multisim",
            "mixing_rate", "placement_rate", "text_sim"]
    rows = [head + [f"sim_{n}" for n in names] + [f"placed_{n}" for n in names]]
    for r in records:
        by = {i["name"]: i for i in r["identities"]}
        rows.append([r[k] for k in head] + [by[n]["single_sim"] if n in by else "" for n in names]
                    + [by[n]["placed_in_slot"] if n in by else "" for n in names])
    return _csv(rows)


def _png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def contact_sheet(results, max_rows: int = 40) -> bytes:
    """One row per generated image: each identity's reference face next to its matched generated face."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = results[:max_rows] or []
    n_ids = max((len(r.ref_crops) for r in results), default=1)
    rows = max(len(results), 1)
    fig, axes = plt.subplots(rows, 2 * n_ids, figsize=(2.0 * 2 * n_ids, 2.3 * rows), squeeze=False)
    blank = np.full((112, 112, 3), 200, np.uint8)
    for ax in axes.ravel():
        ax.axis("off")
    for r_i, res in enumerate(results):
        rec = res.record
        for k, ident in enumerate(rec["identities"]):
            ref, gen = res.ref_crops[k], res.gen_crops[k]
            axes[r_i, 2 * k].imshow(ref if ref is not None else blank)
            axes[r_i, 2 * k].set_title(f"{rec['case_id']}\nref {ident['name']}", fontsize=7)
            axes[r_i, 2 * k + 1].imshow(gen if gen is not None else blank)
            slot = {True: " in slot", False: " WRONG SLOT", None: ""}[ident["placed_in_slot"]]
            title = "missing" if gen is None else f"sim {ident['single_sim']:.3f}{slot}"
            axes[r_i, 2 * k + 1].set_title(title, fontsize=7,
                                           color="red" if gen is None or ident["placed_in_slot"] is False else "k")
    fig.tight_layout()
    data = _png_bytes(fig)
    plt.close(fig)
    return data


def histogram(results, recognizer: str) -> bytes:
    """Own similarities (reference vs its matched face) against cross similarities (vs other identities)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    own = [s for r in results for j, s in zip(r.record["identities"], r.own_sims) if j["matched_face"] is not None]
    cross = [s for r in results for s in r.cross_sims]
    fig, ax = plt.subplots(figsize=(6, 4))
    allv = own + cross
    bins = np.linspace(min(allv, default=-1.0), max(allv, default=1.0) + 1e-6, 31)
    if own:
        ax.hist(own, bins=bins, alpha=0.6, label=f"own identity (n={len(own)})")
    if cross:
        ax.hist(cross, bins=bins, alpha=0.6, label=f"other identities (n={len(cross)})")
    ax.set_xlabel(f"cosine similarity ({recognizer})")
    ax.set_ylabel("faces")
    ax.set_title("Generated face vs reference similarity")
    if own or cross:
        ax.legend()
    fig.tight_layout()
    data = _png_bytes(fig)
    plt.close(fig)
    return data


def write_all(out_dir: str, results, summary: dict, meta: dict, sheet_rows: int = 40) -> dict[str, str]:
    """Write every output file; returns {kind: path}."""
    records = [r.record for r in results]
    paths = {k: os.path.join(out_dir, f) for k, f in (
        ("markdown", "summary.md"), ("json", "summary.json"), ("csv", "summary.csv"),
        ("per_image_csv", "per_image.csv"), ("contact_sheet", "contact_sheet.png"),
        ("histogram", "similarity_hist.png"))}
    write_text_atomic(paths["markdown"], markdown(summary, records, meta))
    write_text_atomic(paths["json"], json.dumps({"meta": meta, "summary": summary, "images": records}, indent=2,
                                                ensure_ascii=False))
    write_text_atomic(paths["csv"], summary_csv(summary, meta["label"]))
    write_text_atomic(paths["per_image_csv"], per_image_csv(records))
    write_bytes_atomic(paths["contact_sheet"], contact_sheet(results, sheet_rows))
    write_bytes_atomic(paths["histogram"], histogram(results, meta["recognizer"]))
    return paths
