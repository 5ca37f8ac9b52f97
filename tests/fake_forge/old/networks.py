"""The old Forge built-in Lora (extensions-builtin/Lora/networks.py): prompt LoRAs as per-parameter
patches on clones (no per-file key), behind the same (file, multipliers) hash."""

import functools
import os

import network
from backend.utils import load_torch_file
from ldm_patched.modules.lora import load_lora, model_lora_keys_clip, model_lora_keys_unet
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


@functools.lru_cache(maxsize=5)
def load_lora_state_dict(filename):
    return load_torch_file(filename, safe_load=True)


def load_lora_for_models(model, clip, lora, strength_model, strength_clip, filename="default"):
    lora_unet, rest = load_lora(lora, model_lora_keys_unet(model.model, {}))
    lora_clip, rest = load_lora(rest, model_lora_keys_clip(clip.cond_stage_model, {}))
    new_model, new_clip = model.clone(), clip.clone()
    new_model.add_patches(lora_unet, strength_model)
    new_clip.add_patches(lora_clip, strength_clip)
    return new_model, new_clip


def load_networks(names, te_multipliers=None, unet_multipliers=None, dyn_dims=None):
    current_sd = shared.sd_model
    loaded_networks.clear()
    targets = []
    for i, name in enumerate(names):
        on_disk = available_network_aliases.get(name)
        if on_disk is None:
            continue
        net = network.Network(name, on_disk)
        net.mentioned_name = name
        on_disk.read_hash()
        loaded_networks.append(net)
        targets.append(
            [
                on_disk.filename,
                unet_multipliers[i] if unet_multipliers else 1.0,
                te_multipliers[i] if te_multipliers else 1.0,
            ]
        )
    compiled_hash = str(targets)
    if current_sd.current_lora_hash == compiled_hash:
        return
    current_sd.current_lora_hash = compiled_hash
    current_sd.forge_objects.unet = current_sd.forge_objects_original.unet
    current_sd.forge_objects.clip = current_sd.forge_objects_original.clip
    for filename, strength_model, strength_clip in targets:
        current_sd.forge_objects.unet, current_sd.forge_objects.clip = load_lora_for_models(
            current_sd.forge_objects.unet,
            current_sd.forge_objects.clip,
            load_lora_state_dict(filename),
            strength_model,
            strength_clip,
            filename=filename,
        )
    current_sd.forge_objects_after_applying_lora = current_sd.forge_objects.shallow_copy()
