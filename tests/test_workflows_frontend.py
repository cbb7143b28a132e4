"""The bundled templates in ComfyUI's real frontend (headless Chromium) against a real server: the template browser
lists the pack's templates with their thumbnails; each UI workflow opens without a page error or a missing node
type, with its four labelled groups and its note, no link crossing a group it does not belong to, and the
frontend's own ``graphToPrompt`` turns it into exactly its API twin; a node's help page opens in the node library
with its pictures. A screenshot of the template browser and of
each template at the frontend's fit-to-view is written to ``$INSTANTFAMILY_ARTIFACTS/frontend`` (default
``.artifacts/frontend`` in the repository, never committed)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from tools.devkit.comfy_host import HOW_TO_PROVIDE, REPO, find_comfyui
from tools.devkit.comfy_server import PACK_NAME
from tools.devkit.workflow_format import API_DIR, WORKFLOWS_DIR, links_crossing_groups

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.skipif(find_comfyui() is None, reason=HOW_TO_PROVIDE),
              pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium: apt-get install chromium")]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]
GROUPS = ["People", "Pose and masks", "Model", "Generate"]
ARTIFACTS = Path(os.environ.get("INSTANTFAMILY_ARTIFACTS") or REPO / ".artifacts") / "frontend"


def test_templates_in_the_real_frontend(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs Playwright for Python: pip install playwright")
    from tools.devkit.comfy_server import ComfyServer
    workflows = sorted(WORKFLOWS_DIR.glob("*.json"))
    assert workflows and all(wf.with_suffix(".jpg").is_file() for wf in workflows)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with ComfyServer(tmp_path) as server, sync_api.sync_playwright() as p:
        assert sorted(server.get("/workflow_templates")[PACK_NAME]) == sorted(wf.stem for wf in workflows)
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 2200})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url + "/")
            page.wait_for_function("window.app && window.app.graph", timeout=90000)
            time.sleep(1)
            before = len(errors)  # the offline frontend may complain about its own start-up (release checks)
            thumbs: list[str] = []
            prefix = f"/workflow_templates/{PACK_NAME}/"

            def on_response(r):
                if prefix in r.url and r.url.endswith(".jpg") and r.status == 200 and \
                        r.headers.get("content-type", "").startswith("image/jpeg"):
                    thumbs.append(r.url.split("/")[-1])
                    page.evaluate("() => { window.__thumbs = (window.__thumbs || 0) + 1; }")
            page.on("response", on_response)

            # the template browser: our category, one card per template, each thumbnail loaded
            page.evaluate("async () => { await window.app.extensionManager.command.execute("
                          "'Comfy.BrowseTemplates'); }")
            page.get_by_text(PACK_NAME, exact=True).first.click()
            expected = sorted(f"{wf.stem}.jpg" for wf in workflows)
            for wf in workflows:  # cards load their thumbnail when they come into view
                page.get_by_text(wf.stem, exact=True).first.scroll_into_view_if_needed(timeout=30000)
            page.wait_for_function("(n) => n <= window.__thumbs", arg=len(expected), timeout=30000)
            time.sleep(1)
            page.screenshot(path=str(ARTIFACTS / "template_browser.png"))
            assert sorted(set(thumbs)) == expected, thumbs  # every card fetched its thumbnail: 200, image/jpeg
            for wf in workflows:  # and shows its name
                assert page.get_by_text(wf.stem, exact=True).count() >= 1, wf.stem
            loaded = page.evaluate("() => [...document.querySelectorAll('img')].filter(i => i.src.startsWith("
                                   "'blob:') && i.complete && i.naturalWidth > 0).length")
            assert loaded >= len(expected)  # the frontend shows fetched thumbnails as blob images
            page.keyboard.press("Escape")

            for wf in workflows:
                ui = json.loads(wf.read_text())
                assert links_crossing_groups(ui) == [], wf.name
                page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", ui)
                page.evaluate("async () => { await window.app.extensionManager.command.execute("
                              "'Comfy.Canvas.FitView'); }")
                time.sleep(0.5)
                graph = page.evaluate("() => ({groups: window.app.graph._groups.map(g => g.title), "
                                      "notes: window.app.graph._nodes.filter(n => n.type === 'MarkdownNote')"
                                      ".map(n => n.widgets_values[0]), "
                                      "missing: window.app.graph._nodes.map(n => n.type)"
                                      ".filter(t => !LiteGraph.registered_node_types[t])})")
                page.screenshot(path=str(ARTIFACTS / f"{wf.stem}.png"))
                assert graph["groups"] == GROUPS and graph["missing"] == [], (wf.name, graph)
                assert len(graph["notes"]) == 1 and "**Download**" in graph["notes"][0], wf.name
                out = page.evaluate("async () => (await window.app.graphToPrompt()).output")
                got = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in out.items()}
                assert got == json.loads((API_DIR / wf.name).read_text()), wf.name

            # a node's help page in the node library panel (web/docs/<NodeClass>.md), with its pictures
            page.evaluate("async () => { await window.app.extensionManager.command.execute("
                          "'Workspace.ToggleSidebarTab.node-library'); }")
            page.locator("input[placeholder*='Search']").first.fill("Pose to Masks")
            item = page.get_by_text("InstantFamily Pose to Masks").first
            item.wait_for(timeout=15000)
            item.hover()
            page.locator("button.help-button").first.click()
            page.get_by_text("Common errors").first.wait_for(timeout=15000)
            page.wait_for_function("() => [...document.querySelectorAll('img')].some(i => i.src.includes("
                                   "'/docs/images/pose_to_masks_preview.png') && i.complete && i.naturalWidth > 0)",
                                   timeout=15000)
            page.screenshot(path=str(ARTIFACTS / "node_help_pose_to_masks.png"))
            assert errors[before:] == [], errors[before:]
        finally:
            browser.close()
