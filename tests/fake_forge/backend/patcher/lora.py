"""backend.patcher.lora: LoRA state dicts -> per-parameter patches, key maps, and the loader that
merges them into the one model all clones share (originals kept in ``backup``)."""

import torch
from backend import utils

CPU = torch.device("cpu")


def load_lora(lora, to_load):
    """-> ({param_key: patch}, the state dict's entries no key took). Patches as Forge builds them:
    ("lora", (up, down, alpha, mid, dora_scale)) holding the state dict's own tensors, ("diff", (w,))."""
    patch_dict, loaded = {}, set()
    for prefix, key in to_load.items():
        up, down = f"{prefix}.lora_up.weight", f"{prefix}.lora_down.weight"
        if up in lora and down in lora:
            alpha = lora.get(f"{prefix}.alpha")
            mid = lora.get(f"{prefix}.lora_mid.weight")
            patch_dict[key] = (
                "lora",
                (lora[up], lora[down], None if alpha is None else alpha.item(), mid, None),
            )
            loaded.update({up, down, f"{prefix}.alpha", f"{prefix}.lora_mid.weight"})
        diff = f"{prefix}.diff"
        if diff in lora:
            patch_dict[key] = ("diff", (lora[diff],))
            loaded.add(diff)
    return patch_dict, {k: v for k, v in lora.items() if k not in loaded}


def model_lora_keys_unet(model, key_map={}):  # noqa: B006 -- Forge's own mutable default, kept on purpose
    for name in model.state_dict():
        if name.startswith("diffusion_model.") and name.endswith(".weight"):
            key_map["lora_unet_" + name[len("diffusion_model.") : -len(".weight")].replace(".", "_")] = name
    return key_map


def model_lora_keys_clip(model, key_map={}):  # noqa: B006
    for name in model.state_dict():
        if name.startswith("transformer.text_model.") and name.endswith(".weight"):
            short = name[len("transformer.") : -len(".weight")].replace(".", "_")
            key_map["lora_te_" + short] = key_map["lora_te1_" + short] = name
    return key_map


def merge_lora_to_weight(patches, weight, key="online_lora", computation_dtype=torch.float32):
    weight_dtype = weight.dtype
    weight = weight.to(dtype=computation_dtype, copy=True)
    for strength, patch, strength_model, _offset, _function in patches:
        kind, v = patch
        if strength_model != 1.0:
            weight *= strength_model
        if kind == "lora":
            up, down, alpha, mid, dora_scale = v
            up, down = up.to(computation_dtype), down.to(computation_dtype)
            scale = alpha / down.shape[0] if alpha is not None else 1.0
            if mid is not None:
                final = [down.shape[1], down.shape[0], mid.shape[2], mid.shape[3]]
                down = (
                    torch.mm(
                        down.transpose(0, 1).flatten(1), mid.to(computation_dtype).transpose(0, 1).flatten(1)
                    )
                    .reshape(final)
                    .transpose(0, 1)
                )
            diff = torch.mm(up.flatten(1), down.flatten(1)).reshape(weight.shape)
            if dora_scale is not None:
                raise NotImplementedError("the fake host does not merge DoRA")
            weight += (strength * scale) * diff
        elif kind == "diff":
            weight += strength * v[0].to(computation_dtype)
        else:
            raise ValueError(f"patch type {kind} not implemented by the fake")
    return weight.to(weight_dtype)


class LoraLoader:
    def __init__(self, model):
        self.model = model
        self.backup = {}
        self.online_backup = []
        self.loaded_hash = str([])

    @torch.inference_mode()
    def refresh(self, lora_patches, offload_device=CPU, force_refresh=False):
        hashes = str(list(lora_patches.keys()))
        if hashes == self.loaded_hash and not force_refresh:
            return
        all_patches = {}
        for (_, _, _, online_mode), patches in lora_patches.items():
            for key, current_patches in patches.items():
                all_patches[(key, online_mode)] = all_patches.get((key, online_mode), []) + current_patches
        for k, w in self.backup.items():
            utils.set_attr_raw(
                self.model,
                k,
                w if isinstance(w, torch.nn.Parameter) else torch.nn.Parameter(w, requires_grad=False),
            )
        self.backup = {}
        for (key, _online), current_patches in all_patches.items():
            parent, child, weight = utils.get_attr_with_parent(self.model, key)
            if key not in self.backup:
                self.backup[key] = weight.to(device=offload_device)
            weight = merge_lora_to_weight(current_patches, weight, key, computation_dtype=torch.float32)
            utils.set_attr_raw(self.model, key, torch.nn.Parameter(weight, requires_grad=False))
        self.loaded_hash = hashes
