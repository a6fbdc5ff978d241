"""Template-browser thumbnails: ``<workflow>.jpg`` next to every ``workflows/<workflow>.json``.

ComfyUI's template browser asks for ``/api/workflow_templates/<pack>/<name>.jpg`` beside each
template (frontend 1.32.9 .. 1.58.1; a missing file is a 404 and a placeholder). No result picture
can be made offline (the real checkpoints are gigabytes and CPU sampling takes hours), so each
thumbnail is a drawing of the graph itself: node boxes at their saved geometry, titles, sockets,
widget rows, wires, and the sample photo a Load Image node names (from ``assets/``).

Each JPEG carries the SHA-256 of its workflow file in its comment, so tests/test_workflow_thumbnails.py
can tell a thumbnail drawn from an older version of the graph. Re-run after editing a workflow:

    python workflows/make_thumbnails.py            # every workflows/*.json
    python workflows/make_thumbnails.py FILE.json  # one
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sys

from PIL import Image, ImageDraw, ImageFont

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SIZE = 512  # the browser shows a square card at most 256 px tall: 2x for sharp screens
BANNER = 130  # px of the top band that carries the template's title over a wide graph
TITLE_HEIGHT, SLOT_HEIGHT = 30, 20
BACKGROUND, BODY, TITLE_BAR, OUTLINE = (32, 32, 32), (53, 53, 53), (34, 34, 34), (20, 20, 20)
TEXT, WIDGET, WIRE = (222, 222, 222), (34, 34, 34), (150, 150, 150)
PACK_TITLE = (90, 150, 210)  # the pack's nodes get a blue title bar, core nodes stay grey
FONT_FILES = ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "Arial.ttf")
COMMENT_PREFIX = b"workflow-sha256:"


def workflow_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def thumbnail_digest(jpg_path: str) -> str | None:
    """The workflow digest a thumbnail was drawn from (None when it has none)."""
    with Image.open(jpg_path) as im:
        comment = im.info.get("comment", b"")
    return comment[len(COMMENT_PREFIX):].decode() if comment.startswith(COMMENT_PREFIX) else None


def _font(px: int) -> ImageFont.ImageFont:
    for name in FONT_FILES:
        try:
            return ImageFont.truetype(name, px)
        except OSError:
            continue
    return ImageFont.load_default(size=px)


def _titles() -> dict[str, str]:
    """Display names: the pack's own schemas and ComfyUI's core nodes (tests/workflow_geometry.py)."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from workflow_geometry import all_specs

    return {node_type: spec.title for node_type, spec in all_specs().items()}


def _pack_types() -> set[str]:
    from workflow_geometry import CORE_NODES

    return set(_titles()) - set(CORE_NODES)


def _fit(text: str, font, width: float) -> str:
    while text and font.getlength(text) > width:
        text = text[:-2] + "…" if len(text) > 2 else ""
    return text


def render(path: str, titles: dict[str, str], pack_types: set[str]) -> Image.Image:
    with open(path) as f:
        workflow = json.load(f)
    nodes = {n["id"]: n for n in workflow["nodes"]}
    left = min(n["pos"][0] for n in nodes.values()) - 20
    top = min(n["pos"][1] for n in nodes.values()) - TITLE_HEIGHT - 20
    right = max(n["pos"][0] + n["size"][0] for n in nodes.values()) + 20
    bottom = max(n["pos"][1] + n["size"][1] for n in nodes.values()) + 20
    # the template's title on top when the graph leaves room (wide graphs), the graph below it
    name = os.path.basename(path)[: -len(".json")]
    banner = BANNER if (right - left) / (bottom - top) > SIZE / (SIZE - BANNER) else 0
    scale = min(SIZE / (right - left), (SIZE - banner) / (bottom - top))
    off_x = (SIZE - (right - left) * scale) / 2 - left * scale
    off_y = banner + (SIZE - banner - (bottom - top) * scale) / 2 - top * scale

    def at(x: float, y: float) -> tuple[float, float]:
        return x * scale + off_x, y * scale + off_y

    image = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    title_font = _font(max(9, round(15 * scale * 1.6)))  # titles readable at card size, clipped to the box
    if banner:
        _banner(draw, name, banner)

    def slot(node: dict, index: int, output: bool) -> tuple[float, float]:
        x = node["pos"][0] + (node["size"][0] if output else 0)
        return at(x, node["pos"][1] + (index + 0.5) * SLOT_HEIGHT)

    for link in workflow.get("links", []):
        _, src, src_slot, dst, dst_slot = link[:5]
        if src in nodes and dst in nodes:
            (x0, y0), (x1, y1) = slot(nodes[src], src_slot, True), slot(nodes[dst], dst_slot, False)
            bend = max(30 * scale, abs(x1 - x0) / 2)
            curve = [((1 - t) ** 3 * x0 + 3 * (1 - t) ** 2 * t * (x0 + bend) + 3 * (1 - t) * t * t * (x1 - bend)
                      + t ** 3 * x1, (1 - t) ** 3 * y0 + 3 * (1 - t) ** 2 * t * y0 + 3 * (1 - t) * t * t * y1
                      + t ** 3 * y1) for t in (i / 24 for i in range(25))]
            draw.line(curve, fill=WIRE, width=max(1, round(2 * scale * 1.5)))

    for node in nodes.values():
        (x0, y0), (x1, y1) = at(node["pos"][0], node["pos"][1] - TITLE_HEIGHT), at(
            node["pos"][0] + node["size"][0], node["pos"][1] + node["size"][1])
        bar = at(0, node["pos"][1])[1]
        radius = max(2, round(8 * scale))
        draw.rounded_rectangle([x0, y0, x1, y1], radius, fill=BODY, outline=OUTLINE)
        draw.rounded_rectangle([x0, y0, x1, bar], radius, fill=PACK_TITLE if node["type"] in pack_types else TITLE_BAR)
        title = _fit(node.get("title") or titles.get(node["type"], node["type"]), title_font, x1 - x0 - 6)
        draw.text((x0 + 4, (y0 + bar) / 2), title, fill=TEXT, font=title_font, anchor="lm")
        rows = max(len(node.get("inputs") or []), len(node.get("outputs") or []), 1)
        widget_top = node["pos"][1] + rows * SLOT_HEIGHT + 4
        for i, _ in enumerate(node.get("widgets_values") or []):
            wy = widget_top + i * 24
            if wy + 20 > node["pos"][1] + node["size"][1]:
                break
            (wx0, wy0), (wx1, wy1) = at(node["pos"][0] + 10, wy), at(node["pos"][0] + node["size"][0] - 10, wy + 20)
            draw.rounded_rectangle([wx0, wy0, wx1, wy1], max(1, round(10 * scale)), fill=WIDGET)
        picture = (node.get("widgets_values") or [None])[0]
        if node["type"] in ("LoadImage", "LoadImageMask") and isinstance(picture, str):
            _paste_photo(image, picture, at(node["pos"][0] + 10, widget_top + 2 * 24 + 4),
                         at(node["pos"][0] + node["size"][0] - 10, node["pos"][1] + node["size"][1] - 10))
    return image


def _banner(draw: ImageDraw.ImageDraw, name: str, height: int) -> None:
    """The template name in up to two lines of large type, centred in the top band."""
    font = _font(34)
    words, lines = name.split(), [""]
    for word in words:
        trial = f"{lines[-1]} {word}".strip()
        if font.getlength(trial) <= SIZE - 40 or not lines[-1]:
            lines[-1] = trial
        else:
            lines.append(word)
    lines = lines[:2]
    line_h = 42
    y = (height - line_h * len(lines)) / 2 + line_h / 2 + 10
    for line in lines:
        draw.text((SIZE / 2, y), _fit(line, font, SIZE - 20), fill=TEXT, font=font, anchor="mm")
        y += line_h


def _paste_photo(image: Image.Image, name: str, top_left, bottom_right) -> None:
    path = os.path.join(ROOT, "assets", name)
    box_w, box_h = int(bottom_right[0] - top_left[0]), int(bottom_right[1] - top_left[1])
    if not os.path.exists(path) or box_w < 4 or box_h < 4:
        return
    with Image.open(path) as photo:
        photo = photo.convert("RGB")
        photo.thumbnail((box_w, box_h))
        image.paste(photo, (int(top_left[0] + (box_w - photo.width) / 2), int(top_left[1] + (box_h - photo.height) / 2)))


def write_thumbnail(path: str, titles: dict[str, str], pack_types: set[str]) -> str:
    out = path[: -len(".json")] + ".jpg"
    render(path, titles, pack_types).save(out, "JPEG", quality=85, optimize=True,
                                          comment=COMMENT_PREFIX + workflow_digest(path).encode())
    return out


def main(argv: list[str]) -> int:
    paths = argv or sorted(glob.glob(os.path.join(HERE, "*.json")))
    titles, pack_types = _titles(), _pack_types()
    for path in paths:
        out = write_thumbnail(path, titles, pack_types)
        print(f"{os.path.relpath(out, ROOT)}: {os.path.getsize(out) // 1024} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
