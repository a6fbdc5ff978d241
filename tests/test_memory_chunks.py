"""chunk_size 0 runs as many rows at once as fit in the free memory; running out names chunk_size."""

from dataclasses import dataclass

import pytest
import torch

from conftest import assert_close
from core.diffusion import memory
from core.diffusion.batching import one_row_bytes, sample_many
from core.diffusion.guided_loop import GuidedSamplerOptions, program
from core.diffusion.schedule import DiffusionSchedule

SCHED = DiffusionSchedule.create(1000, "linear", "10")
OPTS = GuidedSamplerOptions(skip_timesteps=7)
STEPS = len(program(SCHED, OPTS))


@dataclass(frozen=True)
class Pull:
    """A loss pulling x0 to a constant, so the step has a backward."""
    name: str = "pull"

    def prepare(self, source):
        return self

    def __call__(self, x0, ctx):
        return 10 * ((x0 - 0.5) ** 2).flatten(1).mean(1)


@dataclass(frozen=True)
class Exhausts:
    """Fails like an allocator when more than ``fits`` rows run at once."""
    fits: int = 1
    error: str = "cuda"
    name: str = "exhausts"

    def prepare(self, source):
        return self

    def __call__(self, x0, ctx):
        if x0.shape[0] > self.fits:
            if self.error == "cuda":
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] . DefaultCPUAllocator: can't allocate memory: "
                               "you tried to allocate 17179869184 bytes")
        return x0.flatten(1).mean(1) * 0


def _sources(rows=4):
    return torch.linspace(-1, 1, rows * 3 * 32 * 32).reshape(rows, 3, 32, 32)


def test_pick_chunk_size():
    gib = 2 ** 30
    assert memory.pick_chunk_size(32, gib // 2, 16 * gib) == 25  # 0.8 * 16 GiB / 0.5 GiB
    assert memory.pick_chunk_size(32, gib // 2, 64 * gib) == 32  # all fit
    assert memory.pick_chunk_size(32, gib // 2, gib // 4) == 1  # not even one: one at a time
    assert memory.pick_chunk_size(32, gib // 2, None) == 32  # unknown free memory: all at once
    assert memory.free_memory("cpu") > 0 and memory.free_memory("meta") is None


def test_saved_bytes_counts_what_the_backward_keeps():
    x = torch.ones(1000, requires_grad=True)
    counted = memory.saved_bytes(lambda: (x.exp() * 2).sum())  # exp saves its 4000-byte result
    assert counted == 4000


def test_chunk_size_0_splits_by_free_memory_and_keeps_results(unet):
    sources = _sources()
    per_row = one_row_bytes(unet, SCHED, sources[:1], [Pull()], options=OPTS)
    assert per_row > 0
    seen, totals = [], []
    free = int(2.5 * per_row / memory.USABLE_FRACTION)  # room for two rows

    def free_memory(device):
        seen.append(device)
        return free

    split = sample_many(unet, SCHED, sources, [Pull()], seed=5, options=OPTS, free_memory=free_memory,
                        callback=lambda info: totals.append(info["total"]))
    assert seen == [torch.device("cpu")]
    assert totals[-1] == 2 * STEPS and len(totals) == 2 * STEPS  # two chunks of two rows
    whole = sample_many(unet, SCHED, sources, [Pull()], seed=5, options=OPTS, free_memory=10 ** 15,
                        callback=lambda info: totals.append(info["total"]))
    assert totals[-1] == STEPS  # everything fits: one batch, as before
    explicit = sample_many(unet, SCHED, sources, [Pull()], seed=5, options=OPTS, chunk_size=2)
    assert torch.equal(split.images, explicit.images)  # the same chunks as chunk_size=2
    assert_close(split.images, whole.images, 1e-4, what="chunking by memory changes the result")


@pytest.mark.parametrize("error", ["cuda", "cpu"])
def test_out_of_memory_names_chunk_size(unet, error):
    sources = _sources()
    # the estimate says all 4 rows fit, the allocator disagrees: the message names the value to use
    with pytest.raises(memory.ChunkMemoryError, match=r"^out of memory while sampling 4 of 4 rows at once \(about "
                                                      r"[0-9.]+ GiB per row\): set chunk_size to 2 \(or lower; 1 = one "
                                                      r"sample at a time, results do not change\)"):
        sample_many(unet, SCHED, sources, [Exhausts(1, error)], options=OPTS, free_memory=10 ** 15)
    with pytest.raises(memory.ChunkMemoryError, match=r"^out of memory while sampling 3 of 4 rows at once: set "
                                                      r"chunk_size to 1 "):
        sample_many(unet, SCHED, sources, [Exhausts(2, error)], options=OPTS, chunk_size=3)
    with pytest.raises(memory.ChunkMemoryError, match=r"sampling 1 of 4 rows at once: even one row does not fit"):
        sample_many(unet, SCHED, sources, [Exhausts(0, error)], options=OPTS, chunk_size=1)


def test_other_errors_pass_unchanged(unet):
    @dataclass(frozen=True)
    class Broken:
        name: str = "broken"

        def prepare(self, source):
            return self

        def __call__(self, x0, ctx):
            raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="^shape mismatch$"):
        sample_many(unet, SCHED, _sources(2), [Broken()], options=OPTS, chunk_size=1)


def test_guided_sampler_node_uses_comfy_free_memory(pack, monkeypatch):
    """The node asks ComfyUI (get_free_memory) and splits 3 samples when only one row fits."""
    from test_nodes import _tiny_ddpm_node_output

    _, models = pack
    ddpm = _tiny_ddpm_node_output(models)
    import comfy.model_management as mm
    import comfy.utils
    from diffuseit_pack.nodes.sampling import GuidedSampler

    asked = []
    monkeypatch.setattr(mm, "get_free_memory", lambda dev=None, torch_free_too=False: asked.append(dev) or 1)
    comfy.utils.updates.clear()
    kwargs = dict(ddpm=ddpm, image=torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(0)),
                  respacing="10", skip_timesteps=5, resample_steps=1, seed=3, samples=3)
    with torch.inference_mode():
        low = GuidedSampler.execute(**kwargs, chunk_size=0).result[0]
        serial = GuidedSampler.execute(**kwargs, chunk_size=1).result[0]
    assert asked == [ddpm.value.device]
    assert comfy.utils.updates[len(comfy.utils.updates) // 2 - 1][1] == 3 * 5  # three chunks of 5 steps
    assert torch.equal(low, serial)


def test_cli_prints_the_memory_error_as_one_line(monkeypatch, capsys):
    from core import cli

    def out_of_memory(args):
        raise memory.memory_error(8, 8, 2 ** 30)

    monkeypatch.setattr(cli, "cmd_sample", out_of_memory)
    assert cli.main(["sample", "--ckpt", "x.pt"]) == 2
    err = capsys.readouterr().err
    assert err == ("error: out of memory while sampling 8 of 8 rows at once (about 1.00 GiB per row): set chunk_size "
                   "to 4 (or lower; 1 = one sample at a time, results do not change), or turn on gradient checkpointing\n")
