"""backend.memory_management: loading patchers for sampling (the LoRA merge happens here), and the
reservations a sampling run asked for, recorded for the tests to read."""

import torch

signal_empty_cache = False
current_loaded_models = []
last_load = {}  # what the last load_models_gpu call was asked for
free_memory = 64 * 1024**3  # what the device reports free; a test lowers it to make Forge split its batch


def get_free_memory(dev=None, torch_free_too=False):
    return free_memory


def soft_empty_cache(force=False):
    pass


def load_models_gpu(models, memory_required=0, hard_memory_preservation=0):
    last_load.update(memory_required=memory_required, hard_memory_preservation=hard_memory_preservation)
    for patcher in models:
        # LoadedModel equality is patcher identity: a new clone is loaded (and its LoRAs refreshed)
        if not any(loaded is patcher for loaded in current_loaded_models):
            current_loaded_models[:] = [m for m in current_loaded_models if m.model is not patcher.model]
            patcher.refresh_loras()
            current_loaded_models.append(patcher)


def load_model_gpu(model):
    return load_models_gpu([model])


def unload_all_models():
    current_loaded_models.clear()


def module_size(module, exclude_device=None, include_device=None, return_split=False):
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def dtype_size(dtype):
    return torch.empty((), dtype=dtype).element_size()
