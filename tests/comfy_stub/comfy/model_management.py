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


free_memory_bytes = None  # tests set a number; None = the machine's available memory, as ComfyUI on a CPU


def get_free_memory(dev=None, torch_free_too=False):
    """ComfyUI's signature; on a CPU it returns psutil's available memory (read here from /proc/meminfo)."""
    free = free_memory_bytes
    if free is None:
        with open("/proc/meminfo") as f:
            free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    return (free, free) if torch_free_too else free
