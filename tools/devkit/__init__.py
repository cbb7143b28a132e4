"""Development helpers shared by ``tests/``, ``benchmarks/`` and ``tools/``; never imported by the node pack,
``instantfamily_core/`` or ``training/``.

* :mod:`~tools.devkit.comfy_host` — find the ComfyUI host, import it in this process, load this pack through
  ComfyUI's own custom-node loader;
* :mod:`~tools.devkit.comfy_server` — a real ComfyUI server process (HTTP API) with this pack installed;
* :mod:`~tools.devkit.workflow_format` — API-format prompts ↔ the frontend's UI (LiteGraph) workflows;
* :mod:`~tools.devkit.identities` — random but valid identities (global embedding + local map);
* :mod:`~tools.devkit.face_models` — a tiny, generated insightface-compatible ONNX model pack and images its
  detector finds;
* :mod:`~tools.devkit.onnx_runs` — count onnxruntime runs (which session, how many rows, inside the detector or not).

Test-only generators (fixtures, fuzzing, tiny SD1.5 models, ComfyUI-layout model files) stay in ``tests/support``.
"""
