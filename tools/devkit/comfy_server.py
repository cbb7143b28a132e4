"""A real ComfyUI server on 127.0.0.1 with this pack, model folders in a temp dir, and small HTTP helpers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from .comfy_host import REPO, find_comfyui

PACK_NAME = "ComfyUI-InstantFamily"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """``with ComfyServer(base) as srv:`` starts ComfyUI with ``base/models/...`` and ``base/custom_nodes``."""

    def __init__(self, base: Path, extra_args: tuple = (), extra_packs: dict | None = None, env: dict | None = None):
        """``extra_packs``: ``{folder name: path}`` of more custom node packs to load beside this one (linked into
        ``custom_nodes``); ``env``: variables added to the server's environment."""
        self.base = Path(base)
        self.extra_packs = dict(extra_packs or {})
        self.env = dict(env or {})
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra_args = extra_args
        self.proc = None
        self.log_path = self.base / "server.log"
        for d in ("custom_nodes", "models/checkpoints", "models/instantfamily", "models/insightface/models",
                  "models/unet", "in", "out", "user"):
            (self.base / d).mkdir(parents=True, exist_ok=True)
        for name, path in {PACK_NAME: REPO, **self.extra_packs}.items():
            link = self.base / "custom_nodes" / name
            if not link.exists():
                link.symlink_to(path, target_is_directory=True)

    def _yaml(self) -> Path:
        path = self.base / "extra_model_paths.yaml"
        path.write_text("instantfamily_tests:\n"
                        f"  base_path: {self.base}\n"
                        "  custom_nodes: custom_nodes\n"
                        "  checkpoints: models/checkpoints\n"
                        "  diffusion_models: models/unet\n"
                        "  instantfamily: models/instantfamily\n"
                        "  insightface: models/insightface\n")
        return path

    def __enter__(self):
        root = find_comfyui()
        cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch", "--disable-api-nodes", "--database-url", "sqlite:///:memory:",
               "--output-directory", str(self.base / "out"), "--input-directory", str(self.base / "in"),
               "--user-directory", str(self.base / "user"), "--extra-model-paths-config", str(self._yaml()),
               "--disable-all-custom-nodes", "--whitelist-custom-nodes", PACK_NAME, *self.extra_packs, *self.extra_args]
        env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", PYTHONUNBUFFERED="1", **self.env)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=root, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited early:\n{self.log()[-4000:]}")
            try:
                self.get("/system_stats")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        raise RuntimeError(f"ComfyUI did not answer within 120 s:\n{self.log()[-4000:]}")

    def __exit__(self, *exc):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post_prompt(self, prompt: dict) -> tuple[int, dict]:
        req = urllib.request.Request(self.url + "/prompt", data=json.dumps({"prompt": prompt}).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def run(self, prompt: dict, timeout: float = 300) -> dict:
        """Queue ``prompt`` and wait for its history entry (``status`` and ``outputs``)."""
        status, body = self.post_prompt(prompt)
        if status != 200:
            return {"rejected": body}
        pid = body["prompt_id"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            hist = self.get(f"/history/{pid}")
            if pid in hist and hist[pid].get("status", {}).get("completed") is not None:
                entry = hist[pid]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            time.sleep(0.3)
        raise TimeoutError(f"prompt {pid} did not finish in {timeout} s:\n{self.log()[-3000:]}")


def execution_error(entry: dict) -> dict | None:
    """The ``execution_error`` message of a history entry, if any."""
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return data
    return None
