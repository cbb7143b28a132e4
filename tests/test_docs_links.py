"""README.md and docs/*.md: every relative link and ``#anchor`` resolves, the README stays short and keeps the test
command CI runs, and the reference material moved out of the README is still in docs/.

Anchors follow GitHub's heading ids: the heading's text (links reduced to their text, markup removed), lowercased,
every character that is not a letter, digit, ``_``, ``-`` or space dropped, each space turned into ``-``; a repeated
id gets ``-1``, ``-2``, … in order. Headings and links inside fenced code blocks and inline code do not count."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_README_LINES = 300
TEST_COMMAND = "python -m pytest tests"

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
TEXT_LINK = re.compile(r"!?\[([^\]\n]*)\]\([^)\n]*\)")

# Distinctive phrases of the reference sections that left README.md; each must be in some docs/*.md page
# (whitespace, including line breaks, is compared collapsed).
MOVED_PHRASES = [
    # nodes.md: install, models and folders, nodes, workflows
    "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu",
    "`CHECKPOINTS_FOLDER`, `IDENTITIES_FOLDER`, `INSIGHTFACE_FOLDER` and `OPENPOSE_FOLDER`",
    "| **InstantFamily Pose to Masks** | identities, template (bundled 1–8 people)",
    "| **Apply InstantFamily** | model, instantfamily, identities, pose_image, masks, positive, negative",
    "**torch.compile.** ComfyUI's TorchCompileModel node",
    "`instantfamily_7_identities_template` — seven people on `family_7`",
    "python tools/make_pose_templates.py",
    # public-weights.md
    "| **InstantFamily FaceID Loader (public weights)** |",
    "| `ip-adapter-faceid-portrait-v11_sd15.bin` / `-portrait_sd15.bin` | `models/ipadapter/` |",
    "tencent-ailab/IP-Adapter#430",
    "python benchmarks/bench_faceid.py --device cpu",
    # doctor.md
    "python tools/doctor.py [--comfyui /path/to/ComfyUI] [--json] [--quiet]",
    # training.md
    "python training/prepare.py --input data/raw --output data/shards",
    "| `{i}.local` | float16 `(F, 512, 7, 7)` | their local feature maps |",
    "accelerate launch --config_file training/configs/accelerate/ddp_8gpu.yaml training/train.py ...",
    "| `--keep-checkpoints` | `--checkpoints_total_limit` (default 3, 0 = all; theirs all) |",
    "python training/export.py --checkpoint runs/if/checkpoints/step-0400000 --output instantfamily.safetensors",
    "from training.model import predict_noise, load_controlnet_from_checkpoint",
    "cd tests && python -m pytest -q test_training_*.py",
    # evaluation.md
    "python training/evaluate.py --cases cases.json --images outputs/ckpt-5000 --out eval/ckpt-5000",
    "| `facenet:<weights.pt>` | facenet-pytorch `InceptionResnetV1` (512-d), MTCNN crops |",
    "`(Sim(A,A′) + Sim(B,B′))/2 + (1 − Sim(A′,B′))`",
    "pytest tests/test_evaluate_metrics.py tests/test_evaluate_real.py",
    "python training/generate.py --cases cases.json --checkpoint runs/if/instantfamily.safetensors",
    # benchmarks.md
    "python benchmarks/bench_step.py --device cuda --size full --dtype fp16 --out benchmarks/out/gpu",
    "python benchmarks/bench_train_step.py --out benchmarks/out/cpu",
    # architecture.md
    "**checkpoint schema v1**: one `.safetensors` with `projector.*` and `controlnet.*` tensors",
    "**One face-box rule** (`pose.face_box`)",
    "`tools/devkit/` — helpers shared by the tests, the benchmarks and the tools",
    # testing.md
    "**with `CI=true` nothing may skip**",
    "checkpoint metadata 300, cases files (loaded and laid out as generate does) 250, shard manifests 200 — 2100 in all",
    "`tests/test_soak_server.py` runs 50 prompts on one ComfyUI server",
]


def _pages() -> list[Path]:
    return [README] + sorted(DOCS.glob("*.md"))


def _prose_lines(text: str):
    """(line number, line) outside fenced code blocks."""
    fenced = False
    for n, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield n, line


def github_slug(heading: str) -> str:
    text = TEXT_LINK.sub(r"\1", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line in _prose_lines(path.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if not m:
            continue
        slug = github_slug(m.group(2))
        if slug in seen:
            seen[slug] += 1
            slug = f"{slug}-{seen[slug]}"
        else:
            seen[slug] = 0
        out.add(slug)
    return out


def links(path: Path):
    """(line number, target) of every link and image in prose, inline code removed."""
    for n, line in _prose_lines(path.read_text(encoding="utf-8")):
        for m in LINK.finditer(INLINE_CODE.sub("", line)):
            yield n, m.group(1)


def test_slug_rules():
    assert github_slug("Training CLI (`training/`)") == "training-cli-training"
    assert github_slug("Core library (`instantfamily_core/`)") == "core-library-instantfamily_core"
    assert github_slug("Metrics (mean ± std)") == "metrics-mean--std"
    assert github_slug("Public-weights mode (IP-Adapter-FaceID + the public OpenPose ControlNet)") == \
        "public-weights-mode-ip-adapter-faceid--the-public-openpose-controlnet"
    assert github_slug("See [the docs](docs/x.md) *now*") == "see-the-docs-now"


def test_duplicate_headings_get_suffixes(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("# Tests\n\n```\n# Tests\n```\n\n## Tests\n\n### Tests\n", encoding="utf-8")
    assert anchors(page) == {"tests", "tests-1", "tests-2"}


@pytest.mark.parametrize("page", _pages(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_links_and_anchors_resolve(page):
    broken = []
    for n, target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        where = f"{page.relative_to(ROOT).as_posix()}:{n}: {target}"
        if not dest.exists():
            broken.append(f"{where} (no such file: {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest})")
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{where} (no heading with id '{anchor}' in {dest.relative_to(ROOT).as_posix()})")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_docs_pages_exist():
    for name in ("README.md", "nodes.md", "public-weights.md", "doctor.md", "training.md", "evaluation.md",
                 "benchmarks.md", "architecture.md", "testing.md"):
        assert (DOCS / name).is_file(), f"docs/{name} is missing"


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines; at most {MAX_README_LINES} (move reference to docs/)"


def test_readme_keeps_the_test_command_ci_runs():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert "## Tests" in lines, "README.md lost its '## Tests' section"
    section = lines[lines.index("## Tests") + 1:]
    end = next((i for i, line in enumerate(section) if line.startswith("## ")), len(section))
    section = section[:end]
    assert "```bash" in section, "README.md's Tests section has no ```bash block"
    block = section[section.index("```bash") + 1:]
    block = block[:block.index("```")]
    assert TEST_COMMAND in [line.strip() for line in block], \
        f"README.md's Tests section must keep the line '{TEST_COMMAND}' in its bash block (CI runs it)"


def test_moved_reference_is_in_docs():
    docs = {p.name: " ".join(p.read_text(encoding="utf-8").split()) for p in sorted(DOCS.glob("*.md"))}
    missing = [ph for ph in MOVED_PHRASES if not any(" ".join(ph.split()) in text for text in docs.values())]
    assert not missing, "reference text no longer in any docs/*.md page:\n" + "\n".join(missing)
