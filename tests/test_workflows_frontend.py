"""The bundled UI workflows in ComfyUI's real frontend (headless Chromium): each loads without a page error and
the frontend's own ``graphToPrompt`` turns it into exactly its API twin."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from tools.devkit.comfy_host import HOW_TO_PROVIDE, REPO, find_comfyui

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.skipif(find_comfyui() is None, reason=HOW_TO_PROVIDE),
              pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium: apt-get install chromium")]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]


def test_ui_workflows_load_in_the_frontend_and_convert_to_their_api_twins(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs Playwright for Python: pip install playwright")
    from tools.devkit.comfy_server import ComfyServer
    workflows = sorted((REPO / "workflows").glob("*.json"))
    assert workflows
    with ComfyServer(tmp_path) as server, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url + "/")
            page.wait_for_function("window.app && window.app.graph", timeout=90000)
            time.sleep(1)
            before = len(errors)  # the offline frontend may complain about its own start-up (release checks)
            for wf in workflows:
                page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", json.loads(wf.read_text()))
                out = page.evaluate("async () => (await window.app.graphToPrompt()).output")
                got = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in out.items()}
                twin = json.loads((REPO / "workflows" / "api" / wf.name).read_text())
                assert got == twin, wf.name
            assert errors[before:] == [], errors[before:]
        finally:
            browser.close()
