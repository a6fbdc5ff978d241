import torch


class InterruptProcessingException(Exception):
    pass


interrupt_processing = False
loaded = []


def get_torch_device():
    return torch.device("cpu")


def unet_offload_device():
    return torch.device("cpu")


def intermediate_device():
    return torch.device("cpu")


def unet_dtype(device=None, model_params=0, supported_dtypes=(torch.float16, torch.bfloat16, torch.float32)):
    return torch.float32


def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                    force_full_load=False):
    assert not torch.is_inference_mode_enabled(), "load_models_gpu must run outside inference mode for guidance"
    loaded.extend(models)


def throw_exception_if_processing_interrupted():
    global interrupt_processing
    if interrupt_processing:
        interrupt_processing = False
        raise InterruptProcessingException()


def soft_empty_cache(force=False):
    pass


def should_use_fp16(device=None, model_params=0, prioritize_performance=True, manual_cast=False):
    return False
