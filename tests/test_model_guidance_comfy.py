"""Apply Guidance to Model under ComfyUI's real sampling code (v0.3.75 from PyPI, or $COMFYUI_DIR).

One child process (``e2e/model_guidance_probe.py``, ComfyUI's interpreter) runs every case on a tiny
SD1.5-family model built with ComfyUI's own classes and reports measurements; the tests below assert
them. eps, v-prediction and flow models x six k-samplers, the custom-sampler guiders, the band and
every_n_steps, zero guidance, loss lowering per term, determinism, Cancel and memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from conftest import ROOT

pytestmark = pytest.mark.e2e

KINDS = ["eps", "v", "flow"]
SAMPLERS = ["euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde", "uni_pc", "heun"]
GUIDERS = ["basic", "cfg", "dual"]
LOWERED = ["range", "dino_structure", "dino_style", "clip_directional", "masked_clip"]
# (start, end, every_n, steps) -> the first-order sampler steps that must be guided
BANDS = [((0.3, 0.7, 2, 10), [3, 5, 7]), ((0.0, 1.0, 1, 6), [0, 1, 2, 3, 4, 5]), ((0.5, 1.0, 3, 8), [4, 7]),
         ((0.0, 0.0, 1, 5), [0])]
MEMORY_RUNS = 12


@pytest.fixture(scope="module")
def probe(comfy, tmp_path_factory):
    cases = {"zero": 1, "lowers": LOWERED, "strength": 1.0, "matrix": {"kinds": KINDS, "samplers": SAMPLERS},
             "guiders": GUIDERS, "band": [list(b) for b, _ in BANDS], "vae_decoder": 1,
             "repeat_cancel_memory": MEMORY_RUNS, "errors": 1}
    work = tmp_path_factory.mktemp("model_guidance")
    t0 = time.monotonic()
    proc = subprocess.run([str(comfy.python), os.path.join(ROOT, "tests", "e2e", "model_guidance_probe.py"), ROOT,
                           str(work)], input=json.dumps(cases), capture_output=True, text=True,
                          cwd=str(comfy.comfy_dir), timeout=1800)
    assert proc.returncode == 0, f"probe failed:\n{proc.stderr[-4000:]}"
    print(f"\n[model guidance probe] {time.monotonic() - t0:.0f}s")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_zero_guidance_is_plain_sampling_bit_for_bit_and_the_input_model_is_unchanged(probe):
    zero = probe["zero"]
    assert zero["strength0_equal"], "strength 0 changed the sampler's output"
    assert zero["weights0_equal"], "guidance whose weights are all 0 changed the sampler's output"
    assert zero["plain_repeat_equal"], "the input MODEL samples differently after being guided (it was modified)"
    assert zero["model_options_unchanged"], "the input MODEL's model_options changed"


@pytest.mark.parametrize("term", LOWERED)
def test_guidance_lowers_its_own_loss(probe, term):
    measured = probe["lowers"][term]
    assert measured["finite"]
    assert measured["guided"] < measured["plain"], (
        f"{term}: final decoded loss with guidance {measured['guided']:.6g} is not below the same seed's "
        f"{measured['plain']:.6g} without it")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_prediction_type_and_sampler_runs_guided_and_finite(probe, kind, sampler):
    measured = probe["matrix"][f"{kind}/{sampler}"]
    assert measured["finite"], f"{kind} model with {sampler}: non-finite output"
    assert measured["guided_calls"] >= 4, f"{kind}/{sampler}: only {measured['guided_calls']} guided calls in 4 steps"
    assert measured["moved"], f"{kind}/{sampler}: guidance never moved x0"


@pytest.mark.parametrize("guider", GUIDERS)
def test_custom_sampler_guiders(probe, guider):
    measured = probe["guiders"][guider]
    assert measured["finite"] and measured["moved"] and measured["guided_calls"] >= 5, measured


@pytest.mark.parametrize("index", range(len(BANDS)))
def test_band_and_every_n_steps_guide_exactly_the_steps_they_name(probe, index):
    _, expected = BANDS[index]
    measured = probe["band"][index]
    assert measured["steps_guided"] == expected and measured["calls"] == len(expected), measured


def test_a_comfyui_vae_works_as_the_decoder(probe):
    assert probe["vae_decoder"]["finite"] and probe["vae_decoder"]["guided_calls"] >= 6, probe["vae_decoder"]


def test_same_seed_same_image_cancel_then_run_and_flat_memory(probe):
    measured = probe["repeat_cancel_memory"]
    assert measured["same_seed_equal"], "two runs with the same seed differ"
    assert measured["cancelled"], "the interrupt did not stop the guided run"
    assert measured["after_cancel_equal"], "a run after Cancel differs from a fresh run (state leaked across runs)"
    rss = measured["rss_mb"]
    growth = rss[-1] - rss[3]
    assert growth < max(50.0, 0.05 * rss[3]), f"RSS grew {growth:.0f} MB from run 4 to run {len(rss)}: {rss}"


def test_bad_inputs_get_clear_errors(probe):
    errors = probe["errors"]
    assert "decoder is 'vae' but no VAE is wired" in errors["no_vae"]
    assert "dino_structure compare with a source image" in errors["no_source"]
    assert errors["batch_mismatch"] is not None and "the source image has 3 images but the latent batch has 2" \
        in errors["batch_mismatch"], errors["batch_mismatch"]
