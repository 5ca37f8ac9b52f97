"""The pixel world as the quality benchmark runs it (``synthetic.interface.Definition``).

24x24 scenes denoised in pixel space (3 channels), v-prediction on the cosine schedule; 20 DDIM
steps, CFG 5, LoRA scale 0.8 (ComposLoRA's).
"""

from __future__ import annotations

from ..synthetic.interface import Definition
from . import detectors, world
from . import model as pixel_model

NAME = "pixel ComposLoRA"
CATEGORIES = world.CATEGORIES
CONCEPTS = world.CONCEPTS
LATENT_SIDE = pixel_model.LATENT_SHAPE[-1]  # 24: the model works on the image's own pixels
STEPS = 20
GUIDANCE = 5.0
LORA_SCALE = pixel_model.LORA_SCALE

DEFINITION = Definition(world, detectors, pixel_model, STEPS, GUIDANCE, LORA_SCALE)
sets = DEFINITION.sets
jobs_for = DEFINITION.jobs_for
load_model = DEFINITION.load_model
sample = DEFINITION.sample
detect = DEFINITION.detect
intended_scenes = DEFINITION.intended_scenes
gt_rmse = DEFINITION.gt_rmse
lora_files = DEFINITION.lora_files
