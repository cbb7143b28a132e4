"""Help pages of the nodes, in ComfyUI's node-docs convention: ``web/docs/<NodeClass>.md`` for every node of the
pack, served from ``WEB_DIRECTORY`` and shown by the frontend's node library (the "?" / help panel).

Where the convention comes from (checked against what ComfyUI 0.3.64 ships):

* ``comfyui_frontend_package`` 1.27.10, ``static/assets/index-*.js``, ``NodeHelpService.fetchCustomNodeHelp``: for a
  node whose ``python_module`` is ``custom_nodes.<folder>`` it fetches
  ``/extensions/${customNodeName}/docs/${node.name}/${locale}.md`` and, when that is not ok,
  ``/extensions/${customNodeName}/docs/${node.name}.md`` (``customNodeName`` = ``<folder>`` without an ``@…``
  suffix); relative image links of the page are resolved against ``/extensions/${customNodeName}/docs/``
  (``getNodeHelpBaseUrl``).
* ComfyUI's ``nodes.load_custom_node`` stores ``EXTENSION_WEB_DIRS[<folder>] = <pack>/WEB_DIRECTORY`` and
  ``server.py`` serves it with ``web.static('/extensions/' + name, dir)``; ``GET /extensions`` lists every ``.js``
  under it as a frontend extension to load — so ``web/`` holds pages and PNGs only.

Checked here: every node has a page with Inputs / Outputs / Common errors, every input and output of the node (name,
type, required or optional) is in its tables and nothing else is, error classes named exist, images exist, are
small PNGs and match what the pack's own code renders now; then, over HTTP on a real ComfyUI server, the URL the
frontend fetches returns each page and the image URL returns the image.

``python tests/test_node_docs.py`` re-renders the images (Pose to Masks on the bundled ``family_3`` template).
"""

from __future__ import annotations

import builtins
import re
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

if __name__ == "__main__":  # run as a script: the repository root first, as tests/conftest.py puts it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.devkit.comfy_host import HOW_TO_PROVIDE, REPO, find_comfyui

pytestmark = pytest.mark.skipif(find_comfyui() is None, reason=HOW_TO_PROVIDE)

WEB = REPO / "web"
DOCS = WEB / "docs"
IMAGES = DOCS / "images"
REQUIRED_SECTIONS = ("Inputs", "Outputs", "Common errors")
MAX_IMAGE_BYTES = 60_000
SERVED_SUFFIXES = {".md", ".png"}  # anything .js under web/ would be loaded by the frontend as an extension
IMAGE_LINK = re.compile(r"!\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


@pytest.fixture(scope="module")
def pack():
    from tools.devkit.comfy_host import load_pack
    return load_pack()


# -- reading a page ---------------------------------------------------------------------------------------------

def sections(text: str) -> dict[str, str]:
    """``## Heading`` → the text up to the next ``## `` heading."""
    out, current = {}, None
    for line in text.splitlines():
        if line.startswith("## "):
            current = line[3:].strip()
            out[current] = ""
        elif current is not None:
            out[current] += line + "\n"
    return out


def table_rows(section: str) -> list[list[str]]:
    """Body rows of the Markdown tables in ``section`` as lists of cells (header and separator rows dropped)."""
    rows, header = [], None
    for line in section.splitlines():
        line = line.strip()
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if header is None:
            header = cells
            continue
        assert len(cells) == len(header), f"a row with {len(cells)} cells under a {len(header)}-column header " \
                                          f"(a '|' inside a cell?): {line}"
        if all(set(c) <= set("-: ") for c in cells):
            continue
        rows.append(cells)
    return rows


def documented(section: str) -> dict[str, list[str]]:
    """First cell's `name` → the row's cells, for every table row of ``section``."""
    out = {}
    for cells in table_rows(section):
        names = re.findall(r"`([^`]+)`", cells[0])
        assert len(names) == 1, f"a row's first cell must name one input/output in backticks: {cells}"
        out[names[0]] = cells
    return out


def plain(cell: str) -> str:
    return cell.replace("`", "").strip()


def type_label(entry) -> str:
    kind = entry[0]
    return "choice" if isinstance(kind, (list, tuple)) or kind == "COMBO" else str(kind)


def page(cls_name: str) -> Path:
    return DOCS / f"{cls_name}.md"


# -- the pages --------------------------------------------------------------------------------------------------

def test_every_node_has_a_page_that_documents_all_its_inputs_and_outputs(pack):
    import instantfamily_core.errors as errors
    problems = []
    for cls_name, cls in pack.NODE_CLASS_MAPPINGS.items():
        path = page(cls_name)
        if not path.is_file():
            problems.append(f"{cls_name}: no page {path.relative_to(REPO)}")
            continue
        text = path.read_text(encoding="utf-8")
        parts = sections(text)
        if not text.startswith("# "):
            problems.append(f"{cls_name}: the page must start with a '# ' title")
        missing = [s for s in REQUIRED_SECTIONS if s not in parts]
        if missing:
            problems.append(f"{cls_name}: sections {missing} missing (has {list(parts)})")
            continue

        spec = cls.INPUT_TYPES()
        inputs = {name: (entry, section) for section in ("required", "optional")
                  for name, entry in (spec.get(section) or {}).items()}
        rows = documented(parts["Inputs"])
        for name, (entry, section) in inputs.items():
            if name not in rows:
                problems.append(f"{cls_name}: input `{name}` is not in the Inputs table")
                continue
            cells = rows[name]
            if len(cells) < 4:
                problems.append(f"{cls_name}: input row `{name}` needs 4 cells (input, type, required, meaning)")
                continue
            if plain(cells[1]) != type_label(entry):
                problems.append(f"{cls_name}: input `{name}` is {type_label(entry)}, the page says {plain(cells[1])}")
            want = "yes" if section == "required" else "optional"
            if plain(cells[2]) != want:
                problems.append(f"{cls_name}: input `{name}` is {section}: the page must say {want!r}, "
                                f"says {plain(cells[2])!r}")
        problems += [f"{cls_name}: the page documents input `{n}`, which the node does not have"
                     for n in rows if n not in inputs]

        names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES  # what /object_info calls the outputs
        outputs = dict(zip(names, cls.RETURN_TYPES))
        rows = documented(parts["Outputs"])
        for name, kind in outputs.items():
            if name not in rows:
                problems.append(f"{cls_name}: output `{name}` is not in the Outputs table")
            elif plain(rows[name][1]) != kind:
                problems.append(f"{cls_name}: output `{name}` is {kind}, the page says {plain(rows[name][1])}")
        problems += [f"{cls_name}: the page documents output `{n}`, which the node does not have"
                     for n in rows if n not in outputs]

        errs = parts["Common errors"]
        if not errs.strip():
            problems.append(f"{cls_name}: 'Common errors' is empty")
        for err in set(re.findall(r"`(\w+Error)`", errs)):
            if not isinstance(getattr(errors, err, getattr(builtins, err, None)), type):
                problems.append(f"{cls_name}: 'Common errors' names {err}, which neither instantfamily_core.errors "
                                "nor Python defines")
    assert not problems, "\n".join(problems)


def test_no_page_without_a_node_and_only_pages_and_pngs_are_served(pack):
    pages = {p.stem for p in DOCS.glob("*.md")}
    assert pages - set(pack.NODE_CLASS_MAPPINGS) == set(), "pages of nodes the pack does not have"
    served = sorted(p.relative_to(WEB).as_posix() for p in WEB.rglob("*") if p.is_file())
    others = [p for p in served if Path(p).suffix not in SERVED_SUFFIXES]
    assert others == [], f"web/ is served to the browser and its .js files are loaded as frontend extensions: {others}"


def image_links(text: str) -> list[str]:
    return IMAGE_LINK.findall(text) + re.findall(r"<img[^>]*\ssrc=[\"']([^\"']+)", text)


def test_every_image_linked_from_a_page_exists_and_is_a_small_png():
    linked = set()
    for path in sorted(DOCS.glob("*.md")):
        for href in image_links(path.read_text(encoding="utf-8")):
            # the frontend prefixes relative links with /extensions/<pack>/docs/ (absolute ones are left alone)
            assert not re.match(r"^(/|https?://)", href), f"{path.name}: link images relative to docs/: {href}"
            target = (DOCS / href).resolve()
            assert target.is_relative_to(DOCS.resolve()), f"{path.name}: {href} leaves web/docs/"
            assert target.is_file(), f"{path.name}: image {href} does not exist"
            data = target.read_bytes()
            assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{href} is not a PNG"
            assert len(data) < MAX_IMAGE_BYTES, f"{href}: {len(data)} bytes (keep images < {MAX_IMAGE_BYTES})"
            linked.add(target)
    unused = sorted(p.name for p in IMAGES.glob("*") if p.resolve() not in linked)
    assert unused == [], f"images no page links to: {unused}"


# -- the images: rendered by the pack's own Pose to Masks node --------------------------------------------------

TEMPLATE, SIZE = "family_3.json", 384


def render_doc_images(pack) -> dict:
    """File name → ``H×W×3`` uint8 image, each made by the pack's Pose to Masks node on a bundled template."""
    import numpy as np
    import torch
    from instantfamily_core.identity import IdentityFeatures, SkippedIdentity

    node = pack.NODE_CLASS_MAPPINGS["InstantFamilyPoseToMasks"]()
    modes = node.INPUT_TYPES()["optional"]["control_image"][0]
    people = [IdentityFeatures(torch.ones(4), torch.ones(1, 2, 2), name=f"person {n}") for n in (1, 2, 3)]

    def rgb(image):
        return (image[0].numpy() * 255).round().astype(np.uint8)

    pose, masks, preview = node.run(people, TEMPLATE, SIZE, SIZE, 0.25, "auto", control_image=modes[0])
    openpose, _, _ = node.run(people, TEMPLATE, SIZE, SIZE, 0.25, "auto", control_image=modes[1])
    skipped = [people[0], SkippedIdentity("person 2", "no face found"), people[2]]
    _, _, preview_skipped = node.run(skipped, TEMPLATE, SIZE, SIZE, 0.25, "auto", control_image=modes[0])
    frame = 4  # a grey frame around each mask, so the black ones stay apart on a dark panel
    tiles = [np.pad((m.numpy() * 255).round().astype(np.uint8), frame, constant_values=96) for m in masks]
    strip = np.concatenate(tiles, axis=1)
    return {"pose_to_masks_pose_image.png": rgb(pose),
            "pose_to_masks_masks.png": np.repeat(strip[..., None], 3, axis=2),
            "pose_to_masks_preview.png": rgb(preview),
            "pose_to_masks_openpose.png": rgb(openpose),
            "pose_to_masks_preview_skipped.png": rgb(preview_skipped)}


def write_doc_images(pack, folder: Path = IMAGES) -> list[Path]:
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, image in render_doc_images(pack).items():
        Image.fromarray(image).save(folder / name, optimize=True)
        written.append(folder / name)
    return written


def test_images_show_what_the_pack_renders_now(pack):
    """Pose to Masks drawn again by the current code looks like the committed images (a few anti-aliased pixels
    may differ between OpenCV builds; a changed palette, layout or size does not pass)."""
    import numpy as np
    from PIL import Image
    for name, now in render_doc_images(pack).items():
        with Image.open(IMAGES / name) as im:
            committed = np.asarray(im.convert("RGB"))
        assert committed.shape == now.shape, (name, committed.shape, now.shape)
        differs = (np.abs(committed.astype(int) - now.astype(int)).max(axis=2) > 48).mean()
        assert differs < 0.005, f"{name}: {differs:.2%} of the pixels changed; run python tests/test_node_docs.py"


# -- over HTTP, as the frontend fetches them ----------------------------------------------------------------------

def http_get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read()


def custom_node_name(python_module: str) -> str:
    """The frontend's ``extractCustomNodeName``: ``custom_nodes.<folder>`` → ``<folder>`` without ``@…``."""
    parts = python_module.split(".")
    assert len(parts) >= 2 and parts[0] == "custom_nodes", python_module
    return parts[1].split("@")[0]


def fetch_custom_node_help(base_url: str, python_module: str, node_name: str, locale: str = "en") -> tuple[str, str]:
    """``NodeHelpService.fetchCustomNodeHelp`` of the frontend: the locale page, else the plain one. Returns
    ``(url that answered, markdown)``."""
    pack_name = custom_node_name(python_module)
    for path in (f"/extensions/{pack_name}/docs/{node_name}/{locale}.md",
                 f"/extensions/{pack_name}/docs/{node_name}.md"):
        status, _, body = http_get(base_url + path)
        if status == 200:
            return path, body.decode("utf-8")
    raise AssertionError(f"no help page for {node_name} (last status {status})")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from tools.devkit.comfy_server import ComfyServer
    with ComfyServer(tmp_path_factory.mktemp("comfy_docs")) as srv:  # no models needed to serve pages
        yield srv


def test_the_frontend_gets_every_page_and_its_images_over_http(server, pack):
    from tools.devkit.comfy_server import PACK_NAME
    info = server.get("/object_info")
    for cls_name in pack.NODE_CLASS_MAPPINGS:
        module = info[cls_name]["python_module"]
        assert custom_node_name(module) == PACK_NAME, module
        url, text = fetch_custom_node_help(server.url, module, cls_name)
        assert url == f"/extensions/{PACK_NAME}/docs/{cls_name}.md"  # no locale pages: the fallback answers
        assert text == page(cls_name).read_text(encoding="utf-8"), cls_name

    cls_name = "InstantFamilyPoseToMasks"
    status, kind, body = http_get(f"{server.url}/extensions/{PACK_NAME}/docs/{cls_name}.md")
    assert status == 200 and body == page(cls_name).read_bytes()
    links = image_links(body.decode("utf-8"))
    assert links, "the Pose to Masks page shows its preview"
    base = f"/extensions/{PACK_NAME}/docs/"  # the frontend's getNodeHelpBaseUrl for a custom node
    for href in links:
        status, kind, data = http_get(server.url + base + href)
        assert status == 200 and kind == "image/png", (href, status, kind)
        assert data == (DOCS / href).read_bytes(), href

    extensions = server.get("/extensions")  # the .js files the frontend would load: none of this pack
    assert not [e for e in extensions if e.startswith(f"/extensions/{PACK_NAME}/")], extensions


if __name__ == "__main__":  # re-render the images: python tests/test_node_docs.py
    from tools.devkit.comfy_host import load_pack
    for path in write_doc_images(load_pack()):
        print(f"{path.relative_to(REPO)}: {path.stat().st_size} bytes")
