"""UI (LiteGraph) ⇄ API prompt conversion, driven by node definitions (``/object_info`` or INPUT_TYPES).

Rules (as the frontend's ``graphToPrompt`` applies them to simple graphs): widget values follow the input order;
one extra value follows an input with ``control_after_generate`` (e.g. ``seed``) and one follows an
``image_upload`` combo; links become ``[source_id, slot]``; muted nodes (mode 2) are dropped.
"""

from __future__ import annotations

from pathlib import Path

WORKFLOWS_DIR = Path(__file__).resolve().parents[2] / "example_workflows"
"""The UI workflows ComfyUI lists as this pack's templates (its documented folder), each with a ``.jpg`` thumbnail."""
API_DIR = WORKFLOWS_DIR / "api"
"""Their API-format twins: one folder down, so ComfyUI (which scans ``<folder>/*.json`` only) does not list them."""

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
VIRTUAL_NODES = ("Note", "MarkdownNote")
"""Frontend-only nodes: never part of the API prompt."""
NODE_WIDTH, COLUMN_GAP, ROW_GAP, GROUP_PAD, GROUP_TITLE, BAND_GAP, GROUP_GAP = 360, 50, 50, 20, 120, 140, 90
GROUP_FONT = 72
_NOTE_HEIGHT = 300
"""Group titles large enough to read when the whole workflow is fitted to the screen."""


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
        if node.get("mode", 0) == 2 or node["type"] in VIRTUAL_NODES:
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


def api_to_ui(prompt: dict, object_info: dict, layout: dict | None = None, note: str | None = None) -> dict:
    """A loadable UI workflow from an API prompt.

    Without ``layout`` nodes are laid out in columns by dependency depth. With ``layout`` — ``{"groups": [(title,
    band, colour), …], "cells": {node id: (group title, column, row)}}`` — every node sits in a cell of its
    group's grid, groups are stacked top to bottom in vertical bands placed left to right (band order = data
    order), and each group gets a titled frame. ``note``: a Markdown note above the first band.
    """
    depth: dict = {}

    def level(nid):
        if nid not in depth:
            srcs = [v[0] for v in prompt[nid]["inputs"].values() if isinstance(v, list) and len(v) == 2
                    and isinstance(v[0], str)]
            depth[nid] = 1 + max((level(s) for s in srcs), default=-1)
        return depth[nid]

    for nid in prompt:
        level(nid)
    nodes, links = [], []
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
        height = _node_height(node["class_type"], len(ins), len(info["output"]), len(widgets))
        nodes.append({"id": int(nid), "type": node["class_type"], "pos": [0, 0],
                      "size": [NODE_WIDTH, height], "flags": {}, "order": 0, "mode": 0, "inputs": ins,
                      "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": widgets,
                      "_outputs": info["output"], "_names": info.get("output_name", info["output"])})
    groups = _place(nodes, depth, layout, top=40 + (_NOTE_HEIGHT + GROUP_GAP if note else 0))
    for order, n in enumerate(nodes):
        n["order"] = order
        outs, names = n.pop("_outputs"), n.pop("_names")
        n["outputs"] = [{"name": names[i], "type": t, "links": out_links.get((str(n["id"]), i), []),
                         "slot_index": i} for i, t in enumerate(outs)]
    last = max(int(k) for k in prompt)
    if note:
        last += 1
        width = groups[0]["bounding"][2] if groups else 2 * NODE_WIDTH  # as wide as the first band's frames
        nodes.append({"id": last, "type": "MarkdownNote", "pos": [40, 40], "size": [width, _NOTE_HEIGHT],
                      "flags": {}, "order": len(nodes), "mode": 0, "inputs": [], "outputs": [],
                      "properties": {}, "widgets_values": [note], "color": "#432", "bgcolor": "#653"})
    return {"last_node_id": last, "last_link_id": link_id, "nodes": nodes,
            "links": links, "groups": groups, "config": {}, "extra": {}, "version": 0.4}



def _place(nodes: list, depth: dict, layout: dict | None, top: int) -> list:
    """Set each node's ``pos``; return the groups (LiteGraph format)."""
    if not layout:
        rows: dict = {}
        for n in nodes:
            col = depth[str(n["id"])]
            y = rows.get(col, top)
            rows[col] = y + n["size"][1] + 60
            n["pos"] = [40 + 420 * col, y]
        return []
    cells = layout["cells"]
    by_id = {str(n["id"]): n for n in nodes}
    missing = sorted(set(by_id) - set(cells), key=int)
    if missing:
        raise ValueError(f"layout: nodes {missing} have no cell")
    groups, band_x = [], 40
    order = [title for title, _, _ in layout["groups"]]
    bands = sorted({band for _, band, _ in layout["groups"]})
    sizes = {}
    for title in order:  # each group's grid: column count and row heights
        members = [(c, r, by_id[nid]) for nid, (g, c, r) in cells.items() if g == title]
        cols = max((c for c, _, _ in members), default=-1) + 1
        row_h: dict = {}
        for c, r, n in members:
            row_h[r] = max(row_h.get(r, 0), n["size"][1])
        sizes[title] = (members, cols, row_h)
    for band in bands:
        titles = [t for t, b, _ in layout["groups"] if b == band]
        band_cols = max(sizes[t][1] for t in titles)
        width = band_cols * (NODE_WIDTH + COLUMN_GAP) - COLUMN_GAP + 2 * GROUP_PAD
        y = top
        for title in titles:  # one frame width per band, nodes right-aligned: links leave every group rightwards
            members, cols, row_h = sizes[title]
            shift = (band_cols - cols) * (NODE_WIDTH + COLUMN_GAP)
            row_y, acc = {}, y + GROUP_TITLE
            for r in sorted(row_h):
                row_y[r] = acc
                acc += row_h[r] + ROW_GAP
            for c, r, n in members:
                n["pos"] = [band_x + GROUP_PAD + shift + c * (NODE_WIDTH + COLUMN_GAP), row_y[r]]
            height = acc - ROW_GAP + GROUP_PAD - y
            colour = next(col for t, _, col in layout["groups"] if t == title)
            groups.append({"id": len(groups) + 1, "title": title, "bounding": [band_x, y, width, height],
                           "color": colour, "font_size": GROUP_FONT, "flags": {}})
            y += height + GROUP_GAP
        band_x += width + BAND_GAP
    return groups


def group_of_node(workflow: dict) -> dict:
    """``{node id: group title}`` by position: the group whose frame holds the node's top-left corner."""
    out = {}
    for n in workflow["nodes"]:
        x, y = n["pos"]
        for g in workflow.get("groups", []):
            gx, gy, gw, gh = g["bounding"]
            if gx <= x < gx + gw and gy <= y < gy + gh:
                out[n["id"]] = g["title"]
    return out


def links_crossing_groups(workflow: dict) -> list[tuple[int, str]]:
    """Links whose straight path (output slot → input slot) passes through the frame of a group that holds
    neither of its ends: ``[(link id, group title)]``."""
    nodes = {n["id"]: n for n in workflow["nodes"]}
    member = group_of_node(workflow)
    bad = []
    for link_id, src, slot, dst, dslot, _ in workflow["links"]:
        a, b = nodes[src], nodes[dst]
        p = (a["pos"][0] + a["size"][0], a["pos"][1] + 30 + 20 * slot)
        q = (b["pos"][0], b["pos"][1] + 30 + 20 * dslot)
        for g in workflow.get("groups", []):
            if g["title"] in (member.get(src), member.get(dst)):
                continue
            if _segment_hits_rect(p, q, g["bounding"]):
                bad.append((link_id, g["title"]))
    return bad


def _segment_hits_rect(p, q, rect) -> bool:
    """Whether the segment p→q meets the rectangle ``(x, y, w, h)`` (Liang–Barsky clipping)."""
    x, y, w, h = rect
    dx, dy = q[0] - p[0], q[1] - p[1]
    lo, hi = 0.0, 1.0
    for step, room in ((-dx, p[0] - x), (dx, x + w - p[0]), (-dy, p[1] - y), (dy, y + h - p[1])):
        if step == 0:
            if room < 0:
                return False
        elif step < 0:
            lo = max(lo, room / step)
        else:
            hi = min(hi, room / step)
    return lo <= hi


def load_twin(name: str) -> dict:
    """The API-format twin ``example_workflows/api/<name>.json`` of a bundled workflow."""
    import json
    with open(API_DIR / f"{name}.json") as f:
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
