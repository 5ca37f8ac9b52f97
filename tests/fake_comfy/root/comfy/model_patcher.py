"""comfy/model_patcher.py: ModelPatcher as the nodes see it. A clone shares the model and copies
the patch lists (one level) and model_options (deeply: ``copy.deepcopy``); LoRA patches are merged
into the shared model's weights when a patcher is loaded (a backup kept) and taken out when it is
unloaded."""

from __future__ import annotations

import copy

import torch

import comfy.lora


def create_model_options_clone(orig_model_options: dict):
    import comfy.patcher_extension

    return comfy.patcher_extension.copy_nested_dicts(orig_model_options)


class ModelPatcher:
    def __init__(self, model, load_device=None, offload_device=None, size=0, weight_inplace_update=False):
        self.model = model
        self.load_device, self.offload_device = load_device, offload_device
        self.patches: dict[str, list] = {}
        self.backup: dict[str, torch.Tensor] = {}
        self.model_options = {"transformer_options": {}}
        self.parent = None

    def clone(self):
        n = self.__class__(self.model, self.load_device, self.offload_device)
        n.patches = {k: v[:] for k, v in self.patches.items()}
        n.model_options = copy.deepcopy(self.model_options)
        n.backup = self.backup
        n.parent = self
        return n

    def set_model_unet_function_wrapper(self, unet_wrapper_function):
        self.model_options["model_function_wrapper"] = unet_wrapper_function

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        model_sd = self.model.state_dict()
        added = set()
        for key in patches:
            if key in model_sd:
                added.add(key)
                self.patches.setdefault(key, []).append(
                    (strength_patch, patches[key], strength_model, None, None)
                )
        return list(added)

    def get_model_object(self, name):
        return getattr(self.model, name)

    def patch_model(self):
        with torch.no_grad():
            for key, entries in self.patches.items():
                weight = self.model.get_parameter(key)
                if key not in self.backup:
                    self.backup[key] = weight.detach().clone()
                merged = comfy.lora.calculate_weight(entries, self.backup[key].clone(), key)
                weight.copy_(merged)

    def unpatch_model(self):
        with torch.no_grad():
            for key, original in self.backup.items():
                self.model.get_parameter(key).copy_(original)
        self.backup.clear()
