"""Apply Guidance to Model (stub ComfyUI): decoders that do not match the model are refused naming both."""

import os

import pytest

from core.tiny_sd import write_tiny_vae_approx


class SD15Format:  # the two fields of ComfyUI's latent format the node reads
    latent_channels = 4
    taesd_decoder_name = "taesd_decoder"


class FakeModel:
    def get_model_object(self, name):
        assert name == "latent_format"
        return SD15Format()


class FakeVAE:
    latent_channels = 16


@pytest.fixture(scope="module")
def decoders(pack):
    module, models = pack
    write_tiny_vae_approx(os.path.join(models, "vae_approx"), force=True)
    import folder_paths

    folder_paths.add_model_folder_path("vae_approx", os.path.join(models, "vae_approx"))
    from diffuseit_pack.nodes import model_guidance
    return model_guidance


def test_a_decoder_of_another_family_is_refused_naming_both(decoders):
    with pytest.raises(ValueError, match=r"decoder taesdxl_decoder\.safetensors is for another model family than this "
                                         r"model \(SD15Format, whose TAESD is taesd_decoder\.\*\)"):
        decoders._decoder("taesdxl_decoder.safetensors", None, SD15Format())


def test_a_16_channel_decoder_on_a_4_channel_model_is_refused(decoders):
    with pytest.raises(ValueError, match=r"taef1_decoder\.safetensors is for another model family"):
        decoders._decoder("taef1_decoder.safetensors", None, SD15Format())
    with pytest.raises(ValueError, match=r"the VAE takes 16-channel latents but the model makes 4-channel latents"):
        decoders._decoder(decoders.USE_VAE, FakeVAE(), SD15Format())


def test_the_matching_taesd_decodes_the_models_latents(decoders):
    import torch

    decode, module, patcher = decoders._decoder("taesd_decoder.safetensors", None, SD15Format())
    with torch.no_grad():
        image = decode(torch.zeros(1, 4, 8, 8))
    assert image.shape == (1, 3, 64, 64) and module.latent_channels == 4 and patcher is not None


def test_the_node_returns_a_clone_and_leaves_the_input_model_alone(decoders):
    from diffuseit_pack.core.diffusion.range import RangeLoss
    from diffuseit_pack.nodes.types import NodeGuidance

    class Patcher(FakeModel):
        def __init__(self):
            self.model_options, self.additional = {}, {}

        def clone(self):
            return Patcher()

        def set_model_sampler_post_cfg_function(self, fn):
            self.model_options.setdefault("sampler_post_cfg_function", []).append(fn)

        def set_additional_models(self, key, models):
            self.additional[key] = models

    model = Patcher()
    out = decoders.ApplyGuidanceToModel.execute(model, NodeGuidance(terms=(RangeLoss(50.0),)),
                                                decoder="taesd_decoder.safetensors", strength=0.5)
    guided = out.args[0] if hasattr(out, "args") else out.result[0]
    assert guided is not model and model.model_options == {} and model.additional == {}
    assert len(guided.model_options["sampler_post_cfg_function"]) == 1
    assert list(guided.additional) == [decoders.ADDITIONAL_MODELS_KEY]
    off = decoders.ApplyGuidanceToModel.execute(model, NodeGuidance(terms=(RangeLoss(50.0),)),
                                                decoder="taesd_decoder.safetensors", strength=0.0)
    off = off.args[0] if hasattr(off, "args") else off.result[0]
    assert off.model_options == {}  # strength 0: no hook at all, sampling is untouched
