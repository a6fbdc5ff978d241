"""``comfy.cli_args``: only the preview settings the pack reads (``args.preview_method``, ``args.preview_size``)."""

import enum
import types


class LatentPreviewMethod(enum.Enum):
    NoPreviews = "none"
    Auto = "auto"
    Latent2RGB = "latent2rgb"
    TAESD = "taesd"


# ComfyUI's default is NoPreviews; the stub previews so the node tests see previews unless they turn them off
args = types.SimpleNamespace(preview_method=LatentPreviewMethod.Auto, preview_size=512)
