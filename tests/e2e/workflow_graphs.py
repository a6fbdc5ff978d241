"""The graphs of the latent-model workflows, in ``workflow_builder``'s compact form (node id -> type,
position, widget values by name, links by input name). Regenerate the JSON with
``python tests/e2e/workflow_builder.py OBJECT_INFO.json`` after a node's inputs change."""

SD15 = "v1-5-pruned-emaonly.safetensors"
SDXL = "sd_xl_base_1.0.safetensors"

SD15_DIFFUSEIT_TEXT = {
    "nodes": {
        "1": {"type": "LoadImage", "pos": [40, 40], "widgets": {"image": "chelsea.png"}},
        "2": {"type": "CheckpointLoaderSimple", "pos": [40, 420], "widgets": {"ckpt_name": SD15}},
        "3": {"type": "LoadDINO", "pos": [40, 580], "widgets": {"dino_name": "dino_vitbase8_pretrain.pth"}},
        "4": {"type": "LoadCLIPGuidance", "pos": [40, 760]},
        "5": {"type": "DINOStructureLoss", "pos": [420, 40], "links": {"dino": ["3", 0]},
              "widgets": {"contrast_schedule": "regularize_content"}},
        "6": {"type": "SemanticDivergence", "pos": [420, 260], "links": {"dino": ["3", 0], "guidance": ["5", 0]}},
        "7": {"type": "CLIPDirectionalLoss", "pos": [420, 460], "links": {"clip": ["4", 0], "guidance": ["6", 0]},
              "widgets": {"source_text": "cat", "target_text": "tiger"}},
        "8": {"type": "ApplyGuidanceToModel", "pos": [800, 40],
              "links": {"model": ["2", 0], "guidance": ["7", 0], "image": ["1", 0], "vae": ["2", 2]},
              "widgets": {"decoder": "taesd_decoder.safetensors", "strength": 0.3, "end_percent": 0.8}},
        "9": {"type": "VAEEncode", "pos": [800, 440], "links": {"pixels": ["1", 0], "vae": ["2", 2]}},
        "10": {"type": "CLIPTextEncode", "pos": [800, 560], "links": {"clip": ["2", 1]},
               "widgets": {"text": "a photo of a tiger"}},
        "11": {"type": "CLIPTextEncode", "pos": [800, 760], "links": {"clip": ["2", 1]},
               "widgets": {"text": "blurry, low quality"}},
        "12": {"type": "KSampler", "pos": [1180, 40],
               "links": {"model": ["8", 0], "positive": ["10", 0], "negative": ["11", 0], "latent_image": ["9", 0]},
               "widgets": {"seed": 0, "steps": 30, "cfg": 7.0, "sampler_name": "dpmpp_2m", "scheduler": "karras",
                           "denoise": 0.6}},
        "13": {"type": "VAEDecode", "pos": [1180, 360], "links": {"samples": ["12", 0], "vae": ["2", 2]}},
        "14": {"type": "SaveImage", "pos": [1560, 40], "links": {"images": ["13", 0]},
               "widgets": {"filename_prefix": "diffuseit/sd15_text"}},
    },
    "notes": [{"pos": [1180, 480], "size": [360, 260], "text":
               "DiffuseIT's text translation on Stable Diffusion 1.5: the photo is encoded and re-noised "
               "(denoise 0.6), and every sampler step's predicted x0 is decoded with TAESD and steered by DINO "
               "structure + semantic divergence + directional CLIP (cat -> tiger).\n\nNeeds: an SD1.5 checkpoint "
               "in models/checkpoints, taesd_decoder.safetensors in models/vae_approx, "
               "dino_vitbase8_pretrain.pth in models/dino, the CLIP models in models/clip_guidance. "
               "Strength 0.2-0.5; lower denoise keeps more of the photo."}],
}

SDXL_DIFFUSEIT_IMAGE = {
    "nodes": {
        "1": {"type": "LoadImage", "pos": [40, 40], "widgets": {"image": "chelsea.png"}},
        "2": {"type": "LoadImage", "pos": [40, 420], "widgets": {"image": "coffee.png"}},
        "3": {"type": "ImageScale", "pos": [420, 40], "links": {"image": ["1", 0]},
              "widgets": {"upscale_method": "lanczos", "width": 1024, "height": 1024, "crop": "center"}},
        "4": {"type": "ImageScale", "pos": [420, 240], "links": {"image": ["2", 0]},
              "widgets": {"upscale_method": "lanczos", "width": 1024, "height": 1024, "crop": "center"}},
        "5": {"type": "CheckpointLoaderSimple", "pos": [40, 800], "widgets": {"ckpt_name": SDXL}},
        "6": {"type": "LoadDINO", "pos": [420, 440], "widgets": {"dino_name": "dino_vitbase8_pretrain.pth"}},
        "7": {"type": "DINOStructureLoss", "pos": [800, 40], "links": {"dino": ["6", 0]}},
        "8": {"type": "SemanticDivergence", "pos": [800, 260], "links": {"dino": ["6", 0], "guidance": ["7", 0]}},
        "9": {"type": "DINOStyleLoss", "pos": [800, 460],
              "links": {"dino": ["6", 0], "style_image": ["4", 0], "guidance": ["8", 0]}},
        "10": {"type": "ApplyGuidanceToModel", "pos": [1180, 40],
               "links": {"model": ["5", 0], "guidance": ["9", 0], "image": ["3", 0], "vae": ["5", 2]},
               "widgets": {"decoder": "taesdxl_decoder.safetensors", "strength": 0.4, "end_percent": 0.8}},
        "11": {"type": "VAEEncode", "pos": [1180, 440], "links": {"pixels": ["3", 0], "vae": ["5", 2]}},
        "12": {"type": "CLIPTextEncode", "pos": [420, 640], "links": {"clip": ["5", 1]},
               "widgets": {"text": "a high quality photo"}},
        "13": {"type": "CLIPTextEncode", "pos": [420, 840], "links": {"clip": ["5", 1]},
               "widgets": {"text": "blurry, low quality"}},
        "14": {"type": "KSampler", "pos": [1560, 40],
               "links": {"model": ["10", 0], "positive": ["12", 0], "negative": ["13", 0], "latent_image": ["11", 0]},
               "widgets": {"seed": 0, "steps": 30, "cfg": 5.0, "sampler_name": "dpmpp_2m", "scheduler": "karras",
                           "denoise": 0.7}},
        "15": {"type": "VAEDecode", "pos": [1560, 360], "links": {"samples": ["14", 0], "vae": ["5", 2]}},
        "16": {"type": "ColorMatchMKL", "pos": [1560, 480], "links": {"image": ["15", 0], "reference": ["4", 0]}},
        "17": {"type": "SaveImage", "pos": [1940, 40], "links": {"images": ["16", 0]},
               "widgets": {"filename_prefix": "diffuseit/sdxl_image"}},
    },
    "notes": [{"pos": [1560, 620], "size": [360, 260], "text":
               "DiffuseIT's image-guided translation on SDXL at 1024 px: the structure of the first photo (DINO "
               "key self-similarity + contrastive), the appearance of the second (DINO [CLS] style), steered at "
               "every step through the SDXL TAESD, then colour-matched to the style image.\n\nNeeds: "
               "sd_xl_base_1.0.safetensors in models/checkpoints, taesdxl_decoder.safetensors in "
               "models/vae_approx, dino_vitbase8_pretrain.pth in models/dino. Strength 0.3-0.6."}],
}

SD15_BLENDED_EDIT = {
    "nodes": {
        "1": {"type": "LoadImage", "pos": [40, 40], "widgets": {"image": "coffee.png"}},
        "2": {"type": "LoadImageMask", "pos": [40, 420], "widgets": {"image": "coffee_mask.png", "channel": "red",
                                                                      "upload": "image"}},
        "3": {"type": "CheckpointLoaderSimple", "pos": [40, 800], "widgets": {"ckpt_name": SD15}},
        "4": {"type": "LoadCLIPGuidance", "pos": [40, 960], "widgets": {"models": "ViT-B-16"}},
        "5": {"type": "MaskedCLIPLoss", "pos": [420, 40], "links": {"clip": ["4", 0]},
              "widgets": {"prompt": "a cup of hot chocolate"}},
        "6": {"type": "ApplyGuidanceToModel", "pos": [420, 300],
              "links": {"model": ["3", 0], "guidance": ["5", 0], "image": ["1", 0], "mask": ["2", 0]},
              "widgets": {"decoder": "taesd_decoder.safetensors", "strength": 0.5, "end_percent": 0.8}},
        "7": {"type": "VAEEncode", "pos": [420, 700], "links": {"pixels": ["1", 0], "vae": ["3", 2]}},
        "8": {"type": "SetLatentNoiseMask", "pos": [420, 820], "links": {"samples": ["7", 0], "mask": ["2", 0]}},
        "9": {"type": "RepeatLatentBatch", "pos": [420, 940], "links": {"samples": ["8", 0]}, "widgets": {"amount": 8}},
        "10": {"type": "CLIPTextEncode", "pos": [800, 40], "links": {"clip": ["3", 1]},
               "widgets": {"text": "a cup of hot chocolate"}},
        "11": {"type": "CLIPTextEncode", "pos": [800, 240], "links": {"clip": ["3", 1]},
               "widgets": {"text": "blurry, low quality"}},
        "12": {"type": "KSampler", "pos": [800, 440],
               "links": {"model": ["6", 0], "positive": ["10", 0], "negative": ["11", 0], "latent_image": ["9", 0]},
               "widgets": {"seed": 0, "steps": 30, "cfg": 7.0, "sampler_name": "dpmpp_2m", "scheduler": "karras",
                           "denoise": 0.9}},
        "13": {"type": "VAEDecode", "pos": [800, 760], "links": {"samples": ["12", 0], "vae": ["3", 2]}},
        "14": {"type": "CLIPRank", "pos": [1180, 40], "links": {"images": ["13", 0], "clip": ["4", 0], "mask": ["2", 0]},
               "widgets": {"prompt": "a cup of hot chocolate", "top_k": 1}},
        "15": {"type": "PasteIntoSource", "pos": [1180, 400],
               "links": {"edited": ["14", 1], "source": ["1", 0], "mask": ["2", 0]}, "widgets": {"feather": 8}},
        "16": {"type": "SaveImage", "pos": [1560, 40], "links": {"images": ["15", 0]},
               "widgets": {"filename_prefix": "blended/sd15_edit"}},
        "17": {"type": "PreviewImage", "pos": [1560, 400], "links": {"images": ["14", 0]}},
    },
    "notes": [{"pos": [1180, 600], "size": [360, 280], "text":
               "Blended Diffusion's local edit on Stable Diffusion 1.5 (Blended Latent Diffusion's recipe plus the "
               "paper's CLIP guidance and ranking): Set Latent Noise Mask keeps the background at every step, "
               "masked CLIP guidance (decoded with TAESD) steers the masked region, 8 samples are ranked by CLIP "
               "inside the mask, and the best is pasted into the original pixels (nothing outside the mask "
               "changes).\n\nNeeds: an SD1.5 checkpoint, taesd_decoder.safetensors in models/vae_approx, "
               "ViT-B-16.pt in models/clip_guidance."}],
}

# file names are the template browser's titles (tests/test_workflow_thumbnails.py)
GRAPHS = {"SD1.5 DiffuseIT text-guided translation.json": SD15_DIFFUSEIT_TEXT,
          "SDXL DiffuseIT image-guided translation.json": SDXL_DIFFUSEIT_IMAGE,
          "SD1.5 Blended Diffusion local edit.json": SD15_BLENDED_EDIT}
