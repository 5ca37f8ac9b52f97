"""LoRAtorio inside the "backend" Forge (f2.x): its patchers keep each LoRA as one entry of
``lora_patches``, keyed by file, and its merge, sampling and memory functions live in ``backend``.
Everything else is shared with the ldm_patched Forge in ``forge``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .forge import ForgeSession, network_names


@dataclass
class Forge2Session(ForgeSession):
    """A generation in the "backend" Forge."""

    def _take_prompt_loras(self, clone, modules: dict):
        """``lora_patches`` is {(file, strength, strength_model, online): {key: entries}}: a LoRA is
        one whole entry, taken out of the clone's own dict (the shared originals stay)."""
        names = network_names()
        for key in list(clone.lora_patches):
            filename, strength = key[0], float(key[1])
            name = names.get(filename, Path(str(filename)).stem)
            layers, problem = self._layers(clone, modules, clone.lora_patches[key], strength)
            if problem:
                self.warn(f"{name}: {problem}; merged by Forge as usual instead of composed")
                continue
            if layers:
                del clone.lora_patches[key]
                yield name, strength, layers, filename

    def _drop_patches(self, patcher, marker) -> None:
        """By file: the marker is the ``lora_patches`` key's file name."""
        for key in [k for k in patcher.lora_patches if k[0] == marker]:
            del patcher.lora_patches[key]

    def _load(self, patcher) -> None:
        from backend import memory_management

        memory_management.load_model_gpu(patcher)

    def _calc_cond_uncond_batch(self):
        from backend.sampling.sampling_function import calc_cond_uncond_batch

        return calc_cond_uncond_batch

    def _unmerged_weight(self, clone, key: str, module) -> torch.Tensor:
        """Forge merges in place into the model every clone shares and keeps the originals in its
        loader's backup: the weight may hold the last generation's LoRAs."""
        loader = getattr(clone.model, "lora_loader", None)
        original = loader.backup.get(key) if loader is not None else None
        return original if original is not None else module.weight

    def _merged_weight(self, clone, key: str, patch, ratio: float, weight: torch.Tensor) -> torch.Tensor:
        from backend.patcher.lora import merge_lora_to_weight

        return merge_lora_to_weight([[ratio, patch, 1.0, None, None]], weight, key)
