"""DiffuseIT's text-guided CLIP loss against the upstream fixtures (diffuseit_spec §2.4, §3.1, §4.5, §6).

Upstream's CLIP models are replaced by the fixture's stub encoders (README: ``clip_glue``), so
these tests check everything around the encoders. Every input, config, expected value and
tolerance comes from ``tests/fixtures/diffuseit/`` (README.md for the tolerances).
"""

import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import assert_close, fixture_path, load_json, readme_tolerance_row
from core.encoders.clip import ClipEnsemble, ClipModel
from core.diffuseit.clip_direction import (CLIPDirectionalLoss, DROPPED_TEMPLATE, NUM_TEMPLATES, clip_loss, clip_text_loss,
                              eval_preprocess, image_embedding, imagenet_templates, mean_unit_embedding,
                              random_cuts, sample_cut_params, template_prompts)
from core.diffusion.guidance import StepContext
from core.diffusion.schedule import DiffusionSchedule, linear_betas

GLUE = load_file(fixture_path("diffuseit", "clip_glue.safetensors"))
CFG = load_json("diffuseit", "fixtures.json")["clip_glue"]
LOOP_CFG = load_json("diffuseit", "fixtures.json")["loop_text_guided"]
README = open(fixture_path("diffuseit", "README.md"), encoding="utf-8").read()


def readme_tolerances(row: str) -> list:
    """The numbers in the 'tolerance' cell of the README's tolerance table row starting with ``row``."""
    return readme_tolerance_row("diffuseit", row)


PREP_ATOL = readme_tolerances("preprocessing")[0]
EMB_ATOL, GRAD_REL = readme_tolerances("CLIP glue embeddings / losses")
CUTS_N, CUTS_SEED = (int(v) for v in re.search(r"ncuts=(\d+), torch seed (\d+)", README).groups())
COEF = [float(v) for v in re.search(r"normalize\(([\d.]+)\*E_T - ([\d.]+)\*E_S \+ ([\d.]+)\*E_I0\)",
                                    CFG["target_vector"]).groups()]


class StubCLIP(torch.nn.Module):
    """The fixture's stub encoders (README, ``clip_glue``), counting calls."""

    def __init__(self, prefix: str):
        super().__init__()
        for k in ("img_w", "img_b", "tok_table", "txt_w"):
            self.register_buffer(k, GLUE[f"{prefix}.stub.{k}"].clone())
        self.calls = {"image": 0, "text": 0}

    def encode_image(self, x):
        self.calls["image"] += 1
        return F.adaptive_avg_pool2d(x, 4).flatten(1) @ self.img_w.T + self.img_b

    def encode_text(self, tok):
        self.calls["text"] += 1
        mask = (tok != 0).float().unsqueeze(-1)
        table = self.tok_table[tok.long() % self.tok_table.shape[0]]
        return ((table * mask).sum(1) / mask.sum(1)) @ self.txt_w.T


def stub_ensemble() -> ClipEnsemble:
    return ClipEnsemble(ClipModel(StubCLIP(name), size, name=name) for name, size in CFG["models"].items())


def make_term(ncuts: int, lambda_clip: float = 1.0, **kw) -> CLIPDirectionalLoss:
    return CLIPDirectionalLoss(stub_ensemble(), CFG["source_text"], CFG["target_text"], lambda_clip=lambda_clip,
                               ncuts=ncuts, lambda_src=COEF[1], lambda_img=COEF[2], **kw)


def context(x: torch.Tensor, generator=None) -> StepContext:
    schedule = DiffusionSchedule.from_betas(linear_betas(10))
    t = torch.zeros(x.shape[0], dtype=torch.long)
    return StepContext(t_index=t, t=t, x_t=x, schedule=schedule, source=x, generators=generator)


def test_templates_are_open_clip_minus_one():
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    kept = [t("{}") for t in imagenet_templates()]
    assert len(kept) == NUM_TEMPLATES == CFG["num_templates"]
    assert [DROPPED_TEMPLATE] == CFG["templates_equal_open_clip_OPENAI_IMAGENET_TEMPLATES_minus"]
    assert kept == [t("{}") for t in OPENAI_IMAGENET_TEMPLATES if t("{}") != DROPPED_TEMPLATE]
    assert template_prompts("Lion")[0] == kept[0].format("Lion")


@pytest.mark.parametrize("which,text", [("source", CFG["source_text"]), ("target", CFG["target_text"])])
def test_tokens_equal_upstream(which, text):
    tokens = stub_ensemble()[0].tokenize(template_prompts(text))
    assert torch.equal(tokens.to(torch.int32), GLUE[f"tokens.{which}"])


def test_upstream_default_coefficients():
    term = CLIPDirectionalLoss(stub_ensemble(), "a", "b")
    assert COEF[0] == 1.0 and (term.lambda_src, term.lambda_img) == (COEF[1], COEF[2])
    assert term.lambda_clip == LOOP_CFG["config"]["clip_guidance_lambda"]


def test_text_image_embeddings_and_targets():
    prepared = make_term(0).prepare(GLUE["image.init"])
    for i, name in enumerate(CFG["models"]):
        assert prepared.source_text_embeddings[i].shape == (1, CFG["stub_dim"])
        assert_close(prepared.source_text_embeddings[i], GLUE[f"{name}.E_S"], EMB_ATOL, 0, f"{name}.E_S")
        assert_close(prepared.target_text_embeddings[i], GLUE[f"{name}.E_T"], EMB_ATOL, 0, f"{name}.E_T")
        assert_close(prepared.source_image_embeddings[i][0], GLUE[f"{name}.E_I0"], EMB_ATOL, 0, f"{name}.E_I0")
        assert_close(prepared.targets[i], GLUE[f"{name}.tgt"], EMB_ATOL, 0, f"{name}.tgt")


def test_eval_path_preprocessing():
    model = stub_ensemble()[0]
    assert model.image_size == CFG["models"]["RN50"]
    prep = eval_preprocess(model, 0.5 * GLUE["image.init"] + 0.5)
    assert_close(prep[0], GLUE["RN50.test_prep_init"], PREP_ATOL, 0, "test_prep_init")


def test_loss_ncuts0_value_and_gradient():
    prepared = make_term(0).prepare(GLUE["image.init"])
    x = GLUE["image.x"].clone().requires_grad_(True)
    loss = prepared(x, context(x))
    loss.sum().backward()
    assert loss.shape == (1,)
    assert_close(loss[0], GLUE["loss_ncuts0.value"], EMB_ATOL, 0, "loss_ncuts0")
    ref = GLUE["loss_ncuts0.grad_wrt_x"]
    assert_close(x.grad, ref, GRAD_REL * ref.abs().max().item(), 0, "grad")


def test_weight_and_sign():
    """Weighted loss = lambda * L; lowering it raises <p, v> (the sampler descends it)."""
    lam = LOOP_CFG["config"]["clip_guidance_lambda"]
    weighted = make_term(0, lambda_clip=lam).prepare(GLUE["image.init"])
    x = GLUE["image.x"]
    assert_close(weighted(x, context(x)), GLUE["loss_ncuts0.value"].reshape(1) * lam, EMB_ATOL * lam, 0, "weighted")
    models = stub_ensemble()
    cos = torch.stack([(image_embedding(m, 0.5 * x + 0.5) * GLUE[f"{n}.tgt"]).sum() for m, n in zip(models, CFG["models"])])
    assert_close(-cos.mean(), GLUE["loss_ncuts0.value"], EMB_ATOL, 0, "sign")


def test_cuts3_reduction_from_recorded_embeddings():
    preds, targets = [], []
    for name in CFG["models"]:
        pred = mean_unit_embedding(GLUE[f"{name}.cuts3_embeddings"])
        assert_close(pred, GLUE[f"{name}.cuts3_pred"], EMB_ATOL, 0, f"{name}.cuts3_pred")
        preds.append(pred[None])
        targets.append(GLUE[f"{name}.tgt"])
    assert_close(clip_loss(preds, targets)[0], GLUE["loss_ncuts3.value"], EMB_ATOL, 0, "loss_ncuts3")


def test_cuts3_replayed_with_seeded_generator():
    """Our cut sampler makes torchvision's draws in torchvision's order: upstream's seeded cuts come back."""
    x01 = 0.5 * GLUE["image.x"] + 0.5
    gen = torch.Generator().manual_seed(CUTS_SEED)
    for model in stub_ensemble():  # upstream draws model after model from one stream
        cuts = model.normalize(random_cuts(x01[0], CUTS_N, model.image_size, gen))
        assert cuts.shape == (CUTS_N, 3, model.image_size, model.image_size)
        pooled = F.adaptive_avg_pool2d(cuts, 4).flatten(1)
        assert_close(pooled, GLUE[f"{model.name}.cuts3_pooled"], PREP_ATOL, 0, f"{model.name} pooled")
    prepared = make_term(CUTS_N).prepare(GLUE["image.init"])
    x = GLUE["image.x"]
    loss = prepared(x, context(x, generator=torch.Generator().manual_seed(CUTS_SEED)))
    assert_close(loss[0], GLUE["loss_ncuts3.value"], EMB_ATOL, 0, "loss_ncuts3 replay")


def test_clip_loss_along_the_recorded_text_loop():
    """L_CLIP of every guided call of upstream's text loop (its x_mix is the recorded vit_x_in, aug_num 0)."""
    cfg = LOOP_CFG["config"]
    loop = load_file(fixture_path("diffuseit", "loop_text_guided.safetensors"))
    term = CLIPDirectionalLoss(stub_ensemble(), cfg["source"], cfg["prompt"], lambda_clip=1.0, ncuts=cfg["aug_num"])
    prepared = term.prepare(loop["init_image"])
    assert_close(prepared.source_loss[0], torch.tensor(LOOP_CFG["loss_prev_initial"]), EMB_ATOL, 0, "loss_prev_initial")
    for rec in LOOP_CFG["sequence"]:
        x = loop[f"step{rec['call']:02d}.vit_x_in"]
        ctx = context(x)
        loss = prepared(x, ctx)
        assert_close(loss[0], torch.tensor(rec["clip_loss"]), EMB_ATOL, 0, f"call {rec['call']}")
        assert torch.equal(ctx.state.clip_loss, loss.detach())


def test_cut_parameters_follow_the_upstream_distributions():
    gen = torch.Generator().manual_seed(0)
    params = [sample_cut_params(64, 80, gen) for _ in range(400)]  # spec §2.4 ranges, with rounding slack
    assert all(-10 <= p.angle <= 10 for p in params)
    area = torch.tensor([p.height * p.width / (64 * 80) for p in params])
    aspect = torch.tensor([p.width / p.height for p in params])
    assert area.min() > 0.78 and area.max() <= 1.0 and aspect.min() > 0.88 and aspect.max() < 1.12
    assert all(0 <= p.top <= 64 - p.height and 0 <= p.left <= 80 - p.width for p in params)
    assert 150 < sum(p.flip for p in params) < 250
    # no crop of the allowed ratio fits a 1x100 strip: the centred fallback
    fallback = sample_cut_params(1, 100, gen)
    assert (fallback.height, fallback.width, fallback.top, fallback.left) == (1, 1, 0, 49)


def test_random_cuts_reproducible_and_differentiable():
    x = torch.rand(3, 40, 48, requires_grad=True)
    a = random_cuts(x, 4, 24, torch.Generator().manual_seed(3))
    b = random_cuts(x, 4, 24, torch.Generator().manual_seed(3))
    c = random_cuts(x, 4, 24, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    a.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("ncuts", [0, 2])
def test_batch_equals_serial(ncuts):
    torch.manual_seed(0)
    source = GLUE["image.init"][:, :, ::4, ::4].repeat(3, 1, 1, 1) + 0.1 * torch.randn(3, 3, 64, 64)
    x = GLUE["image.x"].repeat(3, 1, 1, 1) * torch.tensor([1.0, 0.9, 1.1]).view(3, 1, 1, 1)
    term = make_term(ncuts)
    xb = x.clone().requires_grad_(True)
    batch = term.prepare(source)(xb, context(xb, generator=[torch.Generator().manual_seed(10 + b) for b in range(3)]))
    batch.sum().backward()
    for b in range(3):
        xs = x[b:b + 1].clone().requires_grad_(True)
        single = term.prepare(source[b:b + 1])(xs, context(xs, generator=torch.Generator().manual_seed(10 + b)))
        single.sum().backward()
        assert_close(batch[b], single[0], EMB_ATOL, 0, f"row {b}")
        assert_close(xb.grad[b], xs.grad[0], GRAD_REL * xs.grad.abs().max().item(), 0, f"grad row {b}")


def test_prepare_does_the_source_work_once():
    term = make_term(0)
    prepared = term.prepare(GLUE["image.init"])
    stubs = [m.module for m in term.ensemble]
    before = [dict(s.calls) for s in stubs]
    for _ in range(3):
        prepared(GLUE["image.x"], context(GLUE["image.x"]))
    for s, b in zip(stubs, before):
        assert s.calls["text"] == b["text"]  # no text encoding per step
        assert s.calls["image"] == b["image"] + 3  # one image encoding (of x) per step, no source re-encoding


def test_prepared_inside_inference_mode_still_differentiable():
    """ComfyUI runs nodes under inference_mode; prepared tensors must still enter autograd graphs."""
    term = make_term(0)  # models are loaded outside inference mode (load_clip sees to that)
    with torch.inference_mode():
        source = GLUE["image.init"].clone()  # an inference tensor, like ComfyUI's IMAGE
        prepared = term.prepare(source)
    x = GLUE["image.x"].clone().requires_grad_(True)
    prepared(x, context(x)).sum().backward()
    assert x.grad is not None and x.grad.abs().max() > 0


@pytest.mark.parametrize("field,value", [("source_text", ""), ("target_text", "   ")])
def test_empty_prompt_is_a_clear_error(field, value):
    kwargs = {"source_text": "Lion", "target_text": "Black Leopard", field: value}
    with pytest.raises(ValueError, match=field):
        CLIPDirectionalLoss(stub_ensemble(), **kwargs)


def test_bad_settings_are_errors():
    with pytest.raises(ValueError, match="ncuts"):
        make_term(-1)
    with pytest.raises(ValueError, match="at least one"):
        CLIPDirectionalLoss((), "Lion", "Black Leopard")
    with pytest.raises(ValueError, match="generators"):
        clip_text_loss(stub_ensemble(), GLUE["image.x"], [GLUE["RN50.tgt"], GLUE["RN50x4.tgt"]], 2,
                       [torch.Generator(), torch.Generator()])
