"""DINO ViT loading and DiffuseIT feature extraction against the official-code fixtures.

Every input, configuration and expected value comes from ``tests/fixtures/diffuseit``
(produced by cyclomon/DiffuseIT + facebookresearch/dino, see the README there).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer

from conftest import readme_tolerance_row
from core.encoders.dino import (DINO_ARCHS, DINOCheckpointError, DINOCheckpointNotFoundError,
                       DINOExtractor, build_dino_vit, dino_checkpoint_url, infer_dino_config,
                       load_dino_extractor, load_dino_state_dict, load_dino_vit, resolve_arch)

FIXTURES = Path(__file__).parent / "fixtures" / "diffuseit"
TINY = FIXTURES / "tiny_dino_vit.safetensors"

# Tolerances exist only in the fixture README ("Tolerances a re-implementation should meet").
(PREPROCESS_ATOL,) = readme_tolerance_row("diffuseit", "preprocessing")              # vit_input.*, preprocess_256.*
FEATURE_ATOL, FEATURE_RTOL = readme_tolerance_row("diffuseit", "`qkv_layer11`")    # + keys.*, cls.*, dino_forward.*


def _json(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


def _assert_feature_close(actual: torch.Tensor, ref: torch.Tensor) -> float:
    err = (actual - ref).abs().max().item()
    assert err <= FEATURE_ATOL + FEATURE_RTOL * ref.abs().max().item(), err
    return err


@pytest.fixture(scope="module")
def tiny_config() -> dict:
    return _json("tiny_dino_vit_config.json")


@pytest.fixture(scope="module")
def fx() -> dict:
    return load_file(str(FIXTURES / "vit_losses.safetensors"))


@pytest.fixture(scope="module")
def extractor(tiny_config: dict) -> DINOExtractor:
    layer = _json("fixtures.json")["vit_losses"]["layer"]
    return load_dino_extractor(TINY, num_heads=tiny_config["num_heads"], layer=layer,
                               antialias=_json("fixtures.json")["vit_losses"]["resize_antialias"])


# ----------------------------------------------------------------------------- loading


def test_tiny_checkpoint_loads_into_plain_timm_strictly(tiny_config: dict) -> None:
    sd = load_dino_state_dict(TINY)
    assert sorted(sd) == sorted(tiny_config["keys"])
    model = VisionTransformer(img_size=tiny_config["img_size"], patch_size=tiny_config["patch_size"],
                              embed_dim=tiny_config["embed_dim"], depth=tiny_config["depth"],
                              num_heads=tiny_config["num_heads"], mlp_ratio=tiny_config["mlp_ratio"],
                              qkv_bias=tiny_config["qkv_bias"], num_classes=0)
    model.load_state_dict(sd, strict=True)
    assert sum(p.numel() for p in model.parameters()) == tiny_config["num_parameters"]


def test_config_inferred_from_shapes(tiny_config: dict) -> None:
    cfg = infer_dino_config(load_dino_state_dict(TINY), num_heads=tiny_config["num_heads"])
    for field in ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias", "img_size"):
        assert getattr(cfg, field) == tiny_config[field], field


def test_num_heads_read_from_sidecar_config(tiny_config: dict) -> None:
    # tiny_dino_vit_config.json sits next to the weights; heads are invisible in the shapes
    model = load_dino_vit(TINY)
    assert model.blocks[0].attn.num_heads == tiny_config["num_heads"]
    assert not any(p.requires_grad for p in model.parameters()) and not model.training


def test_unknown_head_count_is_an_actionable_error() -> None:
    with pytest.raises(DINOCheckpointError, match="num_heads"):
        load_dino_vit(load_dino_state_dict(TINY))


def test_real_vitb8_manifest_loads_strictly_on_meta() -> None:
    manifest = _json("dino_vitb8_manifest.json")
    sd = {k: torch.empty(shape, device="meta") for k, shape in manifest["keys"].items()}
    assert len(sd) == manifest["num_keys"]
    built = build_dino_vit("vit_base_patch8_224", device="meta").state_dict()
    assert {k: list(v.shape) for k, v in built.items()} == manifest["keys"]
    for arch in (None, "vit_base_patch8_224", "dino_vitb8", "vit_base_patch8_224.dino"):
        model = load_dino_vit(sd, arch, device="meta")
        assert model.cls_token.is_meta
        assert {k: list(v.shape) for k, v in model.state_dict().items()} == manifest["keys"]
    assert dino_checkpoint_url() == manifest["url"]
    assert dino_checkpoint_url("dino_vitbase8_pretrain") == manifest["url"]


def test_other_dino_sizes_share_the_layout() -> None:
    manifest = _json("dino_vitb8_manifest.json")
    for arch, (cfg, stem) in DINO_ARCHS.items():
        assert resolve_arch(stem) == arch
        sd = build_dino_vit(arch, device="meta").state_dict()
        assert set(sd) == set(manifest["keys"])
        assert infer_dino_config(sd) == cfg


def test_wrapped_checkpoints_and_pth(tmp_path: Path, extractor: DINOExtractor, fx: dict,
                                     tiny_config: dict) -> None:
    sd = load_dino_state_dict(TINY)
    ref = extractor(fx["image.source"])
    head = {"head.mlp.0.weight": torch.zeros(2, tiny_config["embed_dim"])}  # DINO projection head
    variants = {
        "plain.pth": sd,
        "teacher.pth": {"teacher": {**{f"module.backbone.{k}": v for k, v in sd.items()},
                                    **{f"module.{k}": v for k, v in head.items()}}},
        "model.pt": {"model": {f"backbone.{k}": v for k, v in sd.items()}},
        "state_dict.pth": {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
    }
    for name, obj in variants.items():
        torch.save(obj, tmp_path / name)
        ext = load_dino_extractor(tmp_path / name, num_heads=tiny_config["num_heads"])
        out = ext(fx["image.source"])
        assert torch.equal(out.keys, ref.keys) and torch.equal(out.cls, ref.cls), name


def test_prefixes_not_stripped_from_plain_state_dicts(tiny_config: dict) -> None:
    sd = {f"module.{k}": v for k, v in load_dino_state_dict(TINY).items()}
    with pytest.raises(DINOCheckpointError, match="not a DINO ViT state dict"):
        load_dino_vit(sd, num_heads=tiny_config["num_heads"])


def test_missing_file_message(tmp_path: Path) -> None:
    manifest = _json("dino_vitb8_manifest.json")
    missing = tmp_path / "dino_vitbase8_pretrain.pth"
    with pytest.raises(DINOCheckpointNotFoundError) as info:
        load_dino_extractor(missing)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ValueError)
    msg = str(info.value)
    assert str(missing) in msg and "models/dino" in msg and manifest["url"] in msg


def test_wrong_content_message(tmp_path: Path) -> None:
    unet_like = {"input_blocks.0.0.weight": torch.zeros(4, 3, 3, 3), "out.2.bias": torch.zeros(3)}
    path = tmp_path / "unet.safetensors"
    save_file(unet_like, str(path))
    with pytest.raises(DINOCheckpointError) as info:
        load_dino_vit(path)
    msg = str(info.value)
    assert "not a DINO ViT state dict" in msg and "cls_token" in msg
    assert "input_blocks.0.0.weight" in msg and "UNet" in msg


def test_arch_mismatch_message(tiny_config: dict) -> None:
    with pytest.raises(DINOCheckpointError, match=f"embed_dim {tiny_config['embed_dim']}"):
        load_dino_vit(TINY, "vit_base_patch8_224")


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_corrupt_file_message(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"dino_vitbase8_pretrain{suffix}"
    if suffix == ".pth":
        torch.save(load_dino_state_dict(TINY), path)
        data = path.read_bytes()
    else:
        data = TINY.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(DINOCheckpointError) as info:
        load_dino_vit(path)
    assert not isinstance(info.value, FileNotFoundError)
    msg = str(info.value)
    assert str(path) in msg and "corrupt" in msg and _json("dino_vitb8_manifest.json")["url"] in msg


def test_unsafe_pickle_refused(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pth"
    torch.save({"teacher": load_dino_state_dict(TINY), "args": argparse.Namespace(arch="vit")}, path)
    with pytest.raises(DINOCheckpointError, match="safe loading"):
        load_dino_vit(path)


# ----------------------------------------------------------------------------- features


def test_preprocessing_matches_upstream(extractor: DINOExtractor, fx: dict) -> None:
    for name in ("source", "output"):
        err = (extractor.preprocess(fx[f"image.{name}"]) - fx[f"vit_input.{name}"]).abs().max()
        assert err.item() <= PREPROCESS_ATOL
    pre = load_file(str(FIXTURES / "preprocess_256.safetensors"))
    for antialias in (False, True):
        ext = DINOExtractor(extractor.model, antialias=antialias)
        ref = pre[f"vit_input_antialias_{str(antialias).lower()}"]
        assert (ext.preprocess(pre["image256"]) - ref).abs().max().item() <= PREPROCESS_ATOL
    # the antialias switch really changes our resize, by upstream's amount (each variant is within
    # PREPROCESS_ATOL of its reference, so their gap is within 2 PREPROCESS_ATOL of the recorded gap)
    ours = [DINOExtractor(extractor.model, antialias=a).preprocess(pre["image256"]) for a in (False, True)]
    expected = _json("fixtures.json")["preprocess_256"]["max_abs_diff_between_antialias_variants"]
    assert abs((ours[0] - ours[1]).abs().max().item() - expected) <= 2 * PREPROCESS_ATOL < expected


def test_keys_and_cls_match_upstream(extractor: DINOExtractor, fx: dict) -> None:
    src = extractor(fx["image.source"], return_qkv=True)
    _assert_feature_close(src.qkv[0], fx["qkv_layer11.source"])
    for name in ("source", "output"):
        _assert_feature_close(extractor(fx[f"image.{name}"]).keys[0], fx[f"keys.{name}"])
    for name in ("source", "output", "prev", "target"):
        feats = extractor(fx[f"image.{name}"])
        assert feats.keys.shape[1] == _json("fixtures.json")["vit_losses"]["num_tokens"]
        _assert_feature_close(feats.cls[0], fx[f"cls.{name}"])
        dino_forward = extractor.model.forward_features(extractor.preprocess(fx[f"image.{name}"]))
        _assert_feature_close(dino_forward[0, 0], fx[f"dino_forward.{name}"])


def test_fused_attention_variant_also_matches(tiny_config: dict, fx: dict) -> None:
    fused = load_dino_extractor(TINY, num_heads=tiny_config["num_heads"], fused_attention=True)
    assert all(block.attn.fused_attn for block in fused.model.blocks)
    for name in ("source", "output"):
        feats = fused(fx[f"image.{name}"])
        _assert_feature_close(feats.keys[0], fx[f"keys.{name}"])
        _assert_feature_close(feats.cls[0], fx[f"cls.{name}"])


def test_cls_after_every_block(extractor: DINOExtractor, fx: dict) -> None:
    ref = fx["block_outputs_cls.source"]
    for layer in range(ref.shape[0]):
        ext = DINOExtractor(extractor.model, layer=layer)
        _assert_feature_close(ext(fx["image.source"]).cls[0], ref[layer])


def test_forward_stops_after_the_layer(extractor: DINOExtractor, fx: dict) -> None:
    calls: list[str] = []
    model = extractor.model
    hooks = [model.norm.register_forward_hook(lambda *a: calls.append("norm"))]
    hooks += [b.register_forward_hook(lambda *a, i=i: calls.append(f"block{i}"))
              for i, b in enumerate(model.blocks)]
    try:
        DINOExtractor(model, layer=5)(fx["image.source"])
        extractor(fx["image.source"])
    finally:
        for h in hooks:
            h.remove()
    depth = len(model.blocks)
    assert calls == [f"block{i}" for i in range(6)] + [f"block{i}" for i in range(depth)]


def test_batch_equals_single_runs_and_is_deterministic(extractor: DINOExtractor, fx: dict) -> None:
    names = ("source", "output")
    batch = extractor(torch.cat([fx[f"image.{n}"] for n in names]))
    for row, name in enumerate(names):
        single = extractor(fx[f"image.{name}"])
        _assert_feature_close(batch.keys[row], single.keys[0])
        _assert_feature_close(batch.cls[row], single.cls[0])
    again = extractor(torch.cat([fx[f"image.{n}"] for n in names]))
    assert torch.equal(batch.keys, again.keys) and torch.equal(batch.cls, again.cls)


def test_features_are_differentiable(extractor: DINOExtractor, fx: dict) -> None:
    x = fx["image.output"].clone().requires_grad_()
    feats = extractor(x)
    grad, = torch.autograd.grad(feats.keys.sum() + feats.cls.sum(), x)
    assert grad.abs().max().item() > 0
    assert all(p.grad is None for p in extractor.parameters())


def test_non_square_input_keeps_its_aspect(extractor: DINOExtractor, fx: dict) -> None:
    """Resize(224) keeps the aspect ratio (upstream's transform) and the ViT takes the patch grid it gives:
    64 x 56 -> 256 x 224 = 32 x 28 patches; 64 x 128 -> 224 x 448 = 28 x 56 patches; 64 x 60 -> 238 x 224,
    29 whole rows of patches (the last 6 pixel rows dropped, as DINO's patch convolution does)."""
    x = fx["image.source"]
    assert x.shape[-2:] == (64, 64)
    tokens = {hw: extractor(F.interpolate(x, size=hw, mode="bilinear", align_corners=False)).keys.shape[1]
              for hw in ((64, 56), (64, 128), (64, 60))}
    assert tokens == {(64, 56): 1 + 32 * 28, (64, 128): 1 + 28 * 56, (64, 60): 1 + 29 * 28}
    assert extractor(x).keys.shape[1] == 1 + 28 * 28
