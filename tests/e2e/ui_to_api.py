"""Convert a ComfyUI UI-format workflow (what the editor saves) into an API-format prompt.

The frontend does this with ``app.graphToPrompt()``; this is the subset our example workflows
use, driven by the server's ``/object_info`` so it follows each node's real input list:

* ``widgets_values`` are positional: one value per *widget* input in input order (required, then
  optional; ``input_order`` when the server sends it), plus the frontend-only companions:
  the control-after-generate mode after a seed (``control_after_generate`` set, or an INT named
  ``seed``/``noise_seed`` without the option -- the frontend's legacy rule), right after the seed;
  the upload button of an ``image_upload`` combo comes after *all* widgets (frontend 1.x: LoadImageMask
  saves ``[file, channel, "image"]``), so it is simply left over. A dict
  ``widgets_values`` (some packs save them by name) is read by name.
* widget inputs are INT/FLOAT/STRING/BOOLEAN/COMBO (or a list of options) without
  ``forceInput``; everything else is a socket. A linked input (socket or converted widget) becomes
  ``[str(source id), source slot]``.
* muted nodes (mode 2) are dropped, bypassed nodes (mode 4) are wired through (an output takes the
  input of the same type), ``Reroute`` nodes are followed, ``PrimitiveNode`` values are the target
  widget's value (the frontend keeps them in sync), ``Note``/``MarkdownNote`` are ignored.
  Subgraphs/group nodes are refused with a clear error.
"""

from __future__ import annotations

import json
from typing import Any, Optional, Union

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
VIRTUAL_NODES = {"Note", "MarkdownNote", "PrimitiveNode", "Reroute"}
SEED_NAMES = {"seed", "noise_seed"}
MUTED, BYPASSED = 2, 4


class ConversionError(ValueError):
    """The UI graph cannot be converted (unknown node type, missing values, unsupported feature)."""


def _spec(entry: Any) -> tuple[Any, dict]:
    if isinstance(entry, (list, tuple)) and entry:
        return entry[0], (entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {})
    return entry, {}


def is_widget(entry: Any) -> bool:
    typ, opts = _spec(entry)
    if opts.get("forceInput"):
        return False
    return isinstance(typ, list) or typ in WIDGET_TYPES


def extra_widget_values(name: str, entry: Any) -> int:
    """How many frontend-only values follow this widget's value in widgets_values (the control-after-
    generate mode of a seed). Upload buttons (image_upload, ...) are not counted: the frontend adds them
    after all of the node's widgets, so their value ("image") trails the list and shifts nothing."""
    typ, opts = _spec(entry)
    control = opts.get("control_after_generate")
    return 1 if control or (control is None and typ == "INT" and name in SEED_NAMES) else 0


def ordered_inputs(info: dict) -> list[tuple[str, Any, bool]]:
    """(name, spec, optional) of a node's required then optional inputs, in the frontend's order."""
    inputs = info.get("input") or {}
    order = info.get("input_order") or {}
    out = []
    for section in ("required", "optional"):
        specs = inputs.get(section) or {}
        names = order.get(section) or list(specs)
        out += [(name, specs[name], section == "optional") for name in names if name in specs]
    return out


def widget_values(node: dict, info: dict) -> dict[str, Any]:
    """{input name: value} from a UI node's widgets_values."""
    values = node.get("widgets_values")
    widgets = [(name, spec) for name, spec, _ in ordered_inputs(info) if is_widget(spec)]
    if values is None:
        return {}
    if isinstance(values, dict):
        return {name: values[name] for name, _ in widgets if name in values}
    found, pos = {}, 0
    for name, spec in widgets:
        if pos >= len(values):
            break
        found[name] = values[pos]
        pos += 1 + extra_widget_values(name, spec)
    return found


def convert(workflow: Union[dict, str], object_info: dict) -> dict:
    """API-format prompt ``{id: {class_type, inputs, _meta}}`` of a UI-format workflow."""
    if isinstance(workflow, str):
        workflow = json.loads(workflow)
    if "nodes" not in workflow:
        raise ConversionError("not a UI-format workflow (no 'nodes'); API-format prompts need no conversion")
    if (workflow.get("definitions") or {}).get("subgraphs"):
        raise ConversionError("subgraphs are not supported by this converter")
    nodes = {int(n["id"]): n for n in workflow["nodes"]}
    links = {}
    for link in workflow.get("links") or []:
        if isinstance(link, dict):  # newer serialisation
            link = [link["id"], link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"],
                    link.get("type")]
        links[int(link[0])] = (int(link[1]), int(link[2]), link[5] if len(link) > 5 else None)

    def source_of(link_id: Optional[int], seen: frozenset = frozenset()) -> Optional[tuple[str, int]]:
        """Follow Reroutes and bypassed nodes back to a real output, or None (unconnected/primitive)."""
        if link_id is None or link_id not in links or link_id in seen:
            return None
        origin_id, slot, typ = links[link_id]
        origin = nodes.get(origin_id)
        if origin is None:
            raise ConversionError(f"link {link_id} comes from a node {origin_id} that does not exist")
        seen = seen | {link_id}
        if origin["type"] == "Reroute":
            return source_of((origin.get("inputs") or [{}])[0].get("link"), seen)
        if origin["type"] == "PrimitiveNode":
            return None
        if origin.get("mode") == MUTED:
            return None
        if origin.get("mode") == BYPASSED:
            out_type = ((origin.get("outputs") or [])[slot] or {}).get("type", typ)
            candidates = origin.get("inputs") or []
            ordered = ([candidates[slot]] if slot < len(candidates) else []) + candidates
            for inp in ordered:
                if inp.get("link") is not None and inp.get("type") == out_type:
                    return source_of(inp["link"], seen)
            return None
        return str(origin_id), slot

    prompt: dict[str, dict] = {}
    for node_id, node in sorted(nodes.items()):
        kind = node.get("type")
        if kind in VIRTUAL_NODES or node.get("mode") in (MUTED, BYPASSED):
            continue
        if kind not in object_info:
            raise ConversionError(f"node {node_id}: type {kind!r} is not known to the server "
                                  "(missing pack, subgraph or group node?)")
        info = object_info[kind]
        inputs: dict[str, Any] = dict(widget_values(node, info))
        for slot in node.get("inputs") or []:
            name = slot.get("name")
            if (slot.get("widget") or {}).get("name"):
                name = slot["widget"]["name"]
            source = source_of(slot.get("link"))
            if source is not None:
                inputs[name] = [source[0], source[1]]
        for name, spec, optional in ordered_inputs(info):
            if name not in inputs and not optional:
                raise ConversionError(f"node {node_id} ({kind}): required input {name!r} has no value or link")
        prompt[str(node_id)] = {"inputs": inputs, "class_type": kind,
                                "_meta": {"title": node.get("title") or info.get("display_name") or kind}}
    return prompt

