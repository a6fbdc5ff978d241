"""Template browser: every workflow has a readable name (the browser's title is the file name) and an
up-to-date ``<name>.jpg`` thumbnail from workflows/make_thumbnails.py, and workflows/ is the pack's only
template folder. The real server serves both files: tests/test_e2e_comfy.py."""

import copy
import glob
import json
import os
import re
import sys

import pytest
from PIL import Image

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "workflows"))
import make_thumbnails  # noqa: E402

WORKFLOWS = sorted(glob.glob(os.path.join(ROOT, "workflows", "*.json")))
# ComfyUI (v0.3.75, v0.33.0) lists the .json files of all these folders but serves only the first that
# exists under /api/workflow_templates/<pack>/: a second folder would show every template twice, half of them 404
TEMPLATE_FOLDERS = ["example_workflows", "example", "examples", "workflow", "workflows"]


def test_workflows_is_the_only_template_folder():
    assert [d for d in TEMPLATE_FOLDERS if os.path.isdir(os.path.join(ROOT, d))] == ["workflows"]


@pytest.mark.parametrize("path", WORKFLOWS, ids=os.path.basename)
def test_name_reads_as_a_title(path):
    """The frontend (1.32.9 .. 1.58.1) titles a pack's template with its file name, unchanged."""
    name = os.path.basename(path)[: -len(".json")]
    assert re.fullmatch(r"[A-Z][A-Za-z0-9 .,()+-]*[A-Za-z0-9)]", name) and " " in name and "_" not in name, (
        f"{name!r}: name workflows as the title users should see, e.g. 'DiffuseIT text-guided translation'")


@pytest.mark.parametrize("path", WORKFLOWS, ids=os.path.basename)
def test_thumbnail_is_there_and_current(path):
    jpg = path[: -len(".json")] + ".jpg"
    assert os.path.exists(jpg), f"no thumbnail: run python workflows/make_thumbnails.py \"{path}\""
    with Image.open(jpg) as im:
        assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (make_thumbnails.SIZE, make_thumbnails.SIZE))
    assert make_thumbnails.thumbnail_digest(jpg) == make_thumbnails.workflow_digest(path), (
        f"{os.path.basename(jpg)} was drawn from another version of the workflow: "
        f"run python workflows/make_thumbnails.py \"{path}\"")


@pytest.fixture(scope="module")
def titles(pack):
    from diffuseit_pack.nodes import NODES
    from workflow_geometry import CORE_NODES, spec_from_schema

    pack_titles = {n.define_schema().node_id: spec_from_schema(n.define_schema()).title for n in NODES}
    return {**{t: s.title for t, s in CORE_NODES.items()}, **pack_titles}, set(pack_titles)


def test_render_draws_the_saved_graph(tmp_path, titles):
    """A node moved in the file moves in the picture; Load Image shows the photo it names."""
    names, pack_types = titles
    source = os.path.join(ROOT, "workflows", "DDPM reconstruction (checkpoint check).json")
    with open(source) as f:
        workflow = json.load(f)
    first = make_thumbnails.render(source, names, pack_types)
    moved = copy.deepcopy(workflow)
    save = next(n for n in moved["nodes"] if n["type"] == "SaveImage")
    save["pos"] = [save["pos"][0], save["pos"][1] + 150]
    path = tmp_path / "Moved.json"
    path.write_text(json.dumps(moved))
    second = make_thumbnails.render(str(path), names, pack_types)
    assert first.size == second.size == (make_thumbnails.SIZE, make_thumbnails.SIZE)
    assert first.tobytes() != second.tobytes()
    # Load Image shows its photo: with the photo missing the picture has far fewer distinct colours
    no_photo = copy.deepcopy(workflow)
    next(n for n in no_photo["nodes"] if n["type"] == "LoadImage")["widgets_values"][0] = "not-there.png"
    path.write_text(json.dumps(no_photo))
    without = make_thumbnails.render(str(path), names, pack_types)
    assert len(first.getcolors(1 << 24)) > 4 * len(without.getcolors(1 << 24)), (len(first.getcolors(1 << 24)),
                                                                          len(without.getcolors(1 << 24)))
