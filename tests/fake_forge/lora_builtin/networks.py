"""Forge's built-in LoRA (sd_forge_lora/networks.py): prompt LoRAs become patches on clones of the
UNet and CLIP patchers, keyed (filename, unet multiplier, 1.0, online); nothing is merged here.
A hash of the (file, multipliers) list skips the rebuild when nothing changed."""

import functools
import os

import network
from backend.args import dynamic_args
from backend.patcher.lora import load_lora, model_lora_keys_clip, model_lora_keys_unet
from backend.utils import load_torch_file
from modules import shared

available_networks = {}
available_network_aliases = {}
forbidden_network_aliases = {}
loaded_networks = []


def list_available_networks():
    available_networks.clear()
    available_network_aliases.clear()
    folder = shared.cmd_opts.lora_dir
    for file in sorted(os.listdir(folder)) if folder else []:
        if file.endswith(".safetensors"):
            name = os.path.splitext(file)[0]
            entry = network.NetworkOnDisk(name, os.path.join(folder, file))
            available_networks[name] = available_network_aliases[name] = entry


def load_lora_for_models(
    model, clip, lora, strength_model, strength_clip, filename="default", online_mode=False
):
    unet_keys = model_lora_keys_unet(model.model) if model is not None else {}
    clip_keys = model_lora_keys_clip(clip.cond_stage_model) if clip is not None else {}
    lora_unet, lora_unmatch = load_lora(lora, unet_keys)
    lora_clip, lora_unmatch = load_lora(lora_unmatch, clip_keys)
    if len(lora_unmatch) > 12:
        print(f"[LORA] LoRA version mismatch: {filename}")
        return model, clip
    new_model, new_clip = model.clone(), clip.clone()
    if lora_unet:
        new_model.add_patches(
            filename=filename, patches=lora_unet, strength_patch=strength_model, online_mode=online_mode
        )
        model = new_model
    if lora_clip:
        new_clip.add_patches(
            filename=filename, patches=lora_clip, strength_patch=strength_clip, online_mode=online_mode
        )
        clip = new_clip
    return model, clip


@functools.lru_cache(maxsize=5)
def load_lora_state_dict(filename):
    return load_torch_file(filename, safe_load=True)


def load_networks(names, te_multipliers=None, unet_multipliers=None, dyn_dims=None):
    current_sd = shared.sd_model
    loaded_networks.clear()
    targets = []
    for i, name in enumerate(names):
        on_disk = available_network_aliases.get(name)
        if on_disk is None:
            continue
        net = network.Network(name, on_disk)  # multipliers left at 1.0, as Forge does
        net.mentioned_name = name
        on_disk.read_hash()
        loaded_networks.append(net)
        unet_w = unet_multipliers[i] if unet_multipliers else 1.0
        te_w = te_multipliers[i] if te_multipliers else 1.0
        targets.append([on_disk.filename, unet_w, te_w, dynamic_args.get("online_lora", False)])
    compiled_hash = str(targets)
    if current_sd.current_lora_hash == compiled_hash:
        return
    current_sd.current_lora_hash = compiled_hash
    current_sd.forge_objects.unet = current_sd.forge_objects_original.unet
    current_sd.forge_objects.clip = current_sd.forge_objects_original.clip
    for filename, strength_model, strength_clip, online_mode in targets:
        current_sd.forge_objects.unet, current_sd.forge_objects.clip = load_lora_for_models(
            current_sd.forge_objects.unet,
            current_sd.forge_objects.clip,
            load_lora_state_dict(filename),
            strength_model,
            strength_clip,
            filename=filename,
            online_mode=online_mode,
        )
    current_sd.forge_objects_after_applying_lora = current_sd.forge_objects.shallow_copy()
