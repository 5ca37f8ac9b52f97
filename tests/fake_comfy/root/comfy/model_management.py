"""comfy/model_management.py: free memory, the loaded patchers, and the interrupt flag."""

import torch


class InterruptProcessingException(Exception):
    pass


FREE_MEMORY = [float("inf")]  # tests lower it to make calc_cond_batch split its chunks
interrupt_processing = False
current_loaded_models: list = []


def get_free_memory(dev=None):
    return FREE_MEMORY[0]


def get_torch_device():
    return torch.device("cpu")


def interrupt_current_processing(value=True):
    global interrupt_processing
    interrupt_processing = value


def throw_exception_if_processing_interrupted():
    global interrupt_processing
    if interrupt_processing:
        interrupt_processing = False
        raise InterruptProcessingException()


def load_models_gpu(patchers):
    """Only one patcher of a model holds its weights at a time: loading another one unpatches the
    one before (its LoRA merges taken back out) and patches the new one in."""
    for patcher in patchers:
        for loaded in list(current_loaded_models):
            if loaded.model is patcher.model and loaded is not patcher:
                loaded.unpatch_model()
                current_loaded_models.remove(loaded)
        if patcher not in current_loaded_models:
            patcher.patch_model()
            current_loaded_models.append(patcher)


def unload_all_models():
    for loaded in list(current_loaded_models):
        loaded.unpatch_model()
    current_loaded_models.clear()
