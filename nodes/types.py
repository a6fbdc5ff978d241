"""The pack's custom socket types (values travel in-process between nodes)."""

from comfy_api.latest import io

DDPMType = io.Custom("GUIDED_DDPM")
