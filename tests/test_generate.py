"""The generate CLI (``training/generate.py``): same images as the ComfyUI nodes on the same seed, seeds and
batching, resume, training folders as input, generate → evaluate end to end, and bad input.

The ComfyUI side is the real host: the pack loaded through ComfyUI's loader, *Face Analysis Loader* → *Encode
Identity* → *Pose to Masks* → *Apply InstantFamily* → ComfyUI's ``KSampler`` (``euler``, ``simple``), on the same
tiny random SD1.5-architecture model file the CLI loads with diffusers (``write_tiny_setup``) and the tiny ONNX
face pack. Text embeddings are given to both sides (the tiny text encoder is not one ComfyUI can load).

Tolerance: 1e-5 of the latents' largest magnitude (the random tiny model's latents reach ~50) after 4 sampling
steps, fp32 on CPU: the two sides share weights and inputs, not code (attention kernels, convolution layouts, the
σ ↔ timestep round trip), and a batch of B rows differs from B single rows by float rounding of the same size."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tools.devkit.comfy_host import HOW_TO_PROVIDE, find_comfyui

pytest.importorskip("diffusers", reason="the generate CLI needs diffusers: pip install diffusers accelerate")
pytestmark = pytest.mark.skipif(find_comfyui() is None, reason=HOW_TO_PROVIDE)

REL_TOL = 1e-5
SIZE = 64          # image side; latent 8×8
STEPS = 4
COLOURS = [(0, 200, 0), (0, 0, 200), (200, 200, 0)]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Tiny base + exported checkpoint, tiny face pack, reference photos, a cases file with a pose case, a boxes
    case and a slot-less (template) case."""
    from tools.devkit.face_models import session_tiny_root
    from support.tiny_sd15 import write_tiny_setup
    root = tmp_path_factory.mktemp("generate")
    setup = write_tiny_setup(root / "base", seed=5, unet={"block_out_channels": [320, 640]})
    face_root = session_tiny_root(tmp_path_factory)
    cases_file = write_cases(root, solo=True)
    return {"root": root, "setup": setup, "face_root": face_root, "cases": cases_file}


def write_cases(root, solo: bool) -> Path:
    """``root/cases/cases.json`` with reference photos and a pose: a pose case (person order reversed, one person
    with two photos), a boxes case and, with ``solo``, a slot-less (template) case."""
    from PIL import Image

    from support.poses import frame, person
    from tools.devkit.face_models import draw_faces
    refs = root / "cases" / "refs"
    refs.mkdir(parents=True)
    for i, c in enumerate(COLOURS):
        Image.fromarray(draw_faces((256, 256), [(128, 128)], [c])).save(refs / f"p{i}.png")
    pose = frame([person(18, 20, s=6), person(46, 22, s=6)], w=SIZE, h=SIZE)
    (root / "cases" / "pair.pose.json").write_text(json.dumps(pose))
    cases = {"cases": [
        {"id": "pair", "prompt": "two people", "identities": [{"name": "a", "images": ["refs/p0.png"]},
                                                              {"name": "b", "images": ["refs/p1.png", "refs/p2.png"]}],
         "slots": {"pose": "pair.pose.json", "identity_order": [1, 0]}},
        {"id": "boxes", "prompt": "two people, boxes", "identities": [{"name": "a", "images": ["refs/p0.png"]},
                                                                      {"name": "c", "images": ["refs/p2.png"]}],
         "slots": {"boxes": [[0.05, 0.1, 0.45, 0.5], [0.55, 0.2, 0.95, 0.6]], "units": "relative"}},
    ] + ([{"id": "solo", "prompt": "one person", "identities": [{"name": "b", "images": ["refs/p1.png"]}]}]
         if solo else [])}
    cases_file = root / "cases" / "cases.json"
    cases_file.write_text(json.dumps(cases))
    return cases_file


def cli_args(ws, out, *extra):
    s = ws["setup"]
    return ["--cases", str(ws["cases"]), "--checkpoint", str(s.checkpoint), "--base", str(s.single_file),
            "--config-dir", str(s.config_dir), "--face-root", str(ws["face_root"]), "--det-size", "256",
            "--out", str(out), "--width", str(SIZE), "--height", str(SIZE), "--steps", str(STEPS),
            "--no-progress", *extra]


@pytest.fixture(scope="module")
def gen(ws):
    """The CLI's loaded models (what ``run`` builds), for direct calls."""
    from instantfamily_core.checkpoint import load_checkpoint
    from instantfamily_core.faces import get_analyzer
    from training import generate
    from training.model import load_controlnet_from_checkpoint
    from training.sd15 import load_base
    s = ws["setup"]
    ckpt = load_checkpoint(str(s.checkpoint))
    comps = load_base(s.single_file, None, s.config_dir)
    g = generate.Generator(comps, ckpt.projector, load_controlnet_from_checkpoint(ckpt), ckpt.meta.mask_mode,
                           torch.device("cpu"), torch.float32, comps.scheduler_config)
    cases = {c.id: c for c in generate.load_cases(str(ws["cases"]))}
    analyzer = get_analyzer(ws["face_root"], "tinypack", "CPU", 256)
    return g, cases, analyzer


def _case_inputs(gen, case_id):
    from training import generate
    g, cases, analyzer = gen
    case = cases[case_id]
    return case, generate.case_layout(case, SIZE, SIZE), generate.encode_identities(analyzer, case)


# ---------------------------------------------------------------------------------------------------------------
# against ComfyUI

@pytest.fixture(scope="module")
def host(ws):
    from tools.devkit.comfy_host import import_host, load_pack
    nodes = import_host()
    pack = load_pack()
    import comfy.sd
    import folder_paths
    folder_paths.add_model_folder_path("insightface", str(ws["face_root"]))
    mods = {m: sys.modules[f"{pack.__name__}.nodes.{m}"] for m in ("model_nodes", "pose_nodes", "face_nodes")}
    model = comfy.sd.load_checkpoint_guess_config(str(ws["setup"].single_file), output_vae=False,
                                                  output_clip=False)[0]
    return nodes, mods, model


def test_schedule_is_comfyuis_simple_schedule(host):
    """The CLI's timesteps are the σ grid of ComfyUI's ``simple`` scheduler, read through ComfyUI's own
    model sampling (σ ↔ t), for step counts that divide 1000 and ones that do not."""
    import comfy.samplers
    from training import generate
    _, _, model = host
    ms = model.get_model_object("model_sampling")
    for steps in (1, 4, 7, 20, 30):
        config = Path(generate.__file__).parent / "configs" / "sd15" / "scheduler" / "scheduler_config.json"
        sched = generate.EulerSimpleScheduler(json.loads(config.read_text()))
        sched.set_timesteps(steps)
        comfy_sigmas = comfy.samplers.calculate_sigmas(ms, "simple", steps)
        assert float(comfy_sigmas[-1]) == 0.0
        comfy_t = [int(ms.timestep(s)) for s in comfy_sigmas[:-1]]
        assert sched.timesteps.tolist() == comfy_t
        a = sched.alphas_cumprod[sched.timesteps]
        torch.testing.assert_close(((1 - a) / a).sqrt().float(), comfy_sigmas[:-1], rtol=1e-5, atol=0)


def _comfy_latents(host, ws, case, seed, text, uncond, cfg):
    """The case through the ComfyUI nodes and KSampler(euler, simple); latents in model space."""
    from PIL import Image
    nodes, m, model = host
    fa = m["face_nodes"].FaceAnalysisLoader().load("tinypack", "CPU", 256)[0]
    ids = None
    for ident in case.identities:
        imgs = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).float() / 255
                            for p in ident.images])
        ids = m["face_nodes"].EncodeIdentity().encode(fa, imgs, ident.name, "error", ids)[0]
    pose = json.loads(Path(case.slots.source).read_text())
    order = ",".join(str(i) for i in case.slots.identity_order)
    pose_image, masks, _ = m["pose_nodes"].PoseToMasks().run(ids, "none (use pose_keypoint)", SIZE, SIZE,
                                                             case.slots.margin, order, pose_keypoint=pose)
    ifmodel = m["model_nodes"].load_instantfamily(str(ws["setup"].checkpoint))
    patched, pos, neg = m["model_nodes"].ApplyInstantFamily().apply(
        model, ifmodel, ids, pose_image, masks, [[text, {}]], [[uncond, {}]], 1.0, "", 1.0, 0.0, 1.0, "checkpoint")
    latent = {"samples": torch.zeros(1, 4, SIZE // 8, SIZE // 8)}
    samples = nodes.common_ksampler(patched, seed, STEPS, cfg, "euler", "simple", pos, neg, latent)[0]["samples"]
    scale = model.get_model_object("latent_format").scale_factor
    return samples * scale, ids, pose_image, masks


@pytest.mark.parametrize("seed,cfg", [(7, 5.0), (123456, 1.5)])
def test_generate_matches_the_comfyui_nodes(host, ws, gen, seed, cfg):
    g = gen[0]
    case, layout, ids = _case_inputs(gen, "pair")
    text, uncond = g.text([case.prompt]), g.text([""])
    comfy, comfy_ids, pose_image, comfy_masks = _comfy_latents(host, ws, case, seed, text, uncond, cfg)
    # the inputs agree exactly: identities (Encode Identity), masks and control image (Pose to Masks)
    for a, b in zip(ids, comfy_ids):
        assert torch.equal(a.global_embedding, b.global_embedding) and torch.equal(a.local_map, b.local_map)
    assert torch.equal(layout.masks, comfy_masks)
    assert np.array_equal(layout.control, (pose_image[0].numpy() * 255).round().astype(np.uint8))
    ours = g.latents([case.prompt], "", [ids], [layout.masks], [layout.control], [seed], STEPS, cfg)
    assert ours.shape == comfy.shape
    scale = comfy.abs().max().item()
    diff = (ours - comfy).abs().max().item()
    assert diff < REL_TOL * scale, (diff, scale)
    # not a comparison of two identity-blind samplers: swapping the identities moves the result far
    swapped = g.latents([case.prompt], "", [ids[::-1]], [layout.masks], [layout.control], [seed], STEPS, cfg)
    assert (swapped - comfy).abs().max().item() > 100 * REL_TOL * scale


# ---------------------------------------------------------------------------------------------------------------
# seeds, batching, layouts

def test_batches_equal_single_images_and_seeds_differ(gen):
    g = gen[0]
    pair, pair_layout, pair_ids = _case_inputs(gen, "pair")
    boxes, boxes_layout, boxes_ids = _case_inputs(gen, "boxes")
    rows = [(pair, pair_layout, pair_ids, 3), (boxes, boxes_layout, boxes_ids, 3), (pair, pair_layout, pair_ids, 4)]
    batch = g.latents([r[0].prompt for r in rows], "", [r[2] for r in rows], [r[1].masks for r in rows],
                      [r[1].control for r in rows], [r[3] for r in rows], STEPS, 5.0)
    single = torch.cat([g.latents([c.prompt], "", [i], [lay.masks], [lay.control], [s], STEPS, 5.0)
                        for c, lay, i, s in rows])
    scale = single.abs().max().item()
    assert (batch - single).abs().max().item() < REL_TOL * scale
    assert (batch[0] - batch[2]).abs().max() > 0.01 * scale  # another seed, another image
    assert (batch[0] - batch[1]).abs().max() > 0.01 * scale  # another case


def test_boxes_become_the_masks_and_slot_circles():
    from instantfamily_core.pose import assign_slots, expand_box
    from instantfamily_core.render import slot_color
    from training import generate
    from training.evaluation.cases import parse_case
    raw = {"id": "b", "prompt": "",
           "identities": [{"name": "x", "images": ["x.png"]}, {"name": "y", "images": ["y.png"]}],
           "slots": {"boxes": [[300, 40, 460, 200], [20, 60, 180, 220]], "canvas": [512, 512]}}
    case = parse_case(raw, 0, "/")
    lay = generate.case_layout(case, 256, 256)
    boxes = [[150, 20, 230, 100], [10, 30, 90, 110]]  # scaled to 256 px
    for n, (x1, y1, x2, y2) in enumerate(boxes):
        m = lay.masks[n]
        assert m[y1:y2, x1:x2].min() == 1 and m.sum() == (x2 - x1) * (y2 - y1)
        cx, cy = (x1 + x2) // 2, (y1 + y2) // 2
        assert tuple(lay.control[cy, cx]) == slot_color(n)  # identity n's circle sits in its own box
    # the synthesized heads give face boxes that, with the default margin, are the boxes again (square boxes)
    frame = generate.pose_from_boxes(boxes, 256, 256, 0.25)
    slots = assign_slots(frame, 2, [0, 1], 0.25)
    for got, want in zip(slots.face_boxes, boxes):
        np.testing.assert_allclose(expand_box(got, 0.25, 256, 256), want, atol=1e-6)


def test_cases_without_slots_use_the_bundled_template(gen):
    from instantfamily_core.pose import assign_slots, parse_pose
    from instantfamily_core.render import draw_control_image
    from training import generate
    case, lay, _ = _case_inputs(gen, "solo")
    template = parse_pose((generate.TEMPLATES_DIR / "family_1.json").read_text()).scaled(SIZE, SIZE)
    slots = assign_slots(template, 1)
    assert lay.source == "template family_1.json"
    assert torch.equal(lay.masks, slots.masks()) and np.array_equal(lay.control, draw_control_image(slots))


# ---------------------------------------------------------------------------------------------------------------
# the CLI

def test_cli_generates_resumes_and_evaluates(ws, tmp_path):
    """One command: generate → evaluate (insightface recognizer on the tiny pack) → the paper-style table; a
    second run keeps every image, a deleted image comes back identical, other settings are refused."""
    from training import generate
    out = tmp_path / "ckpt"
    rc = generate.main(cli_args(ws, out, "--seeds", "2", "--seed", "10", "--batch-size", "3",
                                "--recognizer", f"insightface:{ws['face_root']}:tinypack", "--label", "tiny"))
    assert rc == 0
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["boxes_10.png", "boxes_11.png", "pair_10.png", "pair_11.png", "solo_10.png", "solo_11.png"]
    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert summary["summary"]["n_images"] == 6
    assert summary["summary"]["faces_expected"] == 2 * (2 + 2 + 1)
    table = (out / "eval" / "summary.md").read_text()
    assert "tiny" in table and "MultiSim" in table and "SingleSim" in table
    manifest = json.loads((out / "generate.json").read_text())
    assert manifest["images"]["pair_11.png"] == {"case": "pair", "seed": 11,
                                                 "pose": f"pose {ws['cases'].parent / 'pair.pose.json'}"}
    assert manifest["images"]["boxes_10.png"]["pose"] == "boxes"
    assert manifest["images"]["solo_10.png"]["pose"] == "template family_1.json"

    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*.png")}
    (out / "pair_11.png").unlink()
    assert generate.main(cli_args(ws, out, "--seeds", "2", "--seed", "10")) == 0
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*.png")}
    assert after.keys() == before.keys()
    for name in before:
        if name != "pair_11.png":
            assert after[name] == before[name]  # kept, not rewritten
    assert after["pair_11.png"][1] == before["pair_11.png"][1]  # regenerated (batch 1 now) to the same PNG

    assert generate.main(cli_args(ws, out, "--seeds", "2", "--seed", "10", "--cfg", "7")) == 2


def test_training_checkpoint_folder_gives_the_same_images(ws, tmp_path):
    """A ``checkpoints/step-N`` folder (run_config.json + accelerate's model.safetensors) and its run folder give
    the images of the exported file."""
    from safetensors.torch import save_file

    from training import generate
    from training.model import json_config
    s = ws["setup"]
    step = tmp_path / "run" / "checkpoints" / "step-0000003"
    step.mkdir(parents=True)
    state = {f"projector.{k}": v for k, v in s.projector.state_dict().items()}
    state.update({f"controlnet.{k}": v for k, v in s.controlnet.state_dict().items()})
    save_file({k: v.contiguous() for k, v in state.items()}, str(step / "model.safetensors"))
    (step / "state.json").write_text(json.dumps({"global_step": 3}))
    (step / "run_config.json").write_text(json.dumps({
        "controlnet_config": json_config(s.controlnet.config), "projector_config": s.projector.config.to_dict(),
        "face_pack": "tinypack", "mask_mode": "additive", "num_slots": 4}))
    solo = tmp_path / "solo.json"
    cases = json.loads(ws["cases"].read_text())["cases"]
    for c in cases:
        for ident in c["identities"]:
            ident["images"] = [str(ws["cases"].parent / p) for p in ident["images"]]
    solo.write_text(json.dumps({"cases": [c for c in cases if c["id"] == "solo"]}))
    outs = {}
    for name, ckpt in (("file", s.checkpoint), ("step", step), ("run", tmp_path / "run")):
        args = cli_args(ws, tmp_path / name, "--seed", "3", "--steps", "2")
        args[args.index("--checkpoint") + 1] = str(ckpt)
        args[args.index("--cases") + 1] = str(solo)
        assert generate.main(args) == 0, name
        outs[name] = (tmp_path / name / "solo_3.png").read_bytes()
    assert outs["file"] == outs["step"], "step folder"
    assert outs["file"] == outs["run"], "run folder"
    # resuming from a training folder (exported anew each run) recognises its own images
    before = (tmp_path / "run" / "solo_3.png").stat().st_mtime_ns
    assert generate.main(args) == 0
    assert (tmp_path / "run" / "solo_3.png").stat().st_mtime_ns == before


def test_bad_input_is_a_clear_error(ws, tmp_path, capsys):
    from training import generate
    bad = tmp_path / "bad.json"

    def run(cases, *extra):
        bad.write_text(json.dumps({"cases": cases}))
        args = cli_args(ws, tmp_path / "o", *extra)
        args[args.index("--cases") + 1] = str(bad)
        rc = generate.main(args)
        return rc, capsys.readouterr().err

    ref = str(ws["cases"].parent / "refs" / "p0.png")
    rc, err = run([{"id": "a/b", "prompt": "", "identities": [{"name": "x", "images": [ref]}]}])
    assert rc == 2 and "'a/b'" in err and "names the image files" in err
    rc, err = run([{"id": "nine", "prompt": "", "identities": [{"name": f"x{i}", "images": [ref]} for i in range(9)]}])
    assert rc == 2 and "no bundled pose template for 9 identities" in err
    rc, err = run([{"id": "listed", "prompt": "", "identities": [{"name": "x", "images": [ref]}],
                    "images": ["somewhere.png"]}], "--recognizer", "dlib")
    assert rc == 2 and "'images'" in err
    blank = tmp_path / "blank.png"
    __import__("PIL.Image").Image.fromarray(np.full((256, 256, 3), 128, np.uint8)).save(blank)
    rc, err = run([{"id": "faceless", "prompt": "", "identities": [{"name": "x", "images": [str(blank)]}]}])
    assert rc == 2 and "no face found" in err and str(blank) in err
    rc, err = run([{"id": "ok", "prompt": "", "identities": [{"name": "x", "images": [ref]}]}], "--steps", "0")
    assert rc == 2 and "--steps" in err
    args = cli_args(ws, tmp_path / "o2")
    args[args.index("--checkpoint") + 1] = str(tmp_path / "nope.safetensors")
    assert generate.main(args) == 2 and "does not exist" in capsys.readouterr().err
    assert not list((tmp_path / "o").glob("*.png"))
