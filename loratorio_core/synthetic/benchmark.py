"""The first synthetic ComposLoRA as the quality benchmark runs it (``interface.Definition``).

32x32 scenes on a 16x16x12 space-to-depth latent, epsilon-prediction on SD's scaled-linear
schedule; 20 DDIM steps, CFG 5, LoRA scale 0.8 (ComposLoRA's).
"""

from __future__ import annotations

from . import detectors, world
from . import model as synthetic_model
from .interface import Definition

NAME = "synthetic ComposLoRA"
CATEGORIES = world.CATEGORIES
CONCEPTS = world.CONCEPTS
LATENT_SIDE = synthetic_model.LATENT_SHAPE[-1]  # 16: patch sizes are in these latent pixels
STEPS = 20
GUIDANCE = 5.0
LORA_SCALE = synthetic_model.LORA_SCALE

DEFINITION = Definition(world, detectors, synthetic_model, STEPS, GUIDANCE, LORA_SCALE)
sets = DEFINITION.sets
jobs_for = DEFINITION.jobs_for
load_model = DEFINITION.load_model
sample = DEFINITION.sample
detect = DEFINITION.detect
intended_scenes = DEFINITION.intended_scenes
gt_rmse = DEFINITION.gt_rmse
lora_files = DEFINITION.lora_files
