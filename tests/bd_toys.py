"""Stand-ins used by the Blended Diffusion fixtures (fixtures README, "The stand-ins").

* :class:`ToyEpsModel`: two 3x3 convs shaped like a denoiser, called as ``model(x, t)`` with
  the float *original* timestep;
* :class:`StubClip`: ``encode_image = flatten @ image_proj``, ``encode_text`` = a fixed
  embedding, with the duck-typed ``ClipModel`` attributes our code expects;
* :func:`step_context`: the ``StepContext`` a fixture step is run with. The guidance gradient
  itself comes from the pack (``core.diffusion.guided_loop.guidance_gradient``), which calls
  the toy model as ``model(x, timestep_map[t_index])`` just as it calls the UNet.
"""

from __future__ import annotations

import functools
import json
import re
import warnings
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file

from core.diffusion.guidance import Replay, StepContext
from core.diffusion.schedule import DiffusionSchedule

FIXTURES = Path(__file__).parent / "fixtures" / "blended_diffusion"


def fixture_json() -> dict:
    return json.loads((FIXTURES / "blended_diffusion_fixtures.json").read_text())


def readme_tolerances() -> dict[str, list[float]]:
    """The README's "Tolerance summary" table: row label -> the atol numbers in that row
    (e.g. ``"losses: distances, range, MSE / LPIPS" -> [1e-06, 1e-05]``)."""
    text = (FIXTURES / "README.md").read_text()
    table = text.split("## Tolerance summary", 1)[1].split("\n\n", 1)[0]
    rows: dict[str, list[float]] = {}
    for line in table.splitlines()[3:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2:
            numbers = re.findall(r"(?<![\w.±])(\d+(?:\.\d+)?(?:e-?\d+)?)(?![\w.])", cells[1])
            rows[cells[0]] = [float(n) for n in numbers]
    return rows


def readme_relative_total_tolerance() -> float:
    """cond_fn's "total loss to <x> relative" from the README."""
    text = (FIXTURES / "README.md").read_text()
    return float(re.search(r"total loss to ([0-9.e-]+) relative", text).group(1))


def fixture(name: str) -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / f"{name}.safetensors"))


def prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Sub-dict of ``prefix.*`` keys with the prefix removed."""
    return {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


class ToyEpsModel(torch.nn.Module):
    """``x0 = 1.2 tanh(conv_x0(x) + 0.1 sin(t/100))``, ``eps = (x - sqrt(abar) x0) / sqrt(1 - abar)``,
    ``v = tanh(conv_var(x) + cos(t/100))``; output ``cat([eps, v])`` (6 channels)."""

    def __init__(self, weights: dict[str, torch.Tensor]):
        super().__init__()
        self.x0_conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.var_conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.load_state_dict(prefixed(weights, "toy_eps_model"))
        betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
        self.register_buffer("abar", torch.cumprod(1 - betas, dim=0), persistent=False)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.to(x.dtype).reshape(-1, 1, 1, 1)
        abar = self.abar[t.round().long().flatten()].to(x.dtype).reshape(-1, 1, 1, 1)
        x0 = 1.2 * torch.tanh(self.x0_conv(x) + 0.1 * torch.sin(t / 100))
        eps = (x - abar.sqrt() * x0) / (1 - abar).sqrt()
        v = torch.tanh(self.var_conv(x) + torch.cos(t / 100))
        return torch.cat([eps, v], dim=1)


class StubClip:
    """Duck-typed ``ClipModel``: ``image_size``, ``mean``, ``std``, ``encode_image``, ``encode_text``."""

    def __init__(self, weights: dict[str, torch.Tensor], meta: dict):
        self.image_proj = weights["stub_clip.image_proj"]
        self.text_embedding = weights["stub_clip.text_embedding"]
        self.image_size = int(meta["stub_clip_input_resolution"])
        self.mean = torch.tensor(meta["clip_normalize_mean"])
        self.std = torch.tensor(meta["clip_normalize_std"])
        self.text_calls: list[list[str]] = []

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.reshape(pixels.shape[0], -1) @ self.image_proj.to(pixels)

    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        self.text_calls.append(list(prompts))
        return self.text_embedding.expand(len(prompts), -1)


def toy_models() -> tuple[ToyEpsModel, StubClip]:
    weights = fixture("toy_models")
    return ToyEpsModel(weights).eval(), StubClip(weights, fixture_json()["toy_models"])


@functools.lru_cache(maxsize=1)
def seeded_lpips() -> torch.nn.Module:
    """The fixtures' LPIPS (``torch.manual_seed(13); lpips.LPIPS(net="vgg", pnet_rand=True)``: random
    VGG trunk, lpips' packaged linear heads; nothing is downloaded), built by the pack's
    ``load_lpips(None, random_trunk=True)`` after the fixture's seed. Built once per session,
    frozen; the global RNG state is restored afterwards. test_bd_losses checks it against the
    fixture's fingerprint."""
    from core.encoders.lpips import load_lpips

    construction = fixture_json()["losses"]["lpips_construction"]
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(int(construction["seed"]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torchvision's "pretrained" deprecation
            model = load_lpips(None, random_trunk=True)
    finally:
        torch.random.set_rng_state(state)
    return model


def step_context(schedule: DiffusionSchedule, x_t: torch.Tensor, t_index: torch.Tensor, source: torch.Tensor,
                 replay: Replay = Replay()) -> StepContext:
    """The context of one fixture step at ``t_index`` on ``x_t`` (the source expanded to the batch,
    no generators: terms draw from their own seed, as the fixtures' ``seed_before_call``)."""
    return StepContext(t_index=t_index, t=schedule.model_timesteps(t_index), x_t=x_t, schedule=schedule,
                       source=source.expand(x_t.shape[0], -1, -1, -1), replay=replay)
