"""Write UI-format workflows (what the ComfyUI editor saves) from a compact graph description.

A developer tool, not used by the tests: socket order, widget order and the extra "control after
generate" values come from a real server's ``/object_info`` (saved as JSON), so a graph written here
loads in the frontend exactly as if it had been built by hand. Node sizes follow the frontend's
layout (title bar, one row per slot, one per widget; taller for multiline text and image previews).

    python tests/e2e/workflow_builder.py OBJECT_INFO.json   # rewrites the workflows in GRAPHS below
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
ROW, WIDGET, TITLE, WIDTH = 22, 26, 30, 330


def _inputs(info: dict) -> list[tuple[str, Any, dict]]:
    out = []
    for section in ("required", "optional"):
        for name, spec in (info["input"].get(section) or {}).items():
            out.append((name, spec[0], spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}))
    return out


def _is_widget(kind: Any, opts: dict) -> bool:
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not opts.get("forceInput")


def node_size(node_type: str, info: dict, widgets: int, sockets: int, outputs: int, multiline: int) -> list[int]:
    height = TITLE + ROW * max(sockets, outputs) + WIDGET * widgets + 70 * multiline + 16
    if node_type in ("LoadImage", "LoadImageMask", "SaveImage", "PreviewImage"):
        height = max(height, 330)
    return [WIDTH, height]


def build(graph: dict, object_info: dict) -> dict:
    """``graph``: {"nodes": {id: {"type", "pos", "widgets": {name: value}, "links": {input: [src_id, out_index]},
    "title"?}}, "notes": [...]}. Returns the UI workflow."""
    nodes, links, link_id = [], [], 0
    out_links: dict = {}
    order = 0
    specs = graph["nodes"]
    for nid, spec in specs.items():
        for input_name, (src, slot) in spec.get("links", {}).items():
            link_id += 1
            kind = object_info[specs[src]["type"]]["output"][slot]
            links.append([link_id, int(src), slot, int(nid), input_name, kind])
            out_links.setdefault((src, slot), []).append(link_id)
    for nid, spec in specs.items():
        info = object_info[spec["type"]]
        inputs, widgets_values, multiline = [], [], 0
        for name, kind, opts in _inputs(info):
            link = next((l for l in links if l[3] == int(nid) and l[4] == name), None)
            if _is_widget(kind, opts):
                if name not in spec.get("widgets", {}) and "default" not in opts and not isinstance(kind, list):
                    raise KeyError(f"node {nid} ({spec['type']}): no value for widget {name}")
                value = spec.get("widgets", {}).get(name, opts.get("default", kind[0] if isinstance(kind, list) and kind else None))
                widgets_values.append(value)
                if opts.get("control_after_generate"):
                    widgets_values.append("fixed")
                multiline += bool(opts.get("multiline"))
                if link is not None:
                    inputs.append({"name": name, "type": kind if isinstance(kind, str) else "COMBO",
                                   "widget": {"name": name}, "link": link[0]})
            else:
                inputs.append({"name": name, "type": kind, "link": link[0] if link else None})
        if any(opts.get("image_upload") for _, _, opts in _inputs(info)):
            widgets_values.append("image")  # the frontend's upload button, saved after the other widgets
        for link in links:
            if link[3] == int(nid):
                link[4] = next(i for i, entry in enumerate(inputs) if entry["name"] == link[4])
        outputs = [{"name": info["output_name"][i], "type": kind, "links": out_links.get((nid, i)),
                    "slot_index": i} for i, kind in enumerate(info["output"])]
        node = {"id": int(nid), "type": spec["type"], "pos": spec["pos"],
                "size": spec.get("size") or node_size(spec["type"], info, len(widgets_values), len(inputs),
                                                      len(outputs), multiline),
                "flags": {}, "order": order, "mode": 0, "inputs": inputs, "outputs": outputs,
                "properties": {"Node name for S&R": spec["type"]}, "widgets_values": widgets_values}
        if spec.get("title"):
            node["title"] = spec["title"]
        nodes.append(node)
        order += 1
    for i, text in enumerate(graph.get("notes", [])):
        nid = 100 + i
        nodes.append({"id": nid, "type": "Note", "pos": text["pos"], "size": text.get("size", [400, 220]),
                      "flags": {}, "order": order, "mode": 0, "inputs": [], "outputs": [], "properties": {},
                      "widgets_values": [text["text"]]})
        order += 1
    _unstack(nodes)
    return {"last_node_id": max(n["id"] for n in nodes), "last_link_id": link_id, "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4}


def _unstack(nodes: list[dict], gap: int = 20) -> None:
    """Push nodes of one column down so no node (title bar included) overlaps the one above it."""
    by_column: dict = {}
    for node in nodes:
        by_column.setdefault(node["pos"][0], []).append(node)
    for column in by_column.values():
        column.sort(key=lambda n: n["pos"][1])
        bottom = None
        for node in column:
            top = node["pos"][1] - TITLE
            if bottom is not None and top < bottom + gap:
                node["pos"] = [node["pos"][0], bottom + gap + TITLE]
            bottom = node["pos"][1] + node["size"][1]


def main(argv: list[str]) -> int:
    from workflow_graphs import GRAPHS  # noqa: E402 -- beside this file

    with open(argv[1]) as f:
        object_info = json.load(f)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for name, graph in GRAPHS.items():
        path = os.path.join(root, "workflows", name)
        with open(path, "w") as f:
            json.dump(build(graph, object_info), f, indent=1)
            f.write("\n")
        print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    raise SystemExit(main(sys.argv))
