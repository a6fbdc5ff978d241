"""CLIP loading (core.encoders.clip): real tiny open_clip models through real files, safe archives, clear errors.

Pretrained weights cannot be downloaded here, so the models are tiny random open_clip
architectures (core.encoders.clip.tiny_open_clip_config) saved in each supported format and loaded back
strictly. OpenAI's TorchScript archives are imitated by tracing such a model with OpenAI's extra
buffers and fp16 weights, the way OpenAI published theirs.
"""

import copy
import json
import os
import pickle
import warnings
import zipfile

import open_clip
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import assert_close, fixture_path, float32_atol, load_json
from core.encoders.clip import (ClipEnsemble, ClipLoadError, ClipModel, MissingClipWeightsError, MODEL_FOLDER,
                       OPENAI_ARCHIVE_METADATA, load_clip, read_clip_weights, read_torchscript_weights,
                       resolve_architecture, tiny_open_clip_config)
from core.diffuseit.clip_direction import template_prompts

GLUE_CFG = load_json("diffuseit", "fixtures.json")["clip_glue"]


def tiny_dir(tmp_path, vision="vit", name=None):
    folder = tmp_path / (name or f"tiny-{vision}")
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": tiny_open_clip_config(vision)}))
    return folder


def same_weights(a: ClipModel, b: ClipModel, cast=lambda t: t):
    sa, sb = a.module.state_dict(), b.module.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(cast(sa[k]), sb[k]), k


def same_outputs(a: ClipModel, b: ClipModel):
    x = torch.rand(2, 3, a.image_size, a.image_size, generator=torch.Generator().manual_seed(0))
    prompts = template_prompts(GLUE_CFG["source_text"])[:3]
    assert torch.equal(a.encode_image(a.normalize(x)), b.encode_image(b.normalize(x)))
    assert torch.equal(a.encode_text(prompts), b.encode_text(prompts))


def openai_style_archive(model: ClipModel, path):
    """Trace ``model`` as OpenAI did: metadata buffers, fp16 weights, a TorchScript archive."""
    module = copy.deepcopy(model.module).eval()
    for key in OPENAI_ARCHIVE_METADATA:
        module.__dict__.pop(key, None)  # open_clip keeps two of them as plain ints
        module.register_buffer(key, torch.tensor(1))
    example = (torch.zeros(1, 3, model.image_size, model.image_size), model.tokenize(["a"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, example, check_trace=False).half()
        traced.save(str(path))


@pytest.mark.parametrize("vision", ["vit", "resnet"])
def test_safetensors_round_trip(tmp_path, vision):
    folder = tiny_dir(tmp_path, vision)
    random = load_clip(folder, pretrained=None)
    assert random.image_size == tiny_open_clip_config(vision)["vision_cfg"]["image_size"]
    assert (random.mean, random.std) == (open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
    file = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in random.module.state_dict().items()}, str(file))
    loaded = load_clip(folder, pretrained=file)
    same_weights(random, loaded)
    same_outputs(random, loaded)
    assert not any(p.requires_grad for p in loaded.module.parameters()) and not loaded.module.training


def test_torch_state_dicts_and_training_checkpoints(tmp_path):
    folder = tiny_dir(tmp_path)
    random = load_clip(str(folder), pretrained=None)
    sd = random.module.state_dict()
    torch.save(sd, tmp_path / "plain.bin")
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in sd.items()}}, tmp_path / "epoch_3.pt")
    for name in ("plain.bin", "epoch_3.pt"):  # also found by file name inside models_dir
        same_weights(random, load_clip(f"local-dir:{folder}", pretrained=name, models_dir=tmp_path))


def test_dtype_and_float32_embeddings(tmp_path):
    model = load_clip(tiny_dir(tmp_path), pretrained=None, dtype=torch.float64)
    assert model.dtype == torch.float64
    x = model.normalize(torch.rand(1, 3, model.image_size, model.image_size))
    assert model.encode_image(x).dtype == torch.float32 and model.encode_text(["a lion"]).dtype == torch.float32


@pytest.mark.parametrize("vision", ["vit", "resnet"])
def test_gradient_checkpointing_same_gradient_fewer_saved_tensors(tmp_path, vision):
    model = load_clip(tiny_dir(tmp_path, vision), pretrained=None)
    x = torch.rand(2, 3, model.image_size, model.image_size, generator=torch.Generator().manual_seed(0))

    def run():
        pixels = x.clone().requires_grad_(True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            emb = model.encode_image(model.normalize(pixels))
        (grad,) = torch.autograd.grad(emb.square().sum(), pixels)
        return emb.detach(), grad, len(saved)

    emb_plain, grad_plain, saved_plain = run()
    model.gradient_checkpointing = True
    emb_ckpt, grad_ckpt, saved_ckpt = run()
    # Checkpointed vs plain: the same ops recomputed (measured identical here), defined to a few float32
    # eps of each tensor's scale on other kernels: 16 eps x max|ref| (the resnet gradient's scale is
    # ~1.6e-5, so a fixed atol would not see it at all). A tower recomputed on other pixels is O(1) off.
    assert_close(emb_ckpt, emb_plain, float32_atol(emb_plain, 16), rtol=0, what="checkpointed embedding")
    assert_close(grad_ckpt, grad_plain, float32_atol(grad_plain, 16), rtol=0, what="checkpointed gradient")
    assert saved_ckpt * 4 < saved_plain, (saved_ckpt, saved_plain)  # the tower's activations are not kept
    with torch.no_grad():  # no graph, nothing to checkpoint (no-grad attention may take a fused kernel)
        # fused vs unfused attention: measured up to 1.8 eps x max|ref|; bound 32 eps
        assert_close(model.encode_image(model.normalize(x)), emb_plain, float32_atol(emb_plain, 32), rtol=0,
                     what="no-grad embedding")


def test_openai_torchscript_archive_is_read_without_running_it(tmp_path):
    folder = tiny_dir(tmp_path, "resnet")
    random = load_clip(folder, pretrained=None)
    archive = tmp_path / "RN50.pt"
    openai_style_archive(random, archive)
    sd = read_torchscript_weights(archive)
    assert set(sd) == set(random.module.state_dict()) | set(OPENAI_ARCHIVE_METADATA) | {"attn_mask"}
    assert sd["visual.conv1.weight"].dtype == torch.float16
    weights, is_openai = read_clip_weights(archive)
    assert is_openai and not set(OPENAI_ARCHIVE_METADATA) & set(weights)
    loaded = load_clip(folder, pretrained=archive)
    same_weights(random, loaded, cast=lambda t: t.half().to(t.dtype))
    # OpenAI weights were trained with QuickGELU: switched on automatically for their archives
    assert isinstance(loaded.module.transformer.resblocks[0].mlp.gelu, open_clip.model.QuickGELU)
    assert not isinstance(random.module.transformer.resblocks[0].mlp.gelu, open_clip.model.QuickGELU)


def test_archive_plain_tensor_attributes_are_not_weights(tmp_path):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)
            self.register_buffer("buf", torch.arange(3.0))
            self.plain = torch.ones(4)  # an attribute, neither parameter nor buffer

        def forward(self, x):
            return self.lin(x) + self.buf.sum() + self.plain.sum()

    net = Net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(net).save(str(tmp_path / "net.pt"))
    sd = read_torchscript_weights(tmp_path / "net.pt")
    assert sd.keys() == net.state_dict().keys()
    assert all(torch.equal(sd[k], v) for k, v in net.state_dict().items())


def test_archive_with_foreign_code_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps(Evil(), protocol=2))
        z.writestr("evil/constants.pkl", pickle.dumps((), protocol=2))
        z.writestr("evil/version", "3\n")
    with pytest.raises(ClipLoadError, match="refus"):
        read_clip_weights(path)
    assert not marker.exists()


def test_pickled_objects_in_plain_files_are_refused(tmp_path):
    torch.save({"weights": torch.zeros(1), "obj": ClipLoadError("x")}, tmp_path / "obj.pt")
    with pytest.raises(ClipLoadError, match="refused to load"):
        read_clip_weights(tmp_path / "obj.pt")


def test_missing_openai_file_names_folder_file_and_url(tmp_path):
    with pytest.raises(MissingClipWeightsError) as err:
        load_clip("RN50", "openai", models_dir=tmp_path)
    message = str(err.value)
    url = open_clip.get_pretrained_url("RN50", "openai")
    assert str(tmp_path) in message and "'RN50.pt'" in message and url in message
    assert os.path.basename(url) == "RN50.pt"
    with pytest.raises(MissingClipWeightsError) as err:  # OpenAI's spelling, and no folder given
        load_clip("ViT-B/16", "openai")
    assert MODEL_FOLDER in str(err.value) and open_clip.get_pretrained_url("ViT-B-16", "openai") in str(err.value)


def test_missing_named_file(tmp_path):
    with pytest.raises(MissingClipWeightsError) as err:
        load_clip("ViT-B-16", "my_finetune.safetensors", models_dir=tmp_path)
    message = str(err.value)
    assert "'my_finetune.safetensors'" in message and str(tmp_path) in message
    assert open_clip.get_pretrained_url("ViT-B-16", "openai") in message


def test_unknown_architecture(tmp_path):
    with pytest.raises(ClipLoadError) as err:
        load_clip("ViT-B-61", pretrained=None)
    assert "'ViT-B-61'" in str(err.value) and "ViT-B-16" in str(err.value)
    with pytest.raises(ClipLoadError, match="open_clip_config.json"):
        load_clip(tmp_path, pretrained=None)
    (tmp_path / "w.safetensors").write_bytes(b"")
    with pytest.raises(ClipLoadError, match="cannot tell the CLIP architecture"):
        load_clip(tmp_path / "w.safetensors")


def test_architecture_names():
    assert resolve_architecture("ViT-B/16") == "ViT-B-16"
    assert resolve_architecture("ViT-L-14-336px") == "ViT-L-14-336"  # OpenAI's file stem


def test_wrong_files(tmp_path):
    vit = load_clip(tiny_dir(tmp_path, "vit"), pretrained=None)
    save_file({k: v.contiguous() for k, v in vit.module.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    with pytest.raises(ClipLoadError) as err:
        load_clip(tiny_dir(tmp_path, "resnet"), pretrained=tmp_path / "vit.safetensors")
    assert "does not fit open_clip architecture" in str(err.value) and "missing" in str(err.value)
    dino = load_file(fixture_path("diffuseit", "clip_glue.safetensors"))  # tensors, but not a CLIP
    save_file({"blocks.0.attn.qkv.weight": dino["RN50.stub.img_w"]}, str(tmp_path / "dino.safetensors"))
    with pytest.raises(ClipLoadError, match="does not look like a CLIP checkpoint"):
        load_clip(tiny_dir(tmp_path, "vit", "again"), pretrained=tmp_path / "dino.safetensors")
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    with pytest.raises(ClipLoadError, match=r"notes.pt' is a text file \(it starts with 'not a checkpoint'\)"):
        load_clip(tiny_dir(tmp_path, "vit", "third"), pretrained=tmp_path / "notes.pt")


def test_real_tokenizer_gives_upstream_tokens(tmp_path):
    glue = load_file(fixture_path("diffuseit", "clip_glue.safetensors"))
    model = load_clip(tiny_dir(tmp_path), pretrained=None)
    tokens = model.tokenize(template_prompts(GLUE_CFG["source_text"]))
    assert torch.equal(tokens.to(torch.int32), glue["tokens.source"])


def test_wrapping_any_module_and_ensembles():
    class Stub(torch.nn.Module):
        def encode_image(self, x):
            return x.mean((2, 3))

        def encode_text(self, tok):
            return tok[:, :3].float()

    model = ClipModel(Stub(), 8, mean=(0.5, 0.25, 0.0), std=(0.5, 0.5, 1.0), name="stub")
    x = torch.ones(1, 3, 8, 8)
    assert torch.equal(model.normalize(x), torch.tensor([1.0, 1.5, 1.0]).view(1, 3, 1, 1).expand(1, 3, 8, 8))
    assert torch.equal(model.encode_image(x), torch.ones(1, 3))
    assert model.encode_text(["a"]).shape == (1, 3) and model.device == torch.device("cpu")
    assert isinstance(ClipEnsemble([model, model]), tuple)
    with pytest.raises(TypeError):
        ClipEnsemble([Stub()])
    with pytest.raises(TypeError):
        ClipModel(torch.nn.Linear(2, 2), 8)
