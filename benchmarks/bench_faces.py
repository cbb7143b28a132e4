"""Face encoding cost: ms per face (detection + global embedding + local map) and a second run on the same images.

By default a tiny insightface-compatible pack (the generated ONNX stand-ins of ``tools/devkit/face_models.py``) is
written to a temporary folder and run through the REAL ``insightface.app.FaceAnalysis`` via the pack's
``FaceAnalyzer``: this measures the pipeline (insightface pre/post-processing, alignment, the local-map model, the
result cache), not the cost of real detector/recognizer weights — for that pass a real pack and photos:

    python benchmarks/bench_faces.py --out benchmarks/out/cpu
    python benchmarks/bench_faces.py --root ComfyUI/models/insightface --pack antelopev2 --images photos/

Each round makes fresh images (different pixels → no cache hit), encodes every image once (cold: detection,
alignment, recognizer, local map), then again (warm: the analyzer's per-image result cache), then runs only the
detector on the same images at ``det_size`` (insightface's ``det_model.detect``): first run minus detector = the
encoding stage per face (pixel hash, alignment, recognizer, local map; with photos also any retry at a smaller
detector size). Rounds alternate, median over rounds. One more pass on fresh images counts the rows fed to
onnxruntime outside the detector (``tools.devkit.onnx_runs``): recognizer passes per face. Times are wall-clock;
the per-face rows are also given in this process's CPU time (all threads; steadier than wall-clock when other
processes load the cores, though it counts onnxruntime's spinning threads too).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=None, help="insightface root holding models/<pack>/ (default: tiny pack)")
    p.add_argument("--pack", default="tinypack")
    p.add_argument("--images", default=None, help="folder of photos (with --root); default: generated images")
    p.add_argument("--provider", default="CPU")
    p.add_argument("--det-size", type=int, default=640)
    p.add_argument("--faces", type=int, default=3, help="faces per generated image")
    p.add_argument("--count", type=int, default=4, help="generated images per round")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def generated_images(count: int, faces: int, round_: int):
    import numpy as np
    from tools.devkit.face_models import draw_faces
    centers = [(160, 192), (480, 320), (320, 512), (512, 128), (128, 480), (320, 160)][:faces]
    rng = np.random.default_rng(round_)
    out = []
    for i in range(count):
        colors = [tuple(int(c) for c in rng.integers(0, 200, 3)) for _ in centers]
        img = draw_faces((640, 640), centers, colors, background=100 + (round_ * 7 + i) % 50)
        out.append(img)
    return out


def photo_images(folder: str):
    from instantfamily_core.faces.images import load_rgb
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))
    if not files:
        sys.exit(f"--images: no .jpg/.png/.webp files in {folder}")
    return [load_rgb(p) for p in files]


def main(argv=None):
    args = parse_args(argv)
    from instantfamily_core.faces import FaceAnalyzer
    tmp = None
    if args.root is None:
        from tools.devkit.face_models import make_tiny_pack
        tmp = tempfile.TemporaryDirectory(prefix="bench_faces_")
        root = Path(tmp.name)
        t0 = time.perf_counter()
        make_tiny_pack(root, args.pack)
        gen_s = time.perf_counter() - t0
    else:
        root, gen_s = Path(args.root), 0.0
    t0 = time.perf_counter()
    analyzer = FaceAnalyzer(root, args.pack, provider=args.provider, det_size=args.det_size)
    load_s = time.perf_counter() - t0

    photos = photo_images(args.images) if args.images else None
    cold_face, cold_img, warm_img, enc_face, faces_seen = [], [], [], [], []
    cold_face_cpu, enc_face_cpu = [], []
    det = analyzer.app.det_model
    analyzer.encode(photos[0] if photos else generated_images(1, args.faces, 10_000)[0], "warmup")
    for r in range(args.repeats):
        if photos:  # real photos cannot be made "fresh": drop the cache instead
            analyzer._cache.clear()
            images = photos
        else:
            images = generated_images(args.count, args.faces, r)
        nfaces = 0
        t0, c0 = time.perf_counter(), time.process_time()
        for i, img in enumerate(images):
            nfaces += len(analyzer.detect(img, f"image {i}"))
        cold, cold_cpu = time.perf_counter() - t0, time.process_time() - c0
        hits0 = analyzer.cache_hits
        t0 = time.perf_counter()
        for i, img in enumerate(images):
            analyzer.encode(img, f"image {i}", on_no_face="skip")
        warm = time.perf_counter() - t0
        t0, c0 = time.perf_counter(), time.process_time()
        for img in images:  # the detector alone, as the analyzer calls it at the prepared size
            det.detect(img[:, :, ::-1].copy(), input_size=(args.det_size, args.det_size), max_num=0, metric="default")
        det_only, det_only_cpu = time.perf_counter() - t0, time.process_time() - c0
        if analyzer.cache_hits - hits0 != len(images):
            print(f"warning: round {r}: {analyzer.cache_hits - hits0} cache hits for {len(images)} images")
        faces_seen.append(nfaces)
        cold_face.append(cold / max(nfaces, 1) * 1e3)
        cold_img.append(cold / len(images) * 1e3)
        warm_img.append(warm / len(images) * 1e3)
        enc_face.append((cold - det_only) / max(nfaces, 1) * 1e3)
        cold_face_cpu.append(cold_cpu / max(nfaces, 1) * 1e3)
        enc_face_cpu.append((cold_cpu - det_only_cpu) / max(nfaces, 1) * 1e3)

    from tools.devkit.onnx_runs import onnx_runs, outside_detector
    if photos:
        analyzer._cache.clear()
    counted = photos or generated_images(args.count, args.faces, args.repeats)
    with onnx_runs(det) as runs:
        counted_faces = sum(len(analyzer.detect(img, f"image {i}")) for i, img in enumerate(counted))
    rec_rows, rec_runs = sum(outside_detector(runs)), len(outside_detector(runs))
    passes = rec_rows / max(counted_faces, 1)

    cf, ci, wi = C.summarize(cold_face), C.summarize(cold_img), C.summarize(warm_img)
    ef = C.summarize(enc_face)
    cf_cpu, ef_cpu = C.summarize(cold_face_cpu), C.summarize(enc_face_cpu)
    env = C.environment("cpu")
    try:
        import insightface
        import onnxruntime
        env.update(insightface=insightface.__version__, onnxruntime=onnxruntime.__version__)
    except ImportError:
        pass
    def row(label, st, digits=2):
        return [label, f"{st['median']:.{digits}f}", f"{st['p25']:.{digits}f}–{st['p75']:.{digits}f}",
                f"{st['min']:.{digits}f}", f"{st['max']:.{digits}f}"]

    rows = [row("first run: ms per face (detect + align + global + local)", cf),
            row("first run minus detector: ms per face (hash + align + recognizer + local map)", ef),
            row("first run, CPU time: ms per face", cf_cpu),
            row("first run minus detector, CPU time: ms per face", ef_cpu),
            row("first run: ms per image", ci),
            row("second run, same images (encode, cached): ms per image", wi, 3)]
    what = (f"pack `{args.pack}` from {args.root}" if args.root else
            "tiny generated ONNX pack (pipeline cost only, not real SCRFD/ArcFace weights)")
    md = ["## Face encoding", "",
          f"{env['date']} · {env['cpu']} · onnxruntime {env.get('onnxruntime', '?')} · insightface "
          f"{env.get('insightface', '?')} · provider {args.provider} · det_size {args.det_size} · {what} · "
          f"{len(images)} images × ~{statistics.median(faces_seen) / len(images):.0f} faces each, {args.repeats} rounds", "",
          f"Pack generation {gen_s:.1f}s, analyzer load {load_s:.2f}s (once per process: `get_analyzer` caches it).",
          "", C.markdown_table(["measure", "median", "IQR", "min", "max"], rows), "",
          f"Second run / first run per image: {wi['median'] / ci['median']:.4f}× "
          f"(cache hits {analyzer.cache_hits}, misses {analyzer.cache_misses}).", "",
          f"Recognizer passes per face: {passes:.2f} ({rec_rows} crops in {rec_runs} onnxruntime runs outside the "
          f"detector, {counted_faces} faces in {len(counted)} images)."]
    C.write_outputs(args.out, "faces", "\n".join(md), {
        "environment": env, "pack": args.pack, "tiny": args.root is None, "load_s": load_s,
        "cold_ms_per_face": cf, "cold_ms_per_image": ci, "warm_ms_per_image": wi, "encode_ms_per_face": ef,
        "cold_cpu_ms_per_face": cf_cpu, "encode_cpu_ms_per_face": ef_cpu,
        "recognizer_passes_per_face": passes, "recognizer_runs": rec_runs, "recognizer_rows": rec_rows,
        "faces_per_round": faces_seen, "cache_hits": analyzer.cache_hits, "cache_misses": analyzer.cache_misses})
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
