"""ComfyUI entry point of the DiffuseIT & Blended Diffusion pack: registers the nodes, nothing else.

Importing this package never imports ComfyUI; the nodes load only when ComfyUI asks for them, so
``core`` stays usable as a plain library (``pip install -e .``; ``import comfyui_diffuseit.core``).
"""


async def comfy_entrypoint():
    from .nodes import DiffuseITBlendedExtension

    return DiffuseITBlendedExtension()
