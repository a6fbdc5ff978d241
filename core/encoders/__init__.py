"""The frozen networks the guidance terms look through: DINO ViT, CLIP (one model or an ensemble), LPIPS.

Each loader reads the official file formats without executing pickled code and says where a
missing file goes and where to download it.
"""

from .clip import ClipEnsemble, ClipModel, load_clip, load_clip_ensemble
from .dino import DINOExtractor, load_dino_extractor
from .lpips import load_lpips
from .taesd import TAESDDecoder, load_taesd_decoder

__all__ = ["ClipEnsemble", "ClipModel", "load_clip", "load_clip_ensemble", "DINOExtractor", "load_dino_extractor",
           "load_lpips", "TAESDDecoder", "load_taesd_decoder"]
