"""LoRAtorio inside the ldm_patched Forge (f0.x, Forge's tag ``previous``) and reForge: their
patchers keep one list of (strength, patch, strength_model) per parameter with every LoRA's entries
mixed, and their merge, sampling and memory functions live in ``ldm_patched``. Everything else is
shared with the "backend" Forge in ``forge``."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from .forge import ForgeSession, network_names


@dataclass
class Forge0Session(ForgeSession):
    """A generation in the ldm_patched Forge or reForge."""

    def _take_prompt_loras(self, clone, modules: dict):
        """A LoRA's entries are the ones holding its state dict's tensors (the built-in caches the
        state dict, so they are the very tensors); its marker is the set of their ids."""
        networks = sys.modules.get("networks")
        names = network_names()
        for net in list(getattr(networks, "loaded_networks", [])):
            filename = net.network_on_disk.filename
            own = frozenset(id(t) for t in networks.load_lora_state_dict(filename).values())
            entries, strengths = _entries_of(clone, own)
            name = names.get(filename, net.name)
            if not entries:
                continue
            if len(strengths) != 1:
                self.warn(f"{name}: its layers carry different strengths; merged by Forge as usual")
                continue
            strength = strengths.pop()
            layers, problem = self._layers(clone, modules, entries, strength)
            if problem:
                self.warn(f"{name}: {problem}; merged by Forge as usual instead of composed")
                continue
            self._drop_patches(clone, own)
            yield name, strength, layers, own

    def _drop_patches(self, patcher, marker) -> None:
        """By tensors: the entries of the per-parameter lists (which a clone copies) holding them."""
        for key in list(patcher.patches):
            kept = [e for e in patcher.patches[key] if not _holds(e[1], marker)]
            if kept:
                patcher.patches[key] = kept
            else:
                del patcher.patches[key]

    def _load(self, patcher) -> None:
        from ldm_patched.modules import model_management

        model_management.load_model_gpu(patcher)

    def _calc_cond_uncond_batch(self):
        from ldm_patched.modules.samplers import calc_cond_uncond_batch

        return calc_cond_uncond_batch

    def _merged_weight(self, clone, key: str, patch, ratio: float, weight: torch.Tensor) -> torch.Tensor:
        return clone.calculate_weight([(ratio, patch, 1.0)], weight, key)


def _entries_of(clone, own: frozenset) -> tuple[dict, set]:
    """One LoRA's patch entries per parameter, in f2's five-field form, and the strengths they carry."""
    entries, strengths = {}, set()
    for key, patches in clone.patches.items():
        mine = [e for e in patches if _holds(e[1], own)]
        if mine:
            entries[key] = [[e[0], e[1], e[2], None, None] for e in mine]
            strengths.update(float(e[0]) for e in mine)
    return entries, strengths


def _holds(patch, tensor_ids: frozenset) -> bool:
    _, values = patch
    return any(isinstance(t, torch.Tensor) and id(t) in tensor_ids for t in values)
