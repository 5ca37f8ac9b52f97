"""comfy/sd.py: CLIP (its own patcher over the text model) and load_lora_for_models."""

from __future__ import annotations

import logging

import comfy.lora
import comfy.model_management
from comfy.model_patcher import ModelPatcher


class CLIP:
    def __init__(self, cond_stage_model=None):
        if cond_stage_model is None:
            return
        self.cond_stage_model = cond_stage_model
        self.patcher = ModelPatcher(cond_stage_model)

    def clone(self):
        n = CLIP()
        n.cond_stage_model, n.patcher = self.cond_stage_model, self.patcher.clone()
        return n

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        return self.patcher.add_patches(patches, strength_patch, strength_model)

    def encode(self, text: str):
        comfy.model_management.load_models_gpu([self.patcher])
        out = self.cond_stage_model([text])
        if isinstance(out, dict):
            return out["crossattn"], out["vector"]
        return out, None


def load_lora_for_models(model, clip, lora, strength_model, strength_clip):
    key_map = {}
    if model is not None:
        key_map = comfy.lora.model_lora_keys_unet(model.model, key_map)
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    loaded = comfy.lora.load_lora(lora, key_map)
    new_model, k = None, ()
    if model is not None:
        new_model = model.clone()
        k = new_model.add_patches(loaded, strength_model)
    new_clip, k1 = None, ()
    if clip is not None:
        new_clip = clip.clone()
        k1 = new_clip.add_patches(loaded, strength_clip)
    for x in loaded:
        if x not in set(k) and x not in set(k1):
            logging.warning("NOT LOADED %s", x)
    return new_model, new_clip
