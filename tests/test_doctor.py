"""The installation doctor (``instantfamily_core/doctor.py``, ``tools/doctor.py``, the *InstantFamily Doctor* node)
on installs built in the test: a good one (exit 0) and broken ones — a pack nested one folder too deep, a pack
without its recognizer, a pack outside ``models/``, a corrupt checkpoint, a corrupt FaceID file, an SDXL ControlNet,
both onnxruntime distributions (a real second ``dist-info`` on ``sys.path``), insightface failing with numpy's ABI
error (a real import that raises it), torch failing to import, nothing to generate with (exit 1, the fix named).

Model files are generated: the tiny ONNX face packs, an InstantFamily checkpoint with a ControlNet built by
ComfyUI's own class, an OpenPose-named ControlNet of ComfyUI's class (ComfyUI's loader reads it too), a FaceID
Portrait file in the published key layout, and an SD1.5 checkpoint header by the published key names. The SDXL
files are shape-only: FaceID SDXL ``.bin`` files with every published key and shape (stride-0 tensors, a few kB),
and safetensors files whose header lists the published tensors over a sparse hole (thibaud's OpenPoseXL2 FP32 and
xinsir's FP16 ControlNet — their published byte sizes to the byte —, an SDXL base, CLIP vision encoders): the
doctor reads keys and shapes only."""

from __future__ import annotations

import json
import math
import shutil
import struct
import sys
from pathlib import Path

import pytest
import torch

from tools.devkit.comfy_host import HOW_TO_PROVIDE, find_comfyui

pytestmark = pytest.mark.skipif(find_comfyui() is None, reason=HOW_TO_PROVIDE)

SD15_KEY = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


def _write_openpose(path: Path, context_dim: int = 768, channels: int = 320):
    """A ControlNet of ComfyUI's own class, saved fp16 in the ldm layout of control_v11p_sd15_openpose. Two levels
    and one res block each, but SD1.5's 320 channels: ComfyUI's loader recognises SD1.5 by them."""
    from safetensors.torch import save_file

    from support.comfy_models import TINY_UNET, randomise
    import comfy.cldm.cldm
    import comfy.ops
    cfg = {k: v for k, v in TINY_UNET.items() if k != "out_channels"}
    cfg.update(hint_channels=3, num_heads=8, num_head_channels=-1, context_dim=context_dim, model_channels=channels)
    cn = randomise(comfy.cldm.cldm.ControlNet(**cfg, operations=comfy.ops.disable_weight_init), 3)
    save_file({f"control_model.{k}": v.half().contiguous() for k, v in cn.state_dict().items()}, str(path))


@pytest.fixture(scope="module")
def host():
    from tools.devkit.comfy_host import import_host, load_pack
    nodes = import_host()
    pack = load_pack()
    return nodes, pack


@pytest.fixture(scope="module")
def good(host, tmp_path_factory):
    """A ComfyUI folder (the real host's code, linked) whose models/ holds everything both modes need."""
    from safetensors.torch import save_file

    from support.comfy_models import write_tiny_checkpoint
    from tools.devkit.face_models import make_tiny_pack
    from support.faceid_files import faceid_parts, write_bin
    real = find_comfyui()
    root = tmp_path_factory.mktemp("doctor") / "ComfyUI"
    root.mkdir()
    shutil.copy(real / "main.py", root / "main.py")  # ComfyUI reads its yaml files next to main.py's real path
    for name in ("comfy", "folder_paths.py", "comfyui_version.py"):
        (root / name).symlink_to(real / name)
    m = root / "models"
    make_tiny_pack(m / "insightface", "tinypack")
    make_tiny_pack(m / "insightface", "buffalo_l")
    (m / "instantfamily").mkdir(parents=True)
    write_tiny_checkpoint(m / "instantfamily" / "instantfamily_tiny.safetensors")
    (m / "controlnet").mkdir()
    _write_openpose(m / "controlnet" / "control_v11p_sd15_openpose_tiny.safetensors")
    (m / "ipadapter").mkdir()
    write_bin(m / "ipadapter" / "ip-adapter-faceid-portrait-v11_sd15.bin", faceid_parts("portrait"))
    (m / "checkpoints").mkdir()
    save_file({SD15_KEY: torch.zeros(320, 768)}, str(m / "checkpoints" / "v1-5-tiny.safetensors"))
    return root


def _doctor():
    from instantfamily_core import doctor
    return doctor


def _rows(rows, prefix):
    return [r for r in rows if r.name.startswith(prefix)]


def _cli(args, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    try:
        import doctor as cli
    finally:
        sys.path.pop(0)
    rc = cli.main(args)
    return rc, capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------

def test_good_install_exits_0_and_both_modes_are_ready(good, capsys):
    rc, out = _cli(["--comfyui", str(good), "--quiet"], capsys)
    assert rc == 0, out
    assert "everything needed is there" in out
    rc, out = _cli(["--comfyui", str(good), "--quiet", "--json"], capsys)
    rows = {r["name"]: r for r in json.loads(out)["rows"]}
    assert rows["ComfyUI"]["status"] == "ok" and "0.3.64" in rows["ComfyUI"]["detail"]
    assert rows["face pack tinypack"]["status"] == rows["face pack buffalo_l"]["status"] == "ok"
    assert rows["checkpoint instantfamily_tiny.safetensors"]["status"] == "ok"
    assert "face pack tinypack" in rows["checkpoint instantfamily_tiny.safetensors"]["detail"]
    assert rows["FaceID ip-adapter-faceid-portrait-v11_sd15.bin"]["status"] == "ok"
    assert "portrait" in rows["FaceID ip-adapter-faceid-portrait-v11_sd15.bin"]["detail"]
    assert rows["OpenPose control_v11p_sd15_openpose_tiny.safetensors"]["detail"] == "SD1.5 ControlNet, ldm layout"
    assert rows["mode: InstantFamily"]["status"] == rows["mode: public weights (FaceID SD1.5)"]["status"] == "ok"
    assert rows["mode: public weights (FaceID SDXL)"]["status"] == "warn"  # no SDXL files: said, not a failure
    assert rows["mode: public weights (FaceID SDXL)"]["detail"] == "not ready"
    assert "SDXL checkpoint" not in rows  # nothing SDXL in this install: no SDXL base row
    assert all(r["status"] != "FAIL" for r in rows.values())


def test_openpose_row_agrees_with_comfyuis_loader(good, tmp_path):
    """What the doctor accepts ComfyUI's ControlNet loader loads; an SDXL-width one it refuses, naming why."""
    import comfy.controlnet
    d = _doctor()
    ok = good / "models" / "controlnet" / "control_v11p_sd15_openpose_tiny.safetensors"
    assert comfy.controlnet.load_controlnet(str(ok)) is not None
    # 2048-wide text but no SDXL size/pooled-text embedding: not an SDXL ControlNet either
    _write_openpose(tmp_path / "openpose_sdxl.safetensors", context_dim=2048, channels=32)
    loc = d.Locations(good, "0.3.64", {"controlnet": [str(tmp_path)]})
    (row,) = d.check_openpose(loc, d.Models())
    assert row.status == d.FAIL and "2048" in row.detail and "2816" in row.detail
    assert "control_v11p_sd15_openpose" in row.fix and "OpenPoseXL2" in row.fix
    # a diffusers-layout folder without its config.json
    folder = tmp_path / "d" / "control_v11p_sd15_openpose"
    folder.mkdir(parents=True)
    shutil.copy(ok, folder / "diffusion_pytorch_model.safetensors")
    (row,) = d.check_openpose(d.Locations(good, "0.3.64", {"controlnet": [str(tmp_path / "d")]}), d.Models())
    assert row.status == d.FAIL and "config.json" in row.fix


def _pack_files(folder: Path, recognizer: bool = True) -> Path:
    from tools.devkit.face_models import DET_FILE, REC_FILE, write_tiny_detector, write_tiny_recognizer
    write_tiny_detector(folder / DET_FILE)
    if recognizer:
        write_tiny_recognizer(folder / REC_FILE)
    return folder


def _broken_face_root(tmp_path, kind):
    root = tmp_path / "insightface"
    if kind == "nested":  # the zip unpacked into its own folder: models/antelopev2/antelopev2/*.onnx
        inner = _pack_files(root / "models" / "antelopev2" / "antelopev2")
        return root, "face pack antelopev2", "nested one folder too deep", f"from {inner}"
    if kind == "no recognizer":
        _pack_files(root / "models" / "buffalo_l", recognizer=False)
        return root, "face pack buffalo_l", "missing or broken files", "no ArcFace recognizer"
    if kind == "outside models":  # unzipped into models/insightface/ instead of models/insightface/models/
        _pack_files(root / "antelopev2")
        return root, "face pack antelopev2", "is outside", str(root / "models" / "antelopev2")
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["nested", "no recognizer", "outside models"])
def test_broken_face_packs(good, tmp_path, capsys, kind):
    """A second insightface folder (extra_model_paths.yaml) with a broken pack: the CLI exits 1 and says how to fix."""
    root, row_name, detail, fix = _broken_face_root(tmp_path, kind)
    comfy = tmp_path / "ComfyUI"
    shutil.copytree(good, comfy, symlinks=True)
    (comfy / "extra_model_paths.yaml").write_text(f"mine:\n  base_path: {tmp_path}\n  insightface: insightface\n")
    rc, out = _cli(["--comfyui", str(comfy), "--quiet", "--json"], capsys)
    rows = {r["name"]: r for r in json.loads(out)["rows"]}
    assert rc == 1
    assert rows[row_name]["status"] == "FAIL" and detail in rows[row_name]["detail"] + rows[row_name]["fix"]
    assert fix in rows[row_name]["fix"]
    assert rows["face pack tinypack"]["status"] == "ok"  # the good folder is still checked


def test_corrupt_and_inconsistent_checkpoints(good, tmp_path):
    from instantfamily_core.checkpoint import CheckpointMeta, save_checkpoint
    from instantfamily_core.projector import IdentityProjector
    from support.comfy_models import TINY_PROJECTOR, tiny_controlnet_ldm
    d = _doctor()
    folder = tmp_path / "instantfamily"
    folder.mkdir()
    (folder / "truncated.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    sd, cfg = tiny_controlnet_ldm()
    save_checkpoint(str(folder / "says_diffusers.safetensors"), IdentityProjector(TINY_PROJECTOR), sd,
                    CheckpointMeta(face_pack="tinypack", projector=TINY_PROJECTOR, controlnet_layout="diffusers"))
    (folder / "identities").mkdir()
    (folder / "identities" / "family.safetensors").write_bytes(b"not a checkpoint, and not checked as one")
    rows = d.check_checkpoints(d.Locations(good, "0.3.64", {"instantfamily": [str(folder)]}), d.Models())
    by = {r.name: r for r in rows}
    assert set(by) == {"checkpoint truncated.safetensors", "checkpoint says_diffusers.safetensors"}
    assert by["checkpoint truncated.safetensors"].status == d.FAIL
    assert "not a readable .safetensors" in by["checkpoint truncated.safetensors"].detail
    assert "training/export.py" in by["checkpoint truncated.safetensors"].fix
    assert by["checkpoint says_diffusers.safetensors"].status == d.FAIL
    assert "controlnet_cond_embedding.conv_in.weight" in by["checkpoint says_diffusers.safetensors"].detail


def test_faceid_files(good, tmp_path):
    from support.faceid_files import faceid_parts, write_bin
    d = _doctor()
    folder = tmp_path / "ipadapter"
    folder.mkdir()
    (folder / "ip-adapter-faceid_sd15.bin").write_bytes(b"PK\x03\x04 truncated download")
    write_bin(folder / "ip-adapter-faceid-plusv2_sd15.bin", faceid_parts("plus"))
    _write_faceid_sdxl(folder / "ip-adapter-faceid_sdxl.bin", "faceid")
    models = d.Models()
    rows = {r.name: r for r in d.check_faceid(d.Locations(good, "0.3.64", {"ipadapter": [str(folder)],
                                                                          "clip_vision": [str(tmp_path / "none")]}),
                                              models)}
    assert rows["FaceID ip-adapter-faceid_sd15.bin"].status == d.FAIL
    assert "huggingface.co/h94/IP-Adapter-FaceID" in rows["FaceID ip-adapter-faceid_sd15.bin"].fix
    sdxl = rows["FaceID ip-adapter-faceid_sdxl.bin"]
    assert sdxl.status == d.OK and sdxl.detail == "SDXL faceid, LoRA inside"
    plus = rows["FaceID ip-adapter-faceid-plusv2_sd15.bin"]  # valid, but Plus needs CLIP ViT-H
    assert plus.status == d.WARN and "SD1.5 plusv2" in plus.detail and "CLIP ViT-H" in plus.fix
    assert models.faceid == {"ip-adapter-faceid-plusv2_sd15.bin": ("plusv2", True, "SD1.5"),
                             "ip-adapter-faceid_sdxl.bin": ("faceid", True, "SDXL")}


def test_two_onnxruntime_distributions(tmp_path, monkeypatch):
    """A second onnxruntime distribution really installed (its dist-info on sys.path), as pip leaves it after
    `pip install onnxruntime-gpu` on top of onnxruntime."""
    d = _doctor()
    info = tmp_path / "site" / "onnxruntime_gpu-1.20.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: onnxruntime-gpu\nVersion: 1.20.1\n")
    before = d.check_onnxruntime()
    assert before[0].status == d.OK and "onnxruntime-gpu" not in before[0].detail
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    rows = d.check_onnxruntime()
    assert rows[0].status == d.FAIL and "onnxruntime-gpu 1.20.1" in rows[0].detail
    assert rows[0].fix == "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu"
    assert d.exit_code(rows) == 1


def test_onnxruntime_missing():
    from importlib import metadata
    d = _doctor()

    def none_installed(name):
        raise metadata.PackageNotFoundError(name)

    def no_import(name):
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    rows = d.check_onnxruntime(importer=no_import, version_of=none_installed)
    assert [(r.status, r.detail) for r in rows] == [(d.FAIL, "not installed")]
    assert "pip install onnxruntime" in rows[0].fix


def test_insightface_numpy_abi_error(tmp_path, monkeypatch):
    """insightface whose import raises numpy's ABI error (as a 0.7.3 build for numpy 1.x does under numpy 2)."""
    d = _doctor()
    fake = tmp_path / "site" / "insightface"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ValueError('numpy.dtype size changed, may indicate binary "
                                      "incompatibility. Expected 96 from C header, got 88 from PyObject')\n")
    for name in [m for m in sys.modules if m == "insightface" or m.startswith("insightface.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    row = d.check_insightface()
    assert row.status == d.FAIL and "numpy ABI mismatch" in row.detail and "numpy.dtype size changed" in row.detail
    assert 'pip install -U "insightface>=1.0"' in row.fix


def test_torch_that_does_not_import():
    d = _doctor()

    def importer(name):
        if name == "torch":
            raise OSError("libtorch_cuda.so: cannot open shared object file")
        return __import__(name)

    row = d.check_torch(importer)
    assert row.status == d.FAIL and "libtorch_cuda.so" in row.detail and "never installs torch" in row.fix


def test_nothing_to_generate_with(good, tmp_path, capsys, monkeypatch):
    comfy = tmp_path / "ComfyUI"
    shutil.copytree(good, comfy, symlinks=True)
    shutil.rmtree(comfy / "models" / "instantfamily")
    shutil.rmtree(comfy / "models" / "ipadapter")
    rc, out = _cli(["--comfyui", str(comfy), "--quiet"], capsys)
    assert rc == 1
    assert "ready to generate" in out and "no mode has all its files" in out
    assert "InstantFamily checkpoint in" in out and "ip-adapter-faceid_sd15.bin" in out
    assert "ip-adapter-faceid_sdxl.bin" in out and "sd_xl_base_1.0.safetensors" in out
    # FaceID with another pack than buffalo_l: ready, with the advice to add buffalo_l
    shutil.copytree(good / "models" / "ipadapter", comfy / "models" / "ipadapter")
    shutil.rmtree(comfy / "models" / "insightface" / "models" / "buffalo_l")
    rc, out = _cli(["--comfyui", str(comfy), "--quiet", "--json"], capsys)
    row = next(r for r in json.loads(out)["rows"] if r["name"] == "mode: public weights (FaceID SD1.5)")
    assert rc == 0 and row["status"] == "warn" and row["detail"] == "ready" and "buffalo_l" in row["fix"]
    monkeypatch.setenv("COMFYUI_PATH", str(comfy))  # a wrong explicit folder is reported, never replaced
    rc, out = _cli(["--comfyui", str(tmp_path / "nowhere"), "--quiet"], capsys)
    assert rc == 1 and "ComfyUI" in out and "not found" in out


def test_node_shows_the_report_in_comfyui(host, good, tmp_path):
    """In the real host: the node registered under its name, its report covering the folders ComfyUI uses (a broken
    pack added through folder_paths), the same rows the CLI gives for those folders, and 'ready' False."""
    import folder_paths
    nodes, pack = host
    cls = nodes.NODE_CLASS_MAPPINGS["InstantFamilyDoctor"]
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["InstantFamilyDoctor"].startswith("InstantFamily Doctor")
    root, row_name, _, fix = _broken_face_root(tmp_path, "nested")
    folder_paths.add_model_folder_path("insightface", str(root))
    try:
        out = cls().run()
    finally:
        folder_paths.folder_names_and_paths["insightface"][0].remove(str(root))
    report, ready = out["result"]
    assert out["ui"]["text"] == (report,)
    assert ready is False
    assert "ComfyUI" in report and "0.3.64" in report.splitlines()[4]
    assert row_name in report and "nested one folder too deep" in report
    d = _doctor()
    cli_rows = d.check_face_packs(d.Locations(None, None, {"insightface": [str(root)]}), d.Models())
    flat = " ".join(report.split())
    assert cli_rows and all(" ".join(f"{r.name} {r.status} {r.detail} fix: {r.fix}".split()) in flat
                            for r in cli_rows)


# ---------------------------------------------------------------------------------------------------------------
# the ComfyUI version row and the yaml files a given ComfyUI reads

NEWER_MAIN = """# main.py of a newer ComfyUI, reduced to what the doctor reads: apply_custom_paths reads
# extra_paths.yaml and ignores extra_model_paths.yaml when both exist (upstream main.py since that change)
import os


def apply_custom_paths(load):
    install_dir = os.path.dirname(os.path.realpath(__file__))
    primary = os.path.join(install_dir, "extra_paths.yaml")
    legacy = os.path.join(install_dir, "extra_model_paths.yaml")
    if os.path.isfile(primary):
        load(primary)
    elif os.path.isfile(legacy):
        load(legacy)
"""


def _bare_host(tmp_path, version: str, main: str = None) -> Path:
    """A ComfyUI folder with the real host's code (linked), ``comfyui_version.py`` saying ``version``, and the real
    0.3.64 ``main.py`` or the text ``main``; no models."""
    real = find_comfyui()
    root = tmp_path / f"ComfyUI-{version}"
    root.mkdir()
    for name in ("comfy", "folder_paths.py"):
        (root / name).symlink_to(real / name)
    if main is None:
        shutil.copy(real / "main.py", root / "main.py")
    else:
        (root / "main.py").write_text(main)
    (root / "comfyui_version.py").write_text(f'__version__ = "{version}"\n')
    return root


def _comfyui_row(root):
    d = _doctor()
    return d.check_comfyui(d.locations_for(root))


def test_newer_comfyui_warns_and_lists_the_changes_handled(tmp_path):
    d = _doctor()
    for version in ("0.38.1", "0.3.100", "1.0"):
        row = _comfyui_row(_bare_host(tmp_path, version))
        assert row.status == d.WARN, (version, row)
        assert "newer than tested (0.3.64): known changes handled: " in row.detail
        assert version in row.detail
        for change in d.KNOWN_CHANGES_HANDLED:
            assert change in row.detail
    assert any("PR #12382" in c and "ON_CLONE" in c for c in d.KNOWN_CHANGES_HANDLED)
    assert any("extra_paths.yaml" in c for c in d.KNOWN_CHANGES_HANDLED)


def test_same_older_and_unparsable_comfyui_versions(tmp_path, capsys):
    d = _doctor()
    same = _comfyui_row(_bare_host(tmp_path, "0.3.64"))
    assert same.status == d.OK and "0.3.64" in same.detail and "newer" not in same.detail
    for version in ("0.3.9", "0.2.100"):  # numerically older, though 0.3.9 > 0.3.64 as text
        older = _comfyui_row(_bare_host(tmp_path, version))
        assert older.status == d.WARN and older.detail.startswith(version) and "newer" not in older.detail
        assert older.fix.startswith("older than the tested 0.3.64")
    odd = _bare_host(tmp_path, "nightly-build")
    row = _comfyui_row(odd)
    assert row.status == d.WARN and "cannot be compared" in row.detail and "0.3.64" in row.detail
    assert "older than" not in row.fix + row.detail and "newer than" not in row.detail
    rc, out = _cli(["--comfyui", str(odd), "--quiet", "--json"], capsys)  # the whole report still comes out
    rows = {r["name"]: r for r in json.loads(out)["rows"]}
    assert rows["ComfyUI"]["status"] == "warn" and "cannot be compared" in rows["ComfyUI"]["detail"]
    assert "SD1.5 checkpoint" in rows and rc == 1  # no models in a bare host


def _pack_in(folder: Path, name: str) -> Path:
    from tools.devkit.face_models import make_tiny_pack
    make_tiny_pack(folder, name)
    return folder


def _yaml(path: Path, block: str, insightface: Path) -> None:
    path.write_text(f"{block}:\n  base_path: {insightface.parent}\n  insightface: {insightface.name}\n")


def test_newer_comfyui_reads_extra_paths_yaml_and_ignores_extra_model_paths_yaml(tmp_path, capsys):
    root = _bare_host(tmp_path, "0.38.1", NEWER_MAIN)
    new = _pack_in(tmp_path / "new" / "insightface", "newpack")
    old = _pack_in(tmp_path / "old" / "insightface", "oldpack")
    _yaml(root / "extra_paths.yaml", "mine", new)
    _yaml(root / "extra_model_paths.yaml", "legacy", old)
    d = _doctor()
    loc = d.locations_for(root)
    assert loc.get("insightface") == [root / "models" / "insightface", new]
    rc, out = _cli(["--comfyui", str(root), "--quiet", "--json"], capsys)
    rows = {r["name"]: r for r in json.loads(out)["rows"]}
    assert rows["face pack newpack"]["status"] == "ok" and str(new) in rows["face pack newpack"]["detail"]
    assert "face pack oldpack" not in rows
    paths = rows["model paths"]
    assert paths["status"] == "warn" and f"read {root / 'extra_paths.yaml'};" in paths["detail"]
    assert f"{root / 'extra_model_paths.yaml'} ignored" in paths["detail"]
    # only extra_model_paths.yaml: used
    (root / "extra_paths.yaml").unlink()
    loc = d.locations_for(root)
    assert loc.get("insightface") == [root / "models" / "insightface", old]
    (row,) = d.check_model_paths(loc)
    assert row.status == d.OK and row.detail == f"read {root / 'extra_model_paths.yaml'}"
    rows = {r.name: r for r in d.check_face_packs(loc, d.Models())}
    assert "face pack oldpack" in rows and "face pack newpack" not in rows


def test_comfyui_0_3_64_reads_only_extra_model_paths_yaml(tmp_path):
    """The real 0.3.64 main.py knows no extra_paths.yaml: with both files, extra_model_paths.yaml is what counts;
    a path without base_path is relative to the yaml file's folder, as in ComfyUI's loader."""
    d = _doctor()
    root = _bare_host(tmp_path, "0.3.64")
    assert not d.reads_extra_paths_yaml(root)
    assert d.reads_extra_paths_yaml(_bare_host(tmp_path, "0.38.1", NEWER_MAIN))
    new, old = tmp_path / "new", root / "mine" / "insightface"
    _yaml(root / "extra_paths.yaml", "mine", new)
    (root / "extra_model_paths.yaml").write_text("legacy:\n  insightface: mine/insightface\n")
    loc = d.locations_for(root)
    assert loc.get("insightface") == [root / "models" / "insightface", old]
    assert loc.path_configs == [str(root / "extra_model_paths.yaml")] and loc.path_notes == []
    none = _bare_host(tmp_path, "0.3.65")
    (row,) = d.check_model_paths(d.locations_for(none))
    assert row.status == d.OK and row.detail.startswith("read none")
    (none / "extra_model_paths.yaml").write_text("legacy: [unclosed\n")
    (row,) = d.check_model_paths(d.locations_for(none))
    assert row.status == d.WARN and f"{none / 'extra_model_paths.yaml'} not read: " in row.detail


def test_yaml_folders_equal_comfyuis_own_reader(host, tmp_path, monkeypatch):
    """The doctor's reading of one model-paths yaml against ComfyUI's own (``utils/extra_config.
    load_extra_path_config`` → ``folder_paths.add_model_folder_path``): relative and absolute ``base_path``, entries
    without one (relative to the yaml's folder), several paths per entry, ``is_default`` (ComfyUI puts each of its
    paths first, one after the other)."""
    import importlib.util

    import folder_paths
    spec = importlib.util.spec_from_file_location("comfy_extra_config", find_comfyui() / "utils" / "extra_config.py")
    extra_config = importlib.util.module_from_spec(spec)  # by path: another ``utils`` may be on sys.path
    spec.loader.exec_module(extra_config)
    (tmp_path / "cfg").mkdir()
    path = tmp_path / "cfg" / "extra_model_paths.yaml"
    path.write_text(f"a:\n  base_path: {tmp_path / 'abs'}\n  checkpoints: |\n    one\n    two\n  loras: l\n"
                    "b:\n  base_path: ../rel\n  is_default: true\n  checkpoints: |\n    first\n    second\n"
                    "  insightface: faces\n"
                    "c:\n  instantfamily: |\n    here\n    sub/there\n")
    names = ("checkpoints", "loras", "insightface", "instantfamily")
    monkeypatch.setattr(folder_paths, "folder_names_and_paths",
                        {name: ([], set()) for name in names})
    extra_config.load_extra_path_config(str(path))
    theirs = {name: folder_paths.folder_names_and_paths[name][0] for name in names}
    ours = _doctor().extra_model_paths(path)
    assert {name: ours.get(name, []) for name in names} == theirs


# ---------------------------------------------------------------------------------------------------------------
# SDXL: FaceID SDXL files, SDXL OpenPose ControlNets, SDXL bases, ViT-H — shape-only files by the published names

SDXL_ATTN2_WIDTHS = [640] * 4 + [1280] * 20 + [1280] * 30 + [640] * 6 + [1280] * 10  # notes sdxl-weights.md §4
LORA_RANK = 128
THIBAUD_BYTES, XINSIR_BYTES = 5_004_167_829, 2_502_139_104  # published sizes (notes sdxl-weights.md §3)


def _faceid_sdxl_shapes(variant: str) -> tuple[dict, dict]:
    """``image_proj`` / ``ip_adapter`` key → shape of the published SDXL FaceID files (notes sdxl-weights.md §2):
    MLP to 4 (Portrait: 16) tokens of 2048, PlusV2's perceiver (dim 2048, ViT-H 1280 in), ``to_k_ip``/``to_v_ip``
    of the 70 attn2 (odd p), the rank-128 LoRA of all 140 processors (not Portrait)."""
    d, tokens = 2048, 16 if variant == "portrait" else 4
    proj = {"proj.0.weight": (1024, 512), "proj.0.bias": (1024,), "proj.2.weight": (d * tokens, 1024),
            "proj.2.bias": (d * tokens,), "norm.weight": (d,), "norm.bias": (d,)}
    if variant == "plusv2":
        pr = "perceiver_resampler."
        proj.update({pr + "proj_in.weight": (d, 1280), pr + "proj_in.bias": (d,), pr + "proj_out.weight": (d, d),
                     pr + "proj_out.bias": (d,), pr + "norm_out.weight": (d,), pr + "norm_out.bias": (d,)})
        for i in range(4):
            a, f = f"{pr}layers.{i}.0.", f"{pr}layers.{i}.1."
            proj.update({a + "norm1.weight": (d,), a + "norm1.bias": (d,), a + "norm2.weight": (d,),
                         a + "norm2.bias": (d,), a + "to_q.weight": (d, d), a + "to_kv.weight": (2 * d, d),
                         a + "to_out.weight": (d, d), f + "0.weight": (d,), f + "0.bias": (d,),
                         f + "1.weight": (4 * d, d), f + "3.weight": (d, 4 * d)})
    ip = {}
    for p in range(140):
        hidden = SDXL_ATTN2_WIDTHS[p // 2]
        if p % 2:
            ip[f"{p}.to_k_ip.weight"] = ip[f"{p}.to_v_ip.weight"] = (hidden, d)
        if variant != "portrait":
            kv_in = d if p % 2 else hidden
            for t, fan_in in (("to_q", hidden), ("to_k", kv_in), ("to_v", kv_in), ("to_out", hidden)):
                ip[f"{p}.{t}_lora.down.weight"] = (LORA_RANK, fan_in)
                ip[f"{p}.{t}_lora.up.weight"] = (hidden, LORA_RANK)
    return proj, ip


def _write_faceid_sdxl(path: Path, variant: str) -> None:
    """A FaceID SDXL ``.bin`` (nested ``image_proj``/``ip_adapter``, fp16) with every published key and shape;
    each tensor a stride-0 view of one zero, so the file is a few kB instead of 0.75–1.5 GB."""
    proj, ip = _faceid_sdxl_shapes(variant)
    zero = torch.zeros((), dtype=torch.float16)
    torch.save({"image_proj": {k: zero.expand(s) for k, s in proj.items()},
                "ip_adapter": {k: zero.expand(s) for k, s in ip.items()}}, str(path))


def _header_only(path: Path, shapes: dict, dtype: str = "F16", pad: bool = True) -> int:
    """A safetensors file: the header the library writes (compact JSON, tensors by name), the data a sparse hole
    of the declared size. Returns the file size."""
    size = {"F16": 2, "F32": 4}[dtype]
    header, off = {}, 0
    for k in sorted(shapes):
        n = math.prod(shapes[k]) * size
        header[k] = {"dtype": dtype, "shape": list(shapes[k]), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + off)
    return path.stat().st_size


def _sdxl_controlnet_shapes() -> dict:
    """diffusers' ControlNetModel from thibaud's published config.json, on the meta device."""
    from accelerate import init_empty_weights
    from diffusers import ControlNetModel
    cfg = {"act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
           "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
           "conditioning_channels": 3, "conditioning_embedding_out_channels": [16, 32, 96, 256],
           "cross_attention_dim": 2048, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D",
                                                             "CrossAttnDownBlock2D"],
           "in_channels": 4, "layers_per_block": 2, "projection_class_embeddings_input_dim": 2816,
           "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": True}
    with init_empty_weights():
        cn = ControlNetModel(**cfg)
    return {k: tuple(v.shape) for k, v in cn.state_dict().items()}


SDXL_BASE_KEYS = {"model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (640, 2048),
                  "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
                  "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (768,),
                  "conditioner.embedders.1.model.ln_final.weight": (1280,),
                  "conditioner.embedders.1.model.text_projection": (1280, 1280)}


@pytest.fixture(scope="module")
def sdxl_files(tmp_path_factory):
    """The SDXL files of a full install, shape-only, under models/-like folder names."""
    root = tmp_path_factory.mktemp("sdxl-models")
    ipa = root / "ipadapter"
    ipa.mkdir()
    for variant, name in (("faceid", "ip-adapter-faceid_sdxl.bin"), ("plusv2", "ip-adapter-faceid-plusv2_sdxl.bin"),
                          ("portrait", "ip-adapter-faceid-portrait_sdxl.bin")):
        _write_faceid_sdxl(ipa / name, variant)
    shapes = _sdxl_controlnet_shapes()
    sizes = {"thibaud": _header_only(root / "controlnet" / "OpenPoseXL2.safetensors", shapes, "F32", pad=False),
             "xinsir": _header_only(root / "controlnet" / "controlnet-openpose-sdxl-1.0" /
                                    "diffusion_pytorch_model.safetensors", shapes, "F16")}
    (root / "controlnet" / "controlnet-openpose-sdxl-1.0" / "config.json").write_text("{}")
    _header_only(root / "checkpoints" / "sd_xl_base_1.0.safetensors", SDXL_BASE_KEYS)
    _header_only(root / "checkpoints" / "sd_xl_refiner_1.0.safetensors",
                 {"model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (768, 1280),
                  "conditioner.embedders.0.model.ln_final.weight": (1280,)})
    _header_only(root / "clip_vision_h" / "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors",
                 {"vision_model.embeddings.patch_embedding.weight": (1280, 3, 14, 14)})
    _header_only(root / "clip_vision_g" / "CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors",
                 {"vision_model.embeddings.patch_embedding.weight": (1664, 3, 14, 14)})
    return root, sizes


def _sdxl_install(good, tmp_path, sdxl_files, *, base=True, openpose=True, faceid=("faceid", "plusv2", "portrait"),
                  clip=None) -> Path:
    root, _ = sdxl_files
    comfy = tmp_path / "ComfyUI"
    shutil.copytree(good, comfy, symlinks=True)
    m = comfy / "models"
    names = {"faceid": "ip-adapter-faceid_sdxl.bin", "plusv2": "ip-adapter-faceid-plusv2_sdxl.bin",
             "portrait": "ip-adapter-faceid-portrait_sdxl.bin"}
    for v in faceid:
        (m / "ipadapter" / names[v]).symlink_to(root / "ipadapter" / names[v])
    if openpose:
        (m / "controlnet" / "OpenPoseXL2.safetensors").symlink_to(root / "controlnet" / "OpenPoseXL2.safetensors")
        (m / "controlnet" / "controlnet-openpose-sdxl-1.0").symlink_to(root / "controlnet" /
                                                                       "controlnet-openpose-sdxl-1.0")
    if base:
        (m / "checkpoints" / "sd_xl_base_1.0.safetensors").symlink_to(root / "checkpoints" /
                                                                      "sd_xl_base_1.0.safetensors")
    (m / "checkpoints" / "sd_xl_refiner_1.0.safetensors").symlink_to(root / "checkpoints" /
                                                                     "sd_xl_refiner_1.0.safetensors")
    if clip:
        (m / "clip_vision").mkdir(exist_ok=True)
        for f in (root / f"clip_vision_{clip}").iterdir():
            (m / "clip_vision" / f.name).symlink_to(f)
    return comfy


def _json_rows(comfy, capsys):
    rc, out = _cli(["--comfyui", str(comfy), "--quiet", "--json"], capsys)
    return rc, {r["name"]: r for r in json.loads(out)["rows"]}


def test_sdxl_files_are_recognised_and_the_sdxl_mode_is_ready(good, tmp_path, sdxl_files, capsys):
    """Each SDXL FaceID file with its base and variant, thibaud's FP32 and xinsir's FP16 ControlNets as SDXL
    (diffusers keys), the SDXL base (not the refiner); 'FaceID SDXL: ready' next to the SD1.5 rows."""
    _, sizes = sdxl_files
    assert sizes == {"thibaud": THIBAUD_BYTES, "xinsir": XINSIR_BYTES}  # the published layouts, to the byte
    comfy = _sdxl_install(good, tmp_path, sdxl_files, clip="h")
    rc, rows = _json_rows(comfy, capsys)
    assert rc == 0
    assert rows["FaceID ip-adapter-faceid_sdxl.bin"] == {
        "name": "FaceID ip-adapter-faceid_sdxl.bin", "status": "ok", "detail": "SDXL faceid, LoRA inside", "fix": ""}
    assert rows["FaceID ip-adapter-faceid-plusv2_sdxl.bin"]["detail"] == "SDXL plusv2, LoRA inside"
    assert rows["FaceID ip-adapter-faceid-portrait_sdxl.bin"]["detail"] == "SDXL portrait"
    assert rows["FaceID ip-adapter-faceid-portrait-v11_sd15.bin"]["detail"] == "SD1.5 portrait"
    assert rows["OpenPose OpenPoseXL2.safetensors"]["detail"] == "SDXL ControlNet, diffusers layout"
    xinsir = rows["OpenPose controlnet-openpose-sdxl-1.0/diffusion_pytorch_model.safetensors"]
    assert xinsir["status"] == "ok" and xinsir["detail"] == "SDXL ControlNet, diffusers layout"
    assert rows["OpenPose control_v11p_sd15_openpose_tiny.safetensors"]["detail"] == "SD1.5 ControlNet, ldm layout"
    assert rows["SDXL checkpoint"] == {"name": "SDXL checkpoint", "status": "ok",
                                       "detail": "sd_xl_base_1.0.safetensors", "fix": ""}
    assert rows["SD1.5 checkpoint"]["detail"] == "v1-5-tiny.safetensors"  # the refiner is neither
    sdxl = rows["mode: public weights (FaceID SDXL)"]
    assert sdxl == {"name": "mode: public weights (FaceID SDXL)", "status": "ok", "detail": "ready", "fix": ""}
    assert rows["mode: public weights (FaceID SD1.5)"]["status"] == rows["mode: InstantFamily"]["status"] == "ok"
    rc, out = _cli(["--comfyui", str(comfy), "--quiet"], capsys)
    line = next(ln for ln in out.splitlines() if ln.startswith("mode: public weights (FaceID SDXL)"))
    assert line.split()[-2:] == ["ok", "ready"]


@pytest.mark.parametrize("missing", ["base", "openpose", "vit-h", "vit-h (bigG only)", "lora"])
def test_sdxl_mode_says_what_is_missing(good, tmp_path, sdxl_files, capsys, missing):
    """Without an SDXL base, an SDXL OpenPose ControlNet, or (only PlusV2 present) a ViT-H image encoder, the SDXL
    mode row is 'not ready' and names the file to get; the SD1.5 modes stay ready (exit 0)."""
    kw = {"base": {"base": False}, "openpose": {"openpose": False},
          "vit-h": {"faceid": ("plusv2",)}, "vit-h (bigG only)": {"faceid": ("plusv2",), "clip": "g"},
          "lora": {"faceid": ()}}[missing]
    comfy = _sdxl_install(good, tmp_path, sdxl_files, **kw)
    if missing == "lora":  # the FaceID SDXL file without its embedded LoRA and no companion LoRA file
        proj, ip = _faceid_sdxl_shapes("faceid")
        zero = torch.zeros((), dtype=torch.float16)
        torch.save({"image_proj": {k: zero.expand(s) for k, s in proj.items()},
                    "ip_adapter": {k: zero.expand(s) for k, s in ip.items() if "_lora." not in k}},
                   str(comfy / "models" / "ipadapter" / "ip-adapter-faceid_sdxl.bin"))
    rc, rows = _json_rows(comfy, capsys)
    row = rows["mode: public weights (FaceID SDXL)"]
    assert rc == 0 and row["status"] == "warn" and row["detail"] == "not ready", row
    want = {"base": "sd_xl_base_1.0.safetensors", "openpose": "OpenPoseXL2.safetensors",
            "vit-h": "CLIP ViT-H-14", "vit-h (bigG only)": "CLIP ViT-H-14", "lora": "companion files"}[missing]
    assert want in row["fix"], row
    if missing == "base":
        assert rows["SDXL checkpoint"]["status"] == "warn" and "sd_xl_base_1.0" in rows["SDXL checkpoint"]["fix"]
    if missing.startswith("vit-h"):
        plus = rows["FaceID ip-adapter-faceid-plusv2_sdxl.bin"]
        assert plus["status"] == "warn" and "CLIP ViT-H-14" in plus["fix"]
        if "bigG" in missing:
            assert "found only CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors (1664 wide), not ViT-H" in plus["fix"]
    if missing == "lora":
        assert "_sdxl_lora.safetensors" in rows["FaceID ip-adapter-faceid_sdxl.bin"]["fix"]
    assert rows["mode: public weights (FaceID SD1.5)"]["status"] == "ok"


def test_sdxl_only_install(good, tmp_path, sdxl_files, capsys):
    """Only SDXL models (no SD1.5 checkpoint, no SD1.5 FaceID or ControlNet): the SDXL FaceID mode is ready, the
    missing SD1.5 checkpoint is a warning, and the doctor exits 0."""
    comfy = _sdxl_install(good, tmp_path, sdxl_files, faceid=("faceid",))
    m = comfy / "models"
    for f in ("checkpoints/v1-5-tiny.safetensors", "ipadapter/ip-adapter-faceid-portrait-v11_sd15.bin",
              "controlnet/control_v11p_sd15_openpose_tiny.safetensors"):
        (m / f).unlink()
    shutil.rmtree(m / "instantfamily")
    rc, rows = _json_rows(comfy, capsys)
    assert rc == 0
    assert rows["SD1.5 checkpoint"]["status"] == "warn" and "SD1.5 FaceID" in rows["SD1.5 checkpoint"]["detail"]
    assert rows["mode: public weights (FaceID SDXL)"]["detail"] == "ready"
    for name in ("mode: InstantFamily", "mode: public weights (FaceID SD1.5)"):
        assert rows[name]["detail"] == "not ready" and "SD1.5 checkpoint" in rows[name]["fix"]
    assert "ready to generate" not in rows


def _write_instantid(path: Path, drop: str = "") -> None:
    """InstantID's ``ip-adapter.bin`` (nested pickle, FP32) with every published key and shape (Resampler keys from
    ``support/instantid_files``' registration order, ``to_k_ip``/``to_v_ip`` at the note's widths), each tensor a
    stride-0 view of one zero (a few kB); ``drop`` leaves one key out."""
    from support import instantid_files as iif
    from instantfamily_core.instantid.files import expected_image_proj
    zero = torch.zeros((), dtype=torch.float32)
    proj = {k: zero.expand(s) for k, s in expected_image_proj().items()}
    ip = {f"{p}.to_{w}_ip.weight": zero.expand(iif.sdxl_hidden(p), 2048) for p in iif.SDXL_ATTN2 for w in "kv"}
    ip.pop(drop, None)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"image_proj": proj, "ip_adapter": ip}, str(path))


@pytest.mark.parametrize("case", ["ready", "no antelopev2", "no identitynet", "broken files"])
def test_instantid_files_and_mode(good, tmp_path, sdxl_files, capsys, case):
    """InstantID's adapter in models/instantid is checked key by key, its IdentityNet (an SDXL ControlNet named
    InstantID/IdentityNet) is recognised, and the mode row says what is missing: antelopev2, the IdentityNet; a
    truncated adapter and an SD1.5 ControlNet named as an IdentityNet are FAIL rows naming the fix."""
    root, _ = sdxl_files
    comfy = _sdxl_install(good, tmp_path, sdxl_files, faceid=())
    m = comfy / "models"
    _write_instantid(m / "instantid" / "ip-adapter.bin", drop="139.to_v_ip.weight" if case == "broken files" else "")
    if case != "no antelopev2":
        (m / "insightface" / "models" / "antelopev2").symlink_to(m / "insightface" / "models" / "buffalo_l")
    if case != "no identitynet":
        (m / "controlnet" / "instantid-identitynet-sdxl.safetensors").symlink_to(
            root / "controlnet" / "controlnet-openpose-sdxl-1.0" / "diffusion_pytorch_model.safetensors")
    if case == "broken files":
        shutil.copy(m / "controlnet" / "control_v11p_sd15_openpose_tiny.safetensors",
                    m / "controlnet" / "identitynet_sd15.safetensors")
    rc, rows = _json_rows(comfy, capsys)
    mode = rows["mode: InstantID (SDXL)"]
    if case == "broken files":
        adapter = rows["InstantID ip-adapter.bin"]
        assert rc == 1 and adapter["status"] == "FAIL" and "139.to_v_ip.weight" in adapter["detail"], adapter
        assert "InstantX/InstantID" in adapter["fix"]
        sd15 = rows["IdentityNet identitynet_sd15.safetensors"]
        assert sd15["status"] == "FAIL" and "SD1.5" in sd15["detail"] and "IdentityNet" in sd15["fix"], sd15
        assert mode["detail"] == "not ready" and "ip-adapter.bin" in mode["fix"]
        return
    assert rc == 0
    assert rows["InstantID ip-adapter.bin"]["status"] == "ok"
    if case == "ready":
        assert rows["IdentityNet instantid-identitynet-sdxl.safetensors"] == {
            "name": "IdentityNet instantid-identitynet-sdxl.safetensors", "status": "ok",
            "detail": "SDXL ControlNet, diffusers layout", "fix": ""}
        assert mode == {"name": "mode: InstantID (SDXL)", "status": "ok", "detail": "ready", "fix": ""}
    else:
        want = {"no antelopev2": "face pack antelopev2", "no identitynet": "IdentityNet"}[case]
        assert mode["status"] == "warn" and mode["detail"] == "not ready" and want in mode["fix"], mode
        assert ("ip-adapter.bin" in mode["fix"]) is False


def test_openpose_layout_tells_sdxl_from_sd15(sdxl_files):
    from instantfamily_core.errors import ModelFileError
    d = _doctor()
    shapes = _sdxl_controlnet_shapes()
    assert d.openpose_layout(shapes) == ("diffusers", "SDXL")
    ldm = {"control_model.zero_convs.0.0.weight": (320, 320, 1, 1), "control_model.input_hint_block.0.weight":
           (16, 3, 3, 3), "control_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768)}
    assert d.openpose_layout(ldm) == ("ldm", "SD1.5")
    sdxl_ldm = {**ldm, "control_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (640, 2048),
                "control_model.label_emb.0.0.weight": (1280, 2816)}
    assert d.openpose_layout(sdxl_ldm) == ("ldm", "SDXL")
    sd2 = {**ldm, "control_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024)}
    with pytest.raises(ModelFileError, match=r"1024 \(SD2.x\)"):
        d.openpose_layout(sd2)
    no_adm = {k: v for k, v in shapes.items() if not k.startswith("add_embedding.")}
    with pytest.raises(ModelFileError, match="2816"):
        d.openpose_layout(no_adm)
    root, _ = sdxl_files
    assert d.checkpoint_base(root / "checkpoints" / "sd_xl_base_1.0.safetensors") == "SDXL"
    assert d.checkpoint_base(root / "checkpoints" / "sd_xl_refiner_1.0.safetensors") == "SDXL refiner"
