"""comfy/utils.py: the file loader and batch repetition."""

import safetensors.torch


def load_torch_file(ckpt, safe_load=False, device=None, return_metadata=False):
    if not str(ckpt).lower().endswith((".safetensors", ".sft")):
        raise ValueError("the fake loads .safetensors only")
    return safetensors.torch.load_file(str(ckpt), device="cpu")


def repeat_to_batch_size(tensor, batch_size, dim=0):
    if tensor.shape[dim] > batch_size:
        return tensor.narrow(dim, 0, batch_size)
    if tensor.shape[dim] < batch_size:
        repeats = [1] * tensor.ndim
        repeats[dim] = -(-batch_size // tensor.shape[dim])
        return tensor.repeat(repeats).narrow(dim, 0, batch_size)
    return tensor
