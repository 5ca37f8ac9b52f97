"""ldm_patched.modules.model_patcher (old Forge, tag "previous"): patches are one list per parameter,
every LoRA's (strength, patch, strength_model) tuples mixed; clone copies each list; loading a
clone restores the weights and merges all of its patches (no hash short-cut)."""

import copy

import torch


class ModelPatcher:
    def __init__(
        self, model, load_device, offload_device, size=0, current_device=None, weight_inplace_update=False
    ):
        self.size = size
        self.model = model
        self.patches = {}
        self.object_patches = {}
        self.model_options = {"transformer_options": {}}
        self.model_keys = set(model.state_dict().keys())
        self.load_device, self.offload_device = load_device, offload_device
        self.current_device = offload_device if current_device is None else current_device
        self.weight_inplace_update = weight_inplace_update

    def _copy_into(self, n):
        n.patches = {k: self.patches[k][:] for k in self.patches}
        n.object_patches = self.object_patches.copy()
        n.model_options = copy.deepcopy(self.model_options)
        n.model_keys = self.model_keys
        return n

    def clone(self):
        return self._copy_into(
            ModelPatcher(self.model, self.load_device, self.offload_device, self.size, self.current_device)
        )

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        p = set()
        for k in patches:
            if k in self.model_keys:
                p.add(k)
                current_patches = self.patches.get(k, [])
                current_patches.append((strength_patch, patches[k], strength_model))
                self.patches[k] = current_patches
        return list(p)

    def set_model_unet_function_wrapper(self, unet_wrapper_function):
        self.model_options["model_function_wrapper"] = unet_wrapper_function

    def memory_required(self, input_shape):
        return self.model.memory_required(input_shape=input_shape)

    def calculate_weight(self, patches, weight, key):
        for strength, v, strength_model in patches:
            if strength_model != 1.0:
                weight *= strength_model
            kind, values = v
            if kind == "lora":
                up, down, alpha, mid = values
                scale = strength * (alpha / down.shape[0] if alpha is not None else 1.0)
                if mid is not None:
                    final = [down.shape[1], down.shape[0], mid.shape[2], mid.shape[3]]
                    down = (
                        torch.mm(
                            down.float().transpose(0, 1).flatten(1), mid.float().transpose(0, 1).flatten(1)
                        )
                        .reshape(final)
                        .transpose(0, 1)
                    )
                weight += scale * torch.mm(up.float().flatten(1), down.float().flatten(1)).reshape(
                    weight.shape
                )
            elif kind == "diff":
                weight += strength * values[0].float()
            else:
                raise ValueError(f"patch type {kind} not implemented by the fake")
        return weight

    def refresh_loras(self):
        """What loading this clone does to the shared model: unpatch (restore), then patch all."""
        backup = self.model.__dict__.setdefault("_fake_weight_backup", {})
        with torch.no_grad():
            for key, weight in backup.items():
                _set(self.model, key, weight)
            backup.clear()
            state = self.model.state_dict()
            for key, patches in self.patches.items():
                backup[key] = state[key].clone()
                _set(
                    self.model,
                    key,
                    self.calculate_weight(patches, state[key].float().clone(), key).to(state[key].dtype),
                )


def _set(model, key, value):
    parent, name = key.rsplit(".", 1)
    setattr(model.get_submodule(parent), name, torch.nn.Parameter(value, requires_grad=False))
