"""Saved node geometry of every workflows/*.json (and any added later): each node at least LiteGraph's
minimum for its sockets and widgets, no two nodes (title bars included) overlapping. The rule and its
constants are in tests/workflow_geometry.py; one file: ``python tests/workflow_geometry.py FILE``."""

import copy
import glob
import json
import os

import pytest

from conftest import ROOT
from workflow_geometry import (IMAGE_UPLOAD, TITLE_HEIGHT, NodeSpec, all_specs, check_workflow_file,
                               fit_workflow, geometry_problems, minimum_size, spec_from_schema)

WORKFLOWS = sorted(glob.glob(os.path.join(ROOT, "workflows", "*.json")))


@pytest.fixture(scope="module")
def specs(pack):
    from diffuseit_pack.nodes import NODES

    return all_specs({n.define_schema().node_id: spec_from_schema(n.define_schema()) for n in NODES})


def test_there_are_workflows():
    assert len(WORKFLOWS) >= 5


@pytest.mark.parametrize("path", WORKFLOWS, ids=os.path.basename)
def test_saved_geometry(path, specs):
    problems = check_workflow_file(path, specs)
    assert not problems, "\n".join(problems) + "\n(fix: python tests/workflow_geometry.py --fix FILE)"


@pytest.mark.parametrize("path", WORKFLOWS, ids=os.path.basename)
def test_specs_have_the_saved_widgets(path, specs):
    """The specs the minimum comes from have as many widgets as the frontend saved values for (an
    image-upload combo saves two: the file and the upload button), so no widget goes uncounted."""
    with open(path) as f:
        nodes = json.load(f)["nodes"]
    for node in nodes:
        spec = specs[node["type"]]
        count = sum(2 if kind == IMAGE_UPLOAD else 1 for _, kind in spec.widgets)
        assert count == len(node.get("widgets_values") or []), f"{node['type']}: {spec.widgets} vs {node['widgets_values']}"


def test_each_widget_and_row_adds_litegraph_heights():
    base = NodeSpec("Load DDPM (guided-diffusion)", [], ["ddpm"], [("ckpt_name", "plain")])
    more = NodeSpec(base.title, [], ["ddpm"], base.widgets + [("dtype", "plain"), ("gradient_checkpointing", "plain")])
    rows = NodeSpec(base.title, ["a", "b", "c"], ["ddpm"], base.widgets)
    assert minimum_size(more)[1] - minimum_size(base)[1] == 2 * (20 + 4)
    assert minimum_size(rows)[1] - minimum_size(base)[1] == 2 * 20
    # the longest widget label sets the width once it beats the title: 0.6 * 14 px a character + padding
    wide = NodeSpec("X", [], [], [("a" * 40, "plain")])
    assert minimum_size(wide)[0] == round(40 * 0.6 * 14 + 42 + 2 * (15 + 6 + 10))


def _issue_graph(specs) -> dict:
    """Issue 14's case: Load DDPM saved 110 px tall (its four widgets need more), Load DINO 40 px below."""
    return {"nodes": [
        {"id": 2, "type": "LoadDDPM", "pos": [40, 420], "size": [315, 110], "widgets_values": ["a", "auto", "", False]},
        {"id": 3, "type": "LoadDINO", "pos": [40, 570], "size": [315, 130], "widgets_values": ["b", False, 0]},
    ]}


def test_issue_graph_is_caught_and_fixed(specs):
    graph = _issue_graph(specs)
    need_h = minimum_size(specs["LoadDDPM"])[1]
    assert 420 + need_h > 570 - TITLE_HEIGHT  # at its real size Load DDPM reaches under Load DINO's title
    problems = geometry_problems(graph, specs)
    assert len(problems) == 1 and "node 2 (LoadDDPM): size 315x110" in problems[0], problems
    fixed = fit_workflow(copy.deepcopy(graph), specs)
    assert geometry_problems(fixed, specs) == []
    ddpm, dino = fixed["nodes"]
    assert ddpm["size"][1] == need_h and dino["pos"][1] - TITLE_HEIGHT >= ddpm["pos"][1] + need_h


def test_overlaps_and_unknown_types_are_reported(specs):
    a = {"id": 1, "type": "RangeLoss", "pos": [0, 0], "size": [400, 200]}
    b = {"id": 2, "type": "RangeLoss", "pos": [390, 180], "size": [400, 200]}  # 10 px left, 20 + 30 (title) down
    problems = geometry_problems({"nodes": [a, b, {"id": 3, "type": "Mystery", "pos": [0, 900], "size": [9, 9]}]},
                                 specs)
    assert problems == ["node 3 (Mystery): no definition known; add it to CORE_NODES in tests/workflow_geometry.py",
                        "node 1 (RangeLoss) and node 2 (RangeLoss) overlap by 10x50 px (title bars included)"]
    side_by_side = fit_workflow({"nodes": [a, b]}, specs)
    assert geometry_problems(side_by_side, specs) == []
    assert side_by_side["nodes"][1]["pos"] == [420, 180]  # moved right past a (+ 20 px gap), not down



def test_a_title_given_in_the_workflow_sets_the_width(specs):
    """The frontend measures the title the node shows, which the user may have renamed (1.32.9 measured a
    renamed Note 280 px wide where its plain title needs 215)."""
    spec = specs["RangeLoss"]
    long_title = "x" * 40
    assert minimum_size(spec, long_title)[0] == round(30 + 40 * 0.6 * 14 + 30 * 0.33 + 0.5) > minimum_size(spec)[0]
    node = {"id": 1, "type": "RangeLoss", "pos": [0, 0], "size": list(minimum_size(spec)), "title": long_title}
    assert "smaller than" in geometry_problems({"nodes": [node]}, specs)[0]
