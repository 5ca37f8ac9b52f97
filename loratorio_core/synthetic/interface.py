"""The benchmark interface ``benchmarks/quality.py`` and ``benchmarks/sweep.py`` run, written once.

Each synthetic benchmark's ``benchmark`` module binds its names (``sets``, ``jobs_for``,
``load_model``, ``sample``, ``detect``, ``gt_rmse``, ``lora_files``) to a ``Definition`` of its own
world, detectors and model module, so both answer the same questions the same way.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from ..config import LoRAtorioConfig
from . import composition, sampler
from .sampler import Job, SamplerModel, Samples


@dataclass(frozen=True)
class Definition:
    """One benchmark: its world (concepts, scenes, renderer, prompts, split), detectors, model
    module (``load_model``, ``lora_path``) and sampler defaults (steps, CFG scale, LoRA scale)."""

    world: ModuleType
    detectors: ModuleType
    model: ModuleType
    steps: int
    guidance: float
    lora_scale: float

    def sets(self, split: str) -> list[tuple[str, ...]]:
        """The fixed ``dev`` or ``test`` half of the composition sets."""
        return self.world.split_sets(self.world.composition_sets())[split]

    def jobs_for(self, sets: Sequence[tuple[str, ...]], seeds: int) -> list[Job]:
        """One job per set: its prompt (a plain background, varied by set, when the set has no
        background LoRA) and ``seeds`` seeds, different for every set and the same for every method."""
        return composition.jobs_for(sets, seeds, self._prompt)

    def _prompt(self, index: int, concepts: tuple[str, ...]) -> list[str]:
        backgrounds = tuple(self.world.BASE_BACKGROUNDS)
        return self.world.prompt_for(concepts, backgrounds[index % len(backgrounds)])

    def load_model(self) -> SamplerModel:
        """The shipped base model with all 11 LoRAs bound."""
        return self.model.load_model()

    def sample(
        self,
        model: SamplerModel,
        jobs: Sequence[Job],
        config: LoRAtorioConfig,
        steps: int | None = None,
        record_weights: bool = False,
    ) -> Samples:
        """Every job's images (S, 3, H, W) in [0, 1] with this benchmark's CFG and LoRA scale."""
        return sampler.sample(
            model,
            jobs,
            config,
            steps=self.steps if steps is None else steps,
            guidance=self.guidance,
            scale=self.lora_scale,
            record_weights=record_weights,
        )

    def detect(self, concept: str, images: Tensor) -> Tensor:
        """(S, 3, H, W) -> (S,) bool: the concept's detector."""
        return self.detectors.detect(concept, images)

    def intended_scenes(self, job: Job) -> list:
        """Every rendering of what ``job`` asks for: one scene per layout of the world."""
        plain = tuple(self.world.BASE_BACKGROUNDS)
        background = next((w for w in job.prompt if w in plain), plain[0])
        scene = self.world.scene_for(job.loras, random.Random(0), background=background)
        return [scene.at(layout) for layout in self.world.LAYOUTS]

    def gt_rmse(self, images: Tensor, job: Job) -> Tensor:
        """(S, 3, H, W) -> (S,) RMSE to the nearest clean rendering of the intended scene."""
        renderings = torch.stack([self.world.render(s) for s in self.intended_scenes(job)])
        return composition.nearest_rmse(images, renderings)

    def lora_files(self) -> dict[str, Path]:
        """Concept name -> its shipped kohya .safetensors."""
        return {c.name: self.model.lora_path(c.name) for c in self.world.CONCEPTS}
