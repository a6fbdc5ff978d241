"""Reverse-process steps and the plain sampler, as small functions over (model, x, schedule).

Step functions take the UNet's raw output already turned into p(x_{t-1}|x_t) statistics by
:func:`schedule.p_mean_variance`, plus an optional guidance gradient, and return the next x.
The loop (:func:`sample`) is shared with guided sampling through ``step_fn``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import torch

from ..devices import to_device
from .schedule import (DiffusionSchedule, MeanVariance, eps_from_x0, extract, p_mean_variance,
                       predict_x0_from_eps, q_sample)

Callback = Callable[[dict], None]


def model_output(unet: torch.nn.Module, x: torch.Tensor, t_index: torch.Tensor, schedule: DiffusionSchedule,
                 y: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Call the UNet with the *original* timesteps of respaced indices, as SpacedDiffusion does."""
    t = schedule.model_timesteps(t_index)
    return unet(x, t) if y is None else unet(x, t, y)


def ddpm_step(schedule: DiffusionSchedule, mv: MeanVariance, x_t: torch.Tensor, t_index: torch.Tensor,
              noise: torch.Tensor, cond_grad: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Ancestral step x_{t-1} = mu + Sigma g + sigma z (Ho et al. alg. 2; Dhariwal & Nichol eq. 10 for g).

    The guidance gradient g = grad log p(y|x_t) shifts the mean by the step's variance; no noise is
    added at index 0.
    """
    mean = mv.mean if cond_grad is None else mv.mean + mv.variance * cond_grad.float()
    nonzero = (t_index != 0).float().reshape(-1, *([1] * (x_t.dim() - 1)))
    return mean + nonzero * torch.exp(0.5 * mv.log_variance) * noise


def ddim_step(schedule: DiffusionSchedule, mv: MeanVariance, x_t: torch.Tensor, t_index: torch.Tensor,
              noise: torch.Tensor, eta: float = 0.0,
              cond_grad: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """DDIM update (Song et al. eq. 12) with optional score correction (Dhariwal & Nichol eq. 14).

    eps is re-derived from the (possibly clipped) x0; guidance replaces it with
    eps - sqrt(1 - abar) g and re-derives x0 from that *without* clipping, as upstream. Returns
    (x_{t-1}, predicted_x0 actually used).
    """
    pred_xstart = mv.pred_xstart
    eps = eps_from_x0(schedule, x_t, t_index, pred_xstart)
    if cond_grad is not None:
        eps = eps - extract(schedule.sqrt_one_minus_alphas_cumprod, t_index, x_t) * cond_grad.float()
        pred_xstart = predict_x0_from_eps(schedule, x_t, t_index, eps)
    abar = extract(schedule.alphas_cumprod, t_index, x_t)
    abar_prev = extract(schedule.alphas_cumprod_prev, t_index, x_t)
    sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
    mean = pred_xstart * torch.sqrt(abar_prev) + torch.sqrt(1 - abar_prev - sigma ** 2) * eps
    nonzero = (t_index != 0).float().reshape(-1, *([1] * (x_t.dim() - 1)))
    return mean + nonzero * sigma * noise, pred_xstart


_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # SplitMix64's increment (2^64 / golden ratio, odd)
STREAM_NOISE = 0  # the sampler's Gaussian draws (start, step, resample, background)
STREAM_AUGMENT = 1  # random augmentations of the guidance terms (CLIP cuts, cutouts)


def splitmix64(z: int) -> int:
    """SplitMix64's output function (Steele, Lea & Flood 2014): a bijective 64-bit mix."""
    z &= _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def row_seed(seed: int, row: int, stream: int = STREAM_NOISE) -> int:
    """The seed of row ``row``'s generator in a run seeded with ``seed``: the one place row seeds come from.

    ``row_seed(seed, r)`` is output ``r + 1`` of a SplitMix64 generator started at ``seed``, i.e.
    ``splitmix64(seed + (r + 1) * 0x9E3779B97F4A7C15 mod 2^64)``; other streams (``STREAM_AUGMENT``)
    mix that once more with the stream number. Rows of one seed never share a generator, and neither
    do nearby seeds: ``row_seed(s, r) == row_seed(s + k, r')`` needs ``k = (r - r') * 0x9E37...``
    mod 2^64, astronomically far for any practical row count -- unlike ``seed + r``, where seed s + 1
    repeated rows 1.. of seed s (ComfyUI's "increment" seed control re-delivered most of the last batch).

    **Serial equivalent**: row ``r`` of a batch run with ``seed`` is the single-row run with the same
    ``seed`` and ``first_row=r`` (``guided_sample`` / ``sample_many`` / ``blended_sample`` / ``sample``).
    """
    z = splitmix64((int(seed) + (int(row) + 1) * _GOLDEN) & _MASK64)
    if stream:
        z = splitmix64(z ^ ((int(stream) * 0xD1B54A32D192ED03) & _MASK64))
    return z


class NoiseSource:
    """Per-sample CPU generators: row b of every draw depends only on ``row_seed(seed, first_row + b)``,
    never on the batch.

    That makes a batch of N samples identical to N single runs with the same seed and
    ``first_row`` 0, 1, ..., and independent of the device, like ComfyUI's CPU noise.
    """

    def __init__(self, seed: int, batch: int, device: Union[str, torch.device] = "cpu", first_row: int = 0):
        self.generators = [torch.Generator("cpu").manual_seed(row_seed(seed, first_row + b)) for b in range(batch)]
        self.device = device

    def randn(self, shape: Sequence[int], kind: str = "step", rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One draw of ``shape`` per row. ``kind`` names the draw (start, step, resample, background) for
        replay sources; with ``rows`` only those rows draw (others get zeros), so one row restarting does
        not shift the other rows' streams."""
        wanted = [True] * len(self.generators) if rows is None else [bool(r) for r in rows.tolist()]
        draws = [torch.randn(tuple(shape), generator=g, dtype=torch.float32) if w else torch.zeros(tuple(shape))
                 for g, w in zip(self.generators, wanted)]
        return to_device(torch.stack(draws), self.device)


def timesteps_to_run(schedule: DiffusionSchedule, skip_timesteps: int = 0) -> list[int]:
    """Respaced indices visited by the loop: N-1-skip down to 0."""
    if not 0 <= skip_timesteps < schedule.num_timesteps:
        raise ValueError(f"skip_timesteps must be in [0, {schedule.num_timesteps - 1}], got {skip_timesteps}")
    return list(range(schedule.num_timesteps - 1 - skip_timesteps, -1, -1))


def sample(unet: torch.nn.Module, schedule: DiffusionSchedule, shape: Sequence[int], *, seed: int = 0,
           sampler: str = "ddpm", eta: float = 0.0, clip_denoised: bool = True,
           y: Optional[torch.Tensor] = None, init_image: Optional[torch.Tensor] = None, skip_timesteps: int = 0,
           x_T: Optional[torch.Tensor] = None, callback: Optional[Callback] = None,
           learn_sigma: bool = True, noise_source: Optional[Any] = None, first_row: int = 0) -> torch.Tensor:
    """Unguided DDPM/DDIM sampling from noise, or from ``init_image`` noised to step N-1-skip (SDEdit-style).

    ``callback`` receives ``{i, total, t_index, t, x, predicted_x0}`` after every step; raising in it
    stops sampling (ComfyUI's Cancel). ``noise_source`` (anything with ``randn(shape)`` returning a
    batch) replaces the seeded per-sample generators, e.g. to replay recorded noise. Row b draws from
    ``row_seed(seed, first_row + b)``, so row r of a batch equals a batch-1 run with ``first_row=r``. Returns the final
    sample in model range [-1, 1] (unclamped).
    """
    if sampler not in ("ddpm", "ddim"):
        raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")
    device = next(unet.parameters()).device
    noise = noise_source if noise_source is not None else NoiseSource(seed, shape[0], device, first_row)
    indices = timesteps_to_run(schedule, skip_timesteps)
    x = noise.randn(shape[1:]) if x_T is None else x_T.to(device, torch.float32)
    if init_image is not None:
        start = torch.full((shape[0],), indices[0], dtype=torch.long, device=device)
        x = q_sample(schedule, init_image.to(device, torch.float32).expand(shape[0], -1, -1, -1), start, x)
    for i, k in enumerate(indices):
        t_index = torch.full((shape[0],), k, dtype=torch.long, device=device)
        with torch.no_grad():
            out = model_output(unet, x, t_index, schedule, y).float()
        mv = p_mean_variance(schedule, out, x, t_index, clip_denoised, learn_sigma)
        z = noise.randn(shape[1:])  # drawn at every step, as upstream, so streams stay aligned
        if sampler == "ddpm":
            x, x0 = ddpm_step(schedule, mv, x, t_index, z), mv.pred_xstart
        else:
            x, x0 = ddim_step(schedule, mv, x, t_index, z, eta)
        if callback is not None:
            callback({"i": i, "total": len(indices), "t_index": k, "t": int(schedule.timestep_map[k]),
                      "x": x, "predicted_x0": x0})
    if x.device.type != "meta" and not bool(torch.isfinite(x).all()):  # one read-back, after the loop
        from .finite_watch import GuidanceError

        model = getattr(unet, "source_file", "")
        raise GuidanceError(f"the diffusion model's output{f' ({model})' if model else ''} is NaN/inf: the checkpoint "
                            "may hold NaN/inf weights, or a fp16/bf16 UNet overflowed (use fp32)")
    return x
