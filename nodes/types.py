"""The pack's custom socket types (values travel in-process between nodes) and the guidance value."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from comfy_api.latest import io

DDPMType = io.Custom("GUIDED_DDPM")
GuidanceType = io.Custom("DIFFUSION_GUIDANCE")
DINOType = io.Custom("DINO_VIT")
CLIPType = io.Custom("CLIP_GUIDANCE_MODELS")
BlendType = io.Custom("BACKGROUND_BLEND")
LPIPSType = io.Custom("LPIPS_MODEL")


@dataclass(frozen=True)
class NodeGuidance:
    """What flows along GUIDANCE edges: core guidance terms plus the managed models they use."""

    terms: tuple = ()
    models: tuple = ()  # comfy_bridge.ManagedModel values to load before sampling

    def plus(self, term: Any, *models: Any) -> "NodeGuidance":
        return NodeGuidance(self.terms + (term,), self.models + tuple(m for m in models if m not in self.models))


def chain(previous: Optional[NodeGuidance]) -> NodeGuidance:
    return previous if previous is not None else NodeGuidance()
