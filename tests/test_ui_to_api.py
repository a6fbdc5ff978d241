"""UI-format -> API-format conversion, checked against what the real frontend exported (no server needed).

``dummy_packs_ui.json`` / ``dummy_packs_ui_exported_api.json`` are a UI graph and the prompt the
ComfyUI frontend (1.32.9, ``app.graphToPrompt()``) built from it; ``dummy_packs_object_info.json``
is the real server's ``/object_info`` for its node types (v0.3.75, LoadImage's file list trimmed).
"""

import copy
import json
import os

import pytest

from conftest import FIXTURES
from e2e.ui_to_api import ConversionError, convert, extra_widget_values, is_widget, widget_values

COMFY = os.path.join(FIXTURES, "comfy")


def load(name):
    with open(os.path.join(COMFY, name)) as f:
        return json.load(f)


@pytest.fixture
def object_info():
    return load("dummy_packs_object_info.json")


def test_matches_the_frontends_export(object_info):
    assert convert(load("dummy_packs_ui.json"), object_info) == load("dummy_packs_ui_exported_api.json")


def test_seed_control_and_upload_values_are_skipped(object_info):
    ui = load("dummy_packs_ui.json")
    nodes = {n["id"]: n for n in ui["nodes"]}
    # [7, "fixed", 0.6]: the control-after-generate mode follows the seed
    assert widget_values(nodes[2], object_info["DummyMakeToken"]) == {"seed": 7, "gain": 0.6}
    # ["e2e_test_input.png", "image"]: the upload button's value follows the file name
    assert widget_values(nodes[1], object_info["LoadImage"]) == {"image": "e2e_test_input.png"}


def test_widget_rules():
    assert is_widget(["INT", {}]) and is_widget([["a", "b"], {}]) and is_widget(["COMBO", {"options": ["a"]}])
    assert not is_widget(["IMAGE", {}]) and not is_widget(["INT", {"forceInput": True}])
    assert extra_widget_values("seed", ["INT", {}]) == 1  # the frontend's legacy seed rule
    assert extra_widget_values("seed", ["INT", {"control_after_generate": False}]) == 0
    assert extra_widget_values("steps", ["INT", {}]) == 0
    assert extra_widget_values("image", [["a.png"], {"image_upload": True}]) == 0


def test_upload_button_value_trails_all_widgets():
    # what frontend 1.32.9 saves for a new LoadImageMask node: [file, channel, upload button]
    info = {"input": {"required": {"image": [["m.png"], {"image_upload": True}],
                                   "channel": [["alpha", "red", "green", "blue"]]}}}
    node = {"id": 1, "type": "LoadImageMask", "widgets_values": ["m.png", "red", "image"]}
    assert widget_values(node, info) == {"image": "m.png", "channel": "red"}


def test_bypassed_node_is_wired_through_and_muted_node_dropped(object_info):
    ui = load("dummy_packs_ui.json")
    tint = next(n for n in ui["nodes"] if n["type"] == "DummyV3Tint")
    tint["mode"] = 4  # bypass: its IMAGE output takes its IMAGE input
    prompt = convert(ui, object_info)
    assert "4" not in prompt and prompt["5"]["inputs"]["image"] == ["3", 0]
    ui2 = load("dummy_packs_ui.json")
    next(n for n in ui2["nodes"] if n["type"] == "SaveImage")["mode"] = 2
    assert "6" not in convert(ui2, object_info)


def test_reroute_is_followed(object_info):
    ui = load("dummy_packs_ui.json")
    ui["nodes"].append({"id": 9, "type": "Reroute", "mode": 0, "inputs": [{"name": "", "type": "*", "link": 6}],
                        "outputs": [{"name": "", "type": "IMAGE", "links": [8]}]})
    ui["links"] = [ln for ln in ui["links"] if ln[0] != 6] + [[6, 5, 0, 9, 0, "IMAGE"], [8, 9, 0, 6, 0, "IMAGE"]]
    next(n for n in ui["nodes"] if n["id"] == 6)["inputs"][0]["link"] = 8
    assert convert(ui, object_info)["6"]["inputs"]["images"] == ["5", 0]


def test_errors_name_the_node(object_info):
    ui = load("dummy_packs_ui.json")
    info = copy.deepcopy(object_info)
    del info["DummyV3Tint"]
    with pytest.raises(ConversionError, match="DummyV3Tint"):
        convert(ui, info)
    with pytest.raises(ConversionError, match="UI-format"):
        convert(load("dummy_packs_ui_exported_api.json"), object_info)
