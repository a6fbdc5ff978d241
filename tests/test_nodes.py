"""The ComfyUI entry point registers valid node definitions; LoadDDPM loads through a stub ComfyUI."""

import asyncio
import shutil
import sys

import pytest
import torch

from conftest import ROOT, assert_close, fixture_path, float32_atol, load_json


def node_list(module):
    ext = asyncio.run(module.comfy_entrypoint())
    asyncio.run(ext.on_load())
    return asyncio.run(ext.get_node_list())


def test_pack_import_does_not_need_comfy():
    import subprocess
    code = "import core, sys; assert 'comfy' not in sys.modules and 'folder_paths' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_entrypoint_registers_valid_nodes(pack):
    module, _ = pack
    nodes = node_list(module)
    ids = [n.define_schema().node_id for n in nodes]
    assert "LoadDDPM" in ids and len(ids) == len(set(ids))
    for node in nodes:
        schema = node.define_schema()
        assert schema.category.startswith("DiffuseIT-Blended/"), schema.node_id
        assert schema.description, schema.node_id
        for inp in schema.inputs:
            assert inp.tooltip, f"{schema.node_id}.{inp.id} has no tooltip"
        assert schema.outputs


def test_model_folders_registered_with_extensions(pack):
    import folder_paths
    paths, exts = folder_paths.folder_names_and_paths["guided_diffusion"]
    assert any(p.endswith("guided_diffusion") for p in paths) and {".pt", ".safetensors"} <= exts


def test_load_ddpm_node(pack):
    module, models = pack
    folder = models / "guided_diffusion"
    folder.mkdir(exist_ok=True)
    shutil.copy(fixture_path("guided_diffusion", "tiny_unet.safetensors"), folder / "tiny.safetensors")
    from diffuseit_pack.nodes.loaders import LoadDDPM
    schema = LoadDDPM.define_schema()
    assert "tiny.safetensors" in schema.inputs[0].options
    heads = load_json("guided_diffusion", "tiny_unet_config.json")["create_model_kwargs"]["num_head_channels"]
    with torch.inference_mode():  # ComfyUI runs every node in inference mode
        out = LoadDDPM.execute(ckpt_name="tiny.safetensors", dtype="auto", overrides=f"num_head_channels={heads}")
    managed = out.result[0]
    assert managed.value.config.num_head_channels == heads
    assert managed.patcher.model is managed.value.unet
    assert not any(p.is_inference() for p in managed.module.parameters())


def test_load_ddpm_node_missing_file_message(pack):
    from diffuseit_pack.nodes.loaders import LoadDDPM
    from diffuseit_pack.core.diffusion.checkpoints import MissingWeightsError
    with pytest.raises(MissingWeightsError, match="256x256_diffusion_uncond.pt"):
        LoadDDPM.execute(ckpt_name="256x256_diffusion_uncond.pt", dtype="fp32", overrides="")
    with pytest.raises(ValueError, match="name=value"):
        LoadDDPM.execute(ckpt_name="x.pt", dtype="fp32", overrides="num_head_channels")


def _tiny_ddpm_node_output(models):
    folder = models / "guided_diffusion"
    folder.mkdir(exist_ok=True)
    shutil.copy(fixture_path("guided_diffusion", "tiny_unet.safetensors"), folder / "tiny.safetensors")
    from diffuseit_pack.nodes.loaders import LoadDDPM
    kw = load_json("guided_diffusion", "tiny_unet_config.json")["create_model_kwargs"]
    with torch.inference_mode():
        return LoadDDPM.execute(ckpt_name="tiny.safetensors", dtype="fp32",
                                overrides=f"num_head_channels={kw['num_head_channels']}, image_size={kw['image_size']}").result[0]


def test_guided_sampler_node_runs_in_inference_mode_with_progress(pack):
    _, models = pack
    ddpm = _tiny_ddpm_node_output(models)
    from diffuseit_pack.nodes.sampling import GuidedSampler
    import comfy.utils
    comfy.utils.updates.clear()
    image = torch.rand(1, 40, 48, 3)
    kwargs = dict(ddpm=ddpm, image=image, respacing="10", skip_timesteps=5, resample_steps=2, sampler="ddpm",
                  seed=11, samples=2, chunk_size=1)
    with torch.inference_mode():
        out = GuidedSampler.execute(**kwargs).result[0]
        again = GuidedSampler.execute(**kwargs).result[0]
    size = ddpm.value.image_size
    assert out.shape == (2, size, size, 3) and 0 <= out.min() and out.max() <= 1
    assert torch.equal(out, again)
    steps = (10 - 5 - 1 + 2) * 2
    assert [u[0] for u in comfy.utils.updates[:steps]] == list(range(1, steps + 1))
    assert all(u[2] for u in comfy.utils.updates[:steps])  # every step carries a preview


def test_guided_sampler_cancel(pack):
    _, models = pack
    ddpm = _tiny_ddpm_node_output(models)
    from diffuseit_pack.nodes.sampling import GuidedSampler
    import comfy.model_management as mm
    mm.interrupt_processing = True
    with pytest.raises(mm.InterruptProcessingException):
        with torch.inference_mode():
            GuidedSampler.execute(ddpm=ddpm, image=torch.rand(1, 32, 32, 3), respacing="10", skip_timesteps=5,
                                  resample_steps=1, seed=0, samples=1)
    assert not mm.interrupt_processing


def _tiny_models_folder(models):
    """Tiny DINO (fixture, with its head-count sidecar) and a tiny open_clip folder in the pack's folders."""
    import json as _json
    from core.encoders.clip import tiny_open_clip_config
    dino = models / "dino"
    dino.mkdir(exist_ok=True)
    shutil.copy(fixture_path("diffuseit", "tiny_dino_vit.safetensors"), dino / "tiny_dino_vit.safetensors")
    shutil.copy(fixture_path("diffuseit", "tiny_dino_vit_config.json"), dino / "tiny_dino_vit_config.json")
    clip = models / "clip_guidance" / "tiny-clip"
    clip.mkdir(parents=True, exist_ok=True)
    (clip / "open_clip_config.json").write_text(_json.dumps({"model_cfg": tiny_open_clip_config("vit")}))
    from safetensors.torch import save_file
    from core.encoders.clip import load_clip
    torch.manual_seed(0)
    tiny = load_clip(f"local-dir:{clip}", pretrained=None)
    save_file({k: v.contiguous() for k, v in tiny.module.state_dict().items()}, str(clip / "open_clip_model.safetensors"))


def _run(node, **kwargs):
    with torch.inference_mode():
        return node.execute(**kwargs).result


def test_diffuseit_text_and_image_graphs(pack):
    _, models = pack
    ddpm = _tiny_ddpm_node_output(models)
    _tiny_models_folder(models)
    from diffuseit_pack.nodes import guidance as g
    from diffuseit_pack.nodes.loaders import LoadCLIPGuidance, LoadDINO
    from diffuseit_pack.nodes.sampling import GuidedSampler
    (dino,) = _run(LoadDINO, dino_name="tiny_dino_vit.safetensors", antialias=False)
    (clip,) = _run(LoadCLIPGuidance, models="tiny-clip", dtype="auto")
    (chain,) = _run(g.DINOStructureLossNode, dino=dino, contrast_schedule="regularize_content")
    (chain,) = _run(g.SemanticDivergenceNode, dino=dino, diff_iter=2, guidance=chain)
    (chain,) = _run(g.CLIPDirectionalLossNode, clip=clip, source_text="Lion", target_text="Black Leopard", ncuts=2,
                    guidance=chain)
    (text_chain,) = _run(g.RangeLossNode, weight=200.0, guidance=chain)
    assert [t.name for t in text_chain.terms] == ["dino_structure", "semantic_divergence", "clip_directional", "range"]
    assert len(text_chain.models) == 2  # DINO once, CLIP once
    image = torch.rand(1, 24, 40, 3)
    kwargs = dict(ddpm=ddpm, image=image, respacing="10", skip_timesteps=6, resample_steps=2, seed=5, samples=2,
                  range_restart=True, max_restarts=1)
    (out,) = _run(GuidedSampler, guidance=text_chain, **kwargs)
    (again,) = _run(GuidedSampler, guidance=text_chain, **kwargs)
    assert out.shape == (2, 32, 32, 3) and torch.equal(out, again)
    (style_chain,) = _run(g.DINOStyleLossNode, dino=dino, style_image=torch.rand(1, 50, 30, 3),
                          guidance=_run(g.DINOStructureLossNode, dino=dino)[0])
    (styled,) = _run(GuidedSampler, guidance=style_chain, **kwargs)
    assert styled.shape == out.shape and not torch.equal(styled, out)
    with pytest.raises(ValueError, match="target_text"):
        _run(g.CLIPDirectionalLossNode, clip=clip, source_text="Lion", target_text=" ")


def test_gradient_checkpointing_inputs_change_memory_not_results(pack):
    _, models = pack
    _tiny_models_folder(models)
    from diffuseit_pack.nodes import guidance as g
    from diffuseit_pack.nodes.loaders import LoadCLIPGuidance, LoadDDPM
    from diffuseit_pack.nodes.sampling import GuidedSampler
    plain = _tiny_ddpm_node_output(models)
    kw = load_json("guided_diffusion", "tiny_unet_config.json")["create_model_kwargs"]
    (ckpt,) = _run(LoadDDPM, ckpt_name="tiny.safetensors", dtype="fp32", gradient_checkpointing=True,
                   overrides=f"num_head_channels={kw['num_head_channels']}, image_size={kw['image_size']}")
    assert ckpt.value.unet.gradient_checkpointing and not plain.value.unet.gradient_checkpointing
    outs = []
    for ddpm, flag in ((plain, False), (ckpt, True)):
        (clip,) = _run(LoadCLIPGuidance, models="tiny-clip", dtype="fp32", gradient_checkpointing=flag)
        assert all(m.gradient_checkpointing == flag for m in clip.value)
        (chain,) = _run(g.CLIPDirectionalLossNode, clip=clip, source_text="Lion", target_text="Black Leopard", ncuts=2)
        (chain,) = _run(g.RangeLossNode, weight=50.0, guidance=chain)
        outs.append(_run(GuidedSampler, ddpm=ddpm, image=torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(0)),
                         guidance=chain, respacing="10", skip_timesteps=6, resample_steps=1, seed=3, samples=1)[0])
    # checkpointed vs plain UNet and CLIP towers: the same ops recomputed, measured identical on 1 and 2
    # threads; bound 128 float32 eps x max|ref| (1.5e-5 on these [0, 1] images) for other kernels' round-off
    assert_close(outs[1], outs[0], float32_atol(outs[0], 128), rtol=0, what="checkpointed vs plain")


def test_blended_graph_keeps_background_and_ranks(pack):
    _, models = pack
    ddpm = _tiny_ddpm_node_output(models)
    _tiny_models_folder(models)
    from diffuseit_pack.nodes import guidance as g
    from diffuseit_pack.nodes.blending import BackgroundBlend
    from diffuseit_pack.nodes.loaders import LoadCLIPGuidance
    from diffuseit_pack.nodes.ranking import CLIPRank
    from diffuseit_pack.nodes.sampling import GuidedSampler
    import json as _json
    (clip,) = _run(LoadCLIPGuidance, models="tiny-clip", dtype="fp32")
    (chain,) = _run(g.MaskedCLIPLossNode, clip=clip, prompt="a red ball", n_cuts=3)
    (chain,) = _run(g.RangeLossNode, weight=50.0, guidance=chain)
    image = torch.rand(1, 48, 64, 3)
    mask = torch.zeros(1, 48, 64)
    mask[:, 10:30, 20:40] = 1
    (blend,) = _run(BackgroundBlend, mask=mask)
    (out,) = _run(GuidedSampler, ddpm=ddpm, image=image, guidance=chain, blend=blend, respacing="10",
                  skip_timesteps=5, resample_steps=1, seed=1, samples=3)
    assert out.shape == (3, 48, 64, 3)
    keep = (mask == 0)[..., None].expand_as(out)
    assert torch.equal(out[keep], image.expand_as(out)[keep])  # outside the mask: the input, byte for byte
    ranked, best, scores = _run(CLIPRank, images=out, clip=clip, prompt="a red ball", top_k=2, mask=mask)
    rows = _json.loads(scores)  # best first: batch index, score and every component
    values = [row["score"] for row in rows]
    assert len(values) == 3 and values == sorted(values)
    assert values == [row["masked_prompt"] for row in rows]  # the paper's criteria: the masked distance
    assert sorted(row["index"] for row in rows) == [0, 1, 2]
    assert all(torch.equal(ranked[k], out[row["index"]]) for k, row in enumerate(rows))
    assert best.shape == (2, 48, 64, 3) and torch.equal(best, ranked[:2])
    with pytest.raises(ValueError, match="(?i)empty"):
        _run(GuidedSampler, ddpm=ddpm, image=image, guidance=chain,
             blend=_run(BackgroundBlend, mask=torch.zeros(1, 64, 64))[0], respacing="10", skip_timesteps=5,
             resample_steps=1)


def test_color_match_node_moves_colours_to_the_reference(pack):
    from diffuseit_pack.nodes.postprocess import ColorMatch
    gen = torch.Generator().manual_seed(0)
    image = 0.2 + 0.3 * torch.rand(2, 24, 40, 3, generator=gen)  # dark, low contrast
    image[1, ..., 0] += 0.2  # the second image reddish: each image is matched on its own
    reference = torch.stack([0.6 + 0.3 * torch.rand(50, 30, generator=gen), 0.3 + 0.1 * torch.rand(50, 30, generator=gen),
                             0.5 + 0.4 * torch.rand(50, 30, generator=gen)], -1)[None]  # another size
    (out,) = _run(ColorMatch, image=image, reference=torch.cat([reference, torch.zeros_like(reference)]))
    assert out.shape == image.shape and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    ref_mean, ref_std = reference.mean((0, 1, 2)), reference.std((0, 1, 2))
    for b in range(2):
        assert torch.allclose(out[b].mean((0, 1)), ref_mean, atol=0.01), b  # only the first reference image counts
        assert torch.allclose(out[b].std((0, 1)), ref_std, atol=0.01), b
        assert (image[b].mean((0, 1)) - ref_mean).abs().max() > 0.1  # it really moved
    (same,) = _run(ColorMatch, image=reference, reference=reference)
    assert torch.allclose(same, reference, atol=1e-4)  # matching an image to itself changes nothing
