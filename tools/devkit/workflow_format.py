"""UI (LiteGraph) ⇄ API prompt conversion, driven by node definitions (``/object_info`` or INPUT_TYPES).

Rules (as the frontend's ``graphToPrompt`` applies them to simple graphs): widget values follow the input order;
one extra value follows an input with ``control_after_generate`` (e.g. ``seed``) and one follows an
``image_upload`` combo; links become ``[source_id, slot]``; muted nodes (mode 2) are dropped.
"""

from __future__ import annotations

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def _is_widget(spec) -> bool:
    t = spec[0]
    return isinstance(t, list) or t in WIDGET_TYPES


def input_specs(info: dict) -> list[tuple[str, list, bool]]:
    """``[(name, spec, required)]`` in input order from an ``/object_info`` entry."""
    order = info.get("input_order") or {s: list(info["input"].get(s, {})) for s in ("required", "optional")}
    out = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            out.append((name, info["input"][section][name], section == "required"))
    return out


def _extra_values(spec) -> int:
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return int(bool(opts.get("control_after_generate"))) + int(bool(opts.get("image_upload")))


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    links = {l[0]: l for l in workflow.get("links", [])}
    prompt = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) == 2:
            continue
        info = object_info[node["type"]]
        linked = {i["name"]: i.get("link") for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values") or [])
        inputs = {}
        for name, spec, _ in input_specs(info):
            if name in linked:
                _, src, slot, *_ = links[linked[name]]
                inputs[name] = [str(src), slot]
                continue
            if not _is_widget(spec):
                continue
            if not values:
                raise ValueError(f"node {node['id']} ({node['type']}): no widget value for {name!r}")
            inputs[name] = values.pop(0)
            for _ in range(_extra_values(spec)):
                values.pop(0)
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def _node_height(class_type: str, inputs: int, outputs: int, widgets: int) -> int:
    """A height that shows every slot and widget (image loaders also show their preview)."""
    if class_type == "LoadImage":
        return 360
    if class_type in ("CLIPTextEncode",):
        return 160
    return 40 + 24 * max(inputs, outputs) + 26 * widgets


def api_to_ui(prompt: dict, object_info: dict, extra_values: dict | None = None) -> dict:
    """A loadable UI workflow from an API prompt (nodes laid out in columns by dependency depth)."""
    extra_values = extra_values or {}
    depth: dict = {}

    def level(nid):
        if nid not in depth:
            srcs = [v[0] for v in prompt[nid]["inputs"].values() if isinstance(v, list) and len(v) == 2
                    and isinstance(v[0], str)]
            depth[nid] = 1 + max((level(s) for s in srcs), default=-1)
        return depth[nid]

    for nid in prompt:
        level(nid)
    nodes, links, rows = [], [], {}
    out_links: dict = {}
    link_id = 0
    for nid in sorted(prompt, key=lambda n: (depth[n], int(n))):
        node = prompt[nid]
        info = object_info[node["class_type"]]
        ins, widgets = [], []
        for name, spec, _ in input_specs(info):
            v = node["inputs"].get(name)
            if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str):
                link_id += 1
                src_type = object_info[prompt[v[0]]["class_type"]]["output"][v[1]]
                links.append([link_id, int(v[0]), v[1], int(nid), len(ins), src_type])
                out_links.setdefault((v[0], v[1]), []).append(link_id)
                ins.append({"name": name, "type": src_type, "link": link_id})
            elif v is not None and _is_widget(spec):
                widgets.append(v)
                opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                if opts.get("control_after_generate"):
                    widgets.append("fixed")
                if opts.get("image_upload"):
                    widgets.append("image")
            elif not _is_widget(spec):
                ins.append({"name": name, "type": spec[0], "link": None})
        col = depth[nid]
        height = _node_height(node["class_type"], len(ins), len(info["output"]), len(widgets))
        y = rows.get(col, 40)
        rows[col] = y + height + 60
        nodes.append({"id": int(nid), "type": node["class_type"], "pos": [40 + 420 * col, y],
                      "size": [360, height], "flags": {}, "order": 0, "mode": 0, "inputs": ins,
                      "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": widgets,
                      "_outputs": info["output"], "_names": info.get("output_name", info["output"])})
    for order, n in enumerate(nodes):
        n["order"] = order
        outs, names = n.pop("_outputs"), n.pop("_names")
        n["outputs"] = [{"name": names[i], "type": t, "links": out_links.get((str(n["id"]), i), []),
                         "slot_index": i} for i, t in enumerate(outs)]
    return {"last_node_id": max(int(k) for k in prompt), "last_link_id": link_id, "nodes": nodes,
            "links": links, "groups": [], "config": {}, "extra": {}, "version": 0.4}


def load_twin(name: str) -> dict:
    """The API-format twin ``workflows/api/<name>.json`` of a bundled workflow."""
    import json
    from pathlib import Path
    with open(Path(__file__).resolve().parents[2] / "workflows" / "api" / f"{name}.json") as f:
        return json.load(f)


def shrink(prompt: dict, height: int = 64) -> dict:
    """The same graph at test size: small latent and pose canvas, two sampling steps."""
    import copy
    p = copy.deepcopy(prompt)
    for node in p.values():
        ins = node["inputs"]
        if node["class_type"] in ("EmptyLatentImage", "InstantFamilyPoseToMasks"):
            ins["width"] = max(64, 8 * round(ins["width"] * height / ins["height"] / 8))
            ins["height"] = height
        if node["class_type"] == "KSampler":
            ins["steps"] = 2
    return p
