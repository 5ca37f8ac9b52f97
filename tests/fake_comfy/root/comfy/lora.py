"""comfy/lora.py: the kohya key maps (UNet in LDM naming, CLIP text model), load_lora (file keys ->
patches) and calculate_weight (W + strength * alpha / rank * up @ down)."""

from __future__ import annotations

import logging

import torch


def model_lora_keys_unet(model, key_map=None):
    key_map = {} if key_map is None else key_map
    for key in model.state_dict():
        if key.startswith("diffusion_model.") and key.endswith(".weight"):
            name = key[len("diffusion_model.") : -len(".weight")].replace(".", "_")
            key_map[f"lora_unet_{name}"] = key
            key_map[key[: -len(".weight")]] = key  # ComfyUI's own naming
    return key_map


def model_lora_keys_clip(model, key_map=None):
    key_map = {} if key_map is None else key_map
    for key in model.state_dict():
        if key.startswith("transformer.text_model.") and key.endswith(".weight"):
            name = key[len("transformer.") : -len(".weight")].replace(".", "_")
            key_map[f"lora_te_{name}"] = key
            key_map[f"lora_te1_{name}"] = key
    return key_map


def load_lora(lora: dict, to_load: dict):
    patch_dict, loaded_keys = {}, set()
    for prefix, key in to_load.items():
        up, down = f"{prefix}.lora_up.weight", f"{prefix}.lora_down.weight"
        if up not in lora:
            continue
        alpha_name = f"{prefix}.alpha"
        alpha = lora[alpha_name].item() if alpha_name in lora else None
        loaded_keys.update(k for k in (up, down, alpha_name) if k in lora)
        patch_dict[key] = ("lora", (lora[up], lora[down], alpha, None))
    for key in lora:
        if key not in loaded_keys:
            logging.warning("lora key not loaded: %s", key)
    return patch_dict


def calculate_weight(patches, weight, key):
    for strength, (kind, values), strength_model, _offset, _function in patches:
        if strength_model != 1.0:
            weight *= strength_model
        if kind != "lora":
            raise NotImplementedError(kind)
        up, down, alpha, _mid = values
        rank = down.shape[0]
        scale = (alpha / rank) if alpha is not None else 1.0
        delta = torch.mm(up.flatten(1).float(), down.flatten(1).float()).reshape(weight.shape)
        weight += (strength * scale * delta).to(weight.dtype)
    return weight
