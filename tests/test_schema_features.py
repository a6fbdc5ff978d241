"""Advanced inputs and search aliases (nodes/schema_features.py): used where ComfyUI's io has them, left
out on v0.3.75's io (the stub mirrors it; the real v0.3.75 server loads the pack in tests/test_e2e_comfy.py)."""

import dataclasses

import pytest

# the rarely changed inputs (issue 14): what newer frontends fold away
ADVANCED = {
    "LoadDDPM": {"dtype", "overrides", "gradient_checkpointing"},
    "LoadDINO": {"antialias", "num_heads"},
    "LoadCLIPGuidance": {"dtype", "gradient_checkpointing"},
    "DINOStructureLoss": {"noise_mix"},
    "DINOStyleLoss": {"noise_mix"},
    "SemanticDivergence": {"noise_mix"},
    "BackgroundBlend": {"enforce_background", "soft_mask", "dilate", "crop_margin", "feather"},
    "GuidedSampler": {"chunk_size", "max_restarts", "upscale_to_source"},
    "CLIPRank": {"crop_size", "crop_margin"},
}


def _schemas(pack) -> dict:
    from diffuseit_pack.nodes import NODES

    return {s.node_id: s for s in (n.define_schema() for n in NODES)}


@pytest.fixture
def newer_io(pack, monkeypatch):
    """The stub's io extended as newer ComfyUI has it: ``advanced=`` on widget inputs, Schema.search_aliases."""
    from comfy_api.latest import io

    for kind in (io.Int, io.Float, io.Boolean, io.String, io.Combo):
        plain = kind.Input

        class WithAdvanced(plain):
            def __init__(self, *args, advanced=None, **kwargs):
                super().__init__(*args, **kwargs)
                self.advanced = advanced

        monkeypatch.setattr(kind, "Input", WithAdvanced)

    @dataclasses.dataclass
    class SchemaWithAliases(io.Schema):
        search_aliases: list = None

    monkeypatch.setattr(io, "Schema", SchemaWithAliases)
    return io


def test_v0375_io_gets_neither(pack):
    from comfy_api.latest import io

    schemas = _schemas(pack)
    assert "search_aliases" not in {f.name for f in dataclasses.fields(io.Schema)}
    for node_id, schema in schemas.items():
        assert not hasattr(schema, "search_aliases"), node_id
        assert not any(hasattr(inp, "advanced") for inp in schema.inputs), node_id


def test_newer_io_gets_advanced_inputs_and_aliases(newer_io):
    schemas = _schemas(None)
    marked = {node_id: {inp.id for inp in s.inputs if getattr(inp, "advanced", None)} for node_id, s in schemas.items()}
    assert {k: v for k, v in marked.items() if v} == ADVANCED
    for node_id, schema in schemas.items():
        # every other input is explicitly not advanced (None), so the frontend shows it
        assert all(getattr(inp, "advanced", None) in (None, True) for inp in schema.inputs), node_id
        paper = {"DiffuseIT", "Blended Diffusion"} & set(schema.search_aliases)
        assert paper, f"{node_id}: search_aliases {schema.search_aliases} name neither paper"
    assert {"DiffuseIT", "Blended Diffusion", "SDEdit", "CLIP guidance"} <= set(schemas["GuidedSampler"].search_aliases)
    assert "CLIP guidance" in schemas["MaskedCLIPLoss"].search_aliases


def test_keyword_check(pack):
    from diffuseit_pack.nodes.schema_features import accepts_keyword

    def named(a, advanced=None):
        return a

    def open_ended(a, **kwargs):
        return a

    def closed(a, b=None):
        return a

    assert accepts_keyword(named, "advanced") and accepts_keyword(open_ended, "advanced")
    assert not accepts_keyword(closed, "advanced")
