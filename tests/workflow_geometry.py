"""Saved geometry of UI-format workflows: every node as large as its inputs and widgets need, none overlapping.

ComfyUI's frontend grows a node whose saved size is smaller than its content to LiteGraph's
``LGraphNode.computeSize()`` when the graph loads, without moving its neighbours, so a node saved too
small ends up covering the one below (issue 14: Load DDPM's ``gradient_checkpointing`` toggle hidden
under Load DINO). This module computes that minimum with the frontend's own rule and constants
(frontend 1.32.9, ``src/lib/litegraph``) from the node's schema, and checks a workflow file.

The rule (sizes exclude the 30 px title bar, which LiteGraph draws above ``pos``):

* height = ``max(socket inputs, outputs, 1) * 20`` (NODE_SLOT_HEIGHT)
  ``+ sum(widget height + 4) + 8`` (when there are widgets) ``+ 6`` (bottom margin); a widget is 20 px
  (NODE_WIDGET_HEIGHT), a multiline text box 50 px (the DOM widget's minimum), an image-upload combo
  adds an upload button (20 px) and a 220 px picture preview (the frontend's image preview minimum);
  a seed with ``control_after_generate`` adds that combo.
* width = the largest of: title (30 + text + 9.9; a title the user gave the node counts), socket labels
  (inputs + outputs + 2 * 20 + 5), widget labels (text + 42 + 2 * (15 + 6 + 10); the upload button's
  caption "choose file to upload" counts as one), and 140 px (210 px with widgets).
  Text is ``0.6 * 14 px`` per character, LiteGraph's own estimate when it cannot measure (wider than
  real Arial glyphs, so it errs on the large side).

Rectangles for the overlap check are ``[x, y - 30, x + w, y + h]`` (title bar included); touching is
allowed. Node schemas: the pack's own ``define_schema()`` (through ``tests/comfy_stub`` when run
alone), core nodes from ``CORE_NODES`` (ComfyUI v0.3.75's definitions, checked against a live
server's ``/object_info`` by the end-to-end tests), or any ``/object_info`` via ``specs_from_object_info``.

Use: ``python tests/workflow_geometry.py workflows/*.json`` (report) or ``--fix`` (grow each node to its
minimum, then move nodes right/down until none overlaps; rewrites the files).
"""

from __future__ import annotations

import glob
import importlib.util
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# LiteGraph constants (frontend 1.32.9: LiteGraphGlobal.ts, BaseWidget.ts)
TITLE_HEIGHT = 30
SLOT_HEIGHT = 20
WIDGET_HEIGHT = 20
MULTILINE_HEIGHT = 50
IMAGE_PREVIEW_HEIGHT = 220
NODE_WIDTH = 140
TEXT_PX_PER_CHAR = 0.6 * 14
WIDGET_PADDING = 42 + 2 * (15 + 6 + 10)
GAP = 20  # what --fix leaves between nodes it moves apart

PLAIN, MULTILINE, IMAGE_UPLOAD = "plain", "multiline", "image_upload"


@dataclass
class NodeSpec:
    """What the frontend draws for one node type: title, socket rows and widgets."""
    title: str
    sockets: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    widgets: list[tuple[str, str]] = field(default_factory=list)  # (label, PLAIN | MULTILINE | IMAGE_UPLOAD)


def _w(*names: str) -> list[tuple[str, str]]:
    return [(n, PLAIN) for n in names]


# ComfyUI v0.3.75 core nodes (INPUT_TYPES / display names; a seed's control_after_generate widget listed)
CORE_NODES: dict[str, NodeSpec] = {
    "LoadImage": NodeSpec("Load Image", [], ["IMAGE", "MASK"], [("image", IMAGE_UPLOAD)]),
    "LoadImageMask": NodeSpec("Load Image (as Mask)", [], ["MASK"], [("image", IMAGE_UPLOAD), ("channel", PLAIN)]),
    "SaveImage": NodeSpec("Save Image", ["images"], [], _w("filename_prefix")),
    "PreviewImage": NodeSpec("Preview Image", ["images"], []),
    "ImageScale": NodeSpec("Upscale Image", ["image"], ["IMAGE"], _w("upscale_method", "width", "height", "crop")),
    "ImageScaleBy": NodeSpec("Upscale Image By", ["image"], ["IMAGE"], _w("upscale_method", "scale_by")),
    "ImageSharpen": NodeSpec("ImageSharpen", ["image"], ["IMAGE"], _w("sharpen_radius", "sigma", "alpha")),
    "CheckpointLoaderSimple": NodeSpec("Load Checkpoint", [], ["MODEL", "CLIP", "VAE"], _w("ckpt_name")),
    "VAELoader": NodeSpec("Load VAE", [], ["VAE"], _w("vae_name")),
    "CLIPTextEncode": NodeSpec("CLIP Text Encode (Prompt)", ["clip"], ["CONDITIONING"], [("text", MULTILINE)]),
    "KSampler": NodeSpec("KSampler", ["model", "positive", "negative", "latent_image"], ["LATENT"],
                         _w("seed", "control_after_generate", "steps", "cfg", "sampler_name", "scheduler", "denoise")),
    "KSamplerAdvanced": NodeSpec("KSampler (Advanced)", ["model", "positive", "negative", "latent_image"], ["LATENT"],
                                 _w("add_noise", "noise_seed", "control_after_generate", "steps", "cfg", "sampler_name",
                                    "scheduler", "start_at_step", "end_at_step", "return_with_leftover_noise")),
    "VAEDecode": NodeSpec("VAE Decode", ["samples", "vae"], ["IMAGE"]),
    "VAEEncode": NodeSpec("VAE Encode", ["pixels", "vae"], ["LATENT"]),
    "VAEEncodeForInpaint": NodeSpec("VAE Encode (for Inpainting)", ["pixels", "vae", "mask"], ["LATENT"],
                                    _w("grow_mask_by")),
    "EmptyLatentImage": NodeSpec("Empty Latent Image", [], ["LATENT"], _w("width", "height", "batch_size")),
    "RepeatLatentBatch": NodeSpec("Repeat Latent Batch", ["samples"], ["LATENT"], _w("amount")),
    "SetLatentNoiseMask": NodeSpec("Set Latent Noise Mask", ["samples", "mask"], ["LATENT"]),
    "InpaintModelConditioning": NodeSpec("InpaintModelConditioning", ["positive", "negative", "vae", "pixels", "mask"],
                                         ["positive", "negative", "latent"], _w("noise_mask")),
    "ImageToMask": NodeSpec("Convert Image to Mask", ["image"], ["MASK"], _w("channel")),
    "SolidMask": NodeSpec("SolidMask", [], ["MASK"], _w("value", "width", "height")),
    "InvertMask": NodeSpec("InvertMask", ["mask"], ["MASK"]),
    "MaskComposite": NodeSpec("MaskComposite", ["destination", "source"], ["MASK"], _w("x", "y", "operation")),
    "GrowMask": NodeSpec("GrowMask", ["mask"], ["MASK"], _w("expand", "tapered_corners")),
    # frontend-only nodes
    "Note": NodeSpec("Note", [], [], [("text", MULTILINE)]),
    "MarkdownNote": NodeSpec("Note", [], [], [("text", MULTILINE)]),
}


def text_width(text: str) -> float:
    return TEXT_PX_PER_CHAR * len(text)


UPLOAD_CAPTION = "choose file to upload"


def minimum_size(spec: NodeSpec, title: str | None = None) -> tuple[int, int]:
    """LiteGraph's computeSize() for a node of this spec (see the module docstring), rounded up; ``title``
    is the node's own title when the workflow gives it one."""
    rows = max(len(spec.sockets), len(spec.outputs), 1)
    height = rows * SLOT_HEIGHT
    if spec.widgets:
        for _, kind in spec.widgets:
            if kind == MULTILINE:
                height += MULTILINE_HEIGHT + 4
            elif kind == IMAGE_UPLOAD:
                height += (WIDGET_HEIGHT + 4) * 2 + IMAGE_PREVIEW_HEIGHT + 4
            else:
                height += WIDGET_HEIGHT + 4
        height += 8
    height += 6
    inputs_w = max((text_width(s) for s in spec.sockets), default=0)
    outputs_w = max((text_width(s) for s in spec.outputs), default=0)
    slots_w = inputs_w + outputs_w + 2 * SLOT_HEIGHT + (5 if inputs_w and outputs_w else 0)
    labels = [n for n, _ in spec.widgets] + [UPLOAD_CAPTION for _, kind in spec.widgets if kind == IMAGE_UPLOAD]
    widget_labels = max((text_width(n) for n in labels), default=0)
    widgets_w = widget_labels + WIDGET_PADDING if widget_labels else 0
    title_w = TITLE_HEIGHT + text_width(title or spec.title) + TITLE_HEIGHT * 0.33
    width = max(slots_w, widgets_w, title_w, NODE_WIDTH * (1.5 if spec.widgets else 1))
    return math.ceil(width), math.ceil(height)


# ------------------------------------------------------------------------------------------ node specs


def spec_from_schema(schema) -> NodeSpec:
    """A NodeSpec from a V3 ``io.Schema`` (the pack's define_schema())."""
    from comfy_api.latest import io

    sockets, widgets = [], []
    for inp in schema.inputs or []:
        label = inp.display_name or inp.id
        if not isinstance(inp, io.WidgetInput) or getattr(inp, "force_input", None):
            sockets.append(label)
            continue
        widgets.append((label, MULTILINE if getattr(inp, "multiline", False) else PLAIN))
        if getattr(inp, "control_after_generate", None):
            widgets.append(("control_after_generate", PLAIN))
    outputs = [o.display_name or o.id or o.io_type for o in schema.outputs or []]
    return NodeSpec(schema.display_name or schema.node_id, sockets, outputs, widgets)


def specs_from_object_info(object_info: dict) -> dict[str, NodeSpec]:
    """NodeSpecs from a ComfyUI server's ``/object_info`` (any version, any pack)."""
    widget_types = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
    specs = {}
    for node_type, info in object_info.items():
        sockets, widgets = [], []
        for section in ("required", "optional"):
            for name, entry in (info.get("input", {}).get(section) or {}).items():
                kind, opts = entry[0], (entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {})
                label = opts.get("display_name") or name
                if (isinstance(kind, list) or kind in widget_types) and not opts.get("forceInput"):
                    style = IMAGE_UPLOAD if opts.get("image_upload") else MULTILINE if opts.get("multiline") else PLAIN
                    widgets.append((label, style))
                    if opts.get("control_after_generate"):
                        widgets.append(("control_after_generate", PLAIN))
                else:
                    sockets.append(label)
        outputs = list(info.get("output_name") or info.get("output") or [])
        specs[node_type] = NodeSpec(info.get("display_name") or node_type, sockets, outputs, widgets)
    return specs


def load_pack_specs() -> dict[str, NodeSpec]:
    """The pack's node specs, importing it against tests/comfy_stub (the way ComfyUI imports it) unless a
    ``comfy_api`` is already importable (inside ComfyUI, or after the tests' ``pack`` fixture)."""
    if "diffuseit_pack" not in sys.modules:
        stub = os.path.join(ROOT, "tests", "comfy_stub")
        if stub not in sys.path:
            sys.path.insert(0, stub)
        spec = importlib.util.spec_from_file_location("diffuseit_pack", os.path.join(ROOT, "__init__.py"),
                                                      submodule_search_locations=[ROOT])
        module = importlib.util.module_from_spec(spec)
        sys.modules["diffuseit_pack"] = module
        spec.loader.exec_module(module)
    nodes = importlib.import_module("diffuseit_pack.nodes").NODES
    return {schema.node_id: spec_from_schema(schema) for schema in (n.define_schema() for n in nodes)}


def all_specs(pack_specs: dict[str, NodeSpec] | None = None) -> dict[str, NodeSpec]:
    return {**CORE_NODES, **(pack_specs if pack_specs is not None else load_pack_specs())}


# ------------------------------------------------------------------------------------------ checks


def _rect(node: dict) -> tuple[float, float, float, float]:
    x, y = node["pos"][0], node["pos"][1]
    if (node.get("flags") or {}).get("collapsed"):
        return x, y - TITLE_HEIGHT, x + NODE_WIDTH, y
    return x, y - TITLE_HEIGHT, x + node["size"][0], y + node["size"][1]


def _overlap(a, b) -> tuple[float, float]:
    return min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])


def _label(node: dict) -> str:
    return f"node {node['id']} ({node['type']})"


def geometry_problems(workflow: dict, specs: dict[str, NodeSpec]) -> list[str]:
    """Every node smaller than its minimum, every pair of overlapping nodes, every unknown node type."""
    problems = []
    nodes = workflow["nodes"]
    for node in nodes:
        spec = specs.get(node["type"])
        if spec is None:
            problems.append(f"{_label(node)}: no definition known; add it to CORE_NODES in tests/workflow_geometry.py")
            continue
        if (node.get("flags") or {}).get("collapsed"):
            continue
        need_w, need_h = minimum_size(spec, node.get("title"))
        w, h = node["size"][0], node["size"][1]
        if w < need_w or h < need_h:
            problems.append(f"{_label(node)}: size {w}x{h} is smaller than the {need_w}x{need_h} its "
                            f"{len(spec.sockets)} sockets, {len(spec.outputs)} outputs and {len(spec.widgets)} widgets need")
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            dx, dy = _overlap(_rect(a), _rect(b))
            if dx > 0 and dy > 0:
                problems.append(f"{_label(a)} and {_label(b)} overlap by {dx:g}x{dy:g} px (title bars included)")
    return problems


def check_workflow_file(path: str, specs: dict[str, NodeSpec] | None = None) -> list[str]:
    """Problems of one UI-format workflow file (empty when it is fine); the lead's one-file entry point."""
    with open(path) as f:
        workflow = json.load(f)
    return [f"{os.path.basename(path)}: {p}" for p in geometry_problems(workflow, specs or all_specs())]


def fit_workflow(workflow: dict, specs: dict[str, NodeSpec]) -> dict:
    """Grow every node to its minimum, then push overlapping nodes apart (right when they sit side by side,
    down when stacked), GAP px apart. Returns the changed workflow (the argument is changed in place)."""
    nodes = workflow["nodes"]
    for node in nodes:
        spec = specs.get(node["type"])
        if spec is not None and not (node.get("flags") or {}).get("collapsed"):
            need_w, need_h = minimum_size(spec, node.get("title"))
            node["size"] = [max(node["size"][0], need_w), max(node["size"][1], need_h)]
    for _ in range(10_000):
        ordered = sorted(nodes, key=lambda n: (n["pos"][0], n["pos"][1]))
        clash = next(((a, b) for i, a in enumerate(ordered) for b in ordered[i + 1:]
                      if min(_overlap(_rect(a), _rect(b))) > 0), None)
        if clash is None:
            return workflow
        a, b = clash
        dx, dy = _overlap(_rect(a), _rect(b))
        if b["pos"][0] > a["pos"][0] and dx < dy:
            shift = math.ceil(dx) + GAP
            for n in nodes:  # the whole column and everything right of it moves together
                if n["pos"][0] >= b["pos"][0]:
                    n["pos"] = [n["pos"][0] + shift, n["pos"][1]]
        else:
            lower = b if b["pos"][1] >= a["pos"][1] else a
            lower["pos"] = [lower["pos"][0], lower["pos"][1] + math.ceil(dy) + GAP]
    raise RuntimeError("could not separate the nodes in 10000 moves")


def _replace_numbers(array_text: str, values: list) -> str:
    numbers = iter(values)
    return re.sub(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?", lambda _: json.dumps(next(numbers)), array_text)


def save_geometry(path: str, workflow: dict) -> None:
    """Write the nodes' new pos/size into the file, keeping its formatting (a small diff); any other
    layout of the file is rewritten whole."""
    with open(path) as f:
        text = f.read()
    nodes = workflow["nodes"]
    for key in ("pos", "size"):
        spans = list(re.finditer(rf'"{key}":\s*\[[^\]]*\]', text))
        if len(spans) != len(nodes):
            break
        for match, node in zip(reversed(spans), reversed(nodes)):
            text = text[:match.start()] + _replace_numbers(match.group(0), node[key]) + text[match.end():]
    if json.loads(text) != workflow:
        text = json.dumps(workflow, indent=1) + "\n"
    with open(path, "w") as f:
        f.write(text)


def main(argv: list[str]) -> int:
    fix = "--fix" in argv
    paths = [p for p in argv if p != "--fix"] or sorted(glob.glob(os.path.join(ROOT, "workflows", "*.json")))
    specs = all_specs()
    failed = 0
    for path in paths:
        if fix:
            with open(path) as f:
                workflow = json.load(f)
            save_geometry(path, fit_workflow(workflow, specs))
        problems = check_workflow_file(path, specs)
        failed += bool(problems)
        print("\n".join(problems) if problems else f"{os.path.basename(path)}: ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
