"""Previews follow ComfyUI's --preview-method: "none" sends none and reads nothing back from the device."""

import pytest
import torch

from test_nodes import _tiny_ddpm_node_output

META = torch.device("meta")


@pytest.fixture
def preview_method(pack, monkeypatch):
    """Set the stub's comfy.cli_args.args.preview_method for one test."""
    import comfy.cli_args

    def set_method(name):
        monkeypatch.setattr(comfy.cli_args.args, "preview_method", comfy.cli_args.LatentPreviewMethod(name))
    return set_method


def _info(i, total, device="cpu"):
    return {"i": i, "total": total, "predicted_x0": torch.zeros(1, 3, 8, 8, device=device)}


def test_no_previews_reads_nothing_back(preview_method):
    """With previews off an update never touches x0: on ``meta`` any host read (``.cpu()``) would raise."""
    from diffuseit_pack.nodes import comfy_bridge as bridge
    import comfy.utils
    preview_method("none")
    comfy.utils.updates.clear()
    progress = bridge.Progress(3)
    for i in range(3):
        progress(_info(i, 3, META))
    assert comfy.utils.updates == [(1, 3, False), (2, 3, False), (3, 3, False)]


def test_previews_on_take_x0_to_the_host(preview_method):
    from diffuseit_pack.nodes import comfy_bridge as bridge
    import comfy.utils
    preview_method("auto")
    comfy.utils.updates.clear()
    progress = bridge.Progress(2)
    progress(_info(0, 2))
    assert comfy.utils.updates == [(1, 2, True)]
    with pytest.raises(NotImplementedError):  # the preview's .cpu(): the one read-back, only with previews
        progress(_info(1, 2, META))


def test_missing_setting_keeps_previews(pack, monkeypatch):
    """An older or trimmed ComfyUI without ``args.preview_method`` (or without comfy.cli_args) still previews."""
    from diffuseit_pack.nodes import comfy_bridge as bridge
    import comfy.cli_args
    monkeypatch.delattr(comfy.cli_args.args, "preview_method")
    assert bridge.preview_method() is None and bridge.Progress(1).previews
    monkeypatch.setitem(__import__("sys").modules, "comfy.cli_args", None)  # import fails
    assert bridge.preview_method() is None and bridge.Progress(1).previews


@pytest.mark.parametrize("method", ["none", "auto"])
def test_guided_sampler_previews_follow_preview_method(pack, preview_method, monkeypatch, method):
    """The sampler node: "none" -> no preview built (no x0 copied to the host), progress still counts every
    step; "auto" -> a preview with every step, as ComfyUI's samplers."""
    _, models = pack
    ddpm = _tiny_ddpm_node_output(models)
    from diffuseit_pack.nodes import comfy_bridge as bridge
    from diffuseit_pack.nodes.sampling import GuidedSampler
    import comfy.utils
    preview_method(method)
    built = []
    to_pil = bridge.to_pil
    monkeypatch.setattr(bridge, "to_pil", lambda x: built.append(1) or to_pil(x))
    comfy.utils.updates.clear()
    with torch.inference_mode():
        GuidedSampler.execute(ddpm=ddpm, image=torch.rand(1, 32, 32, 3), respacing="10", skip_timesteps=6,
                              resample_steps=1, seed=0, samples=1)
    steps = 10 - 6
    assert [u[0] for u in comfy.utils.updates] == list(range(1, steps + 1))
    if method == "none":
        assert not built and not any(u[2] for u in comfy.utils.updates)
    else:
        assert len(built) == steps and all(u[2] for u in comfy.utils.updates)
