"""The built-in Lora's networks.py: loading by name, loaded_networks, and merge-on-forward with backups."""

import os
from collections import namedtuple

import network
import network_lora
import network_norm
import safetensors.torch
import torch
from modules import shared

NetworkWeights = namedtuple("NetworkWeights", ["network_key", "sd_key", "w", "sd_module"])

module_types = [network_lora.ModuleTypeLora(), network_norm.ModuleTypeNorm()]
originals = None
available_networks = {}
available_network_aliases = {}
forbidden_network_aliases = {}
loaded_networks = []
networks_in_memory = {}


def assign_network_names_to_compvis_modules(sd_model):
    mapping = {}
    for name, module in sd_model.cond_stage_model.named_modules():
        network_name = name.replace(".", "_")
        mapping[network_name] = module
        module.network_layer_name = network_name
    for name, module in sd_model.model.named_modules():
        network_name = name.replace(".", "_")
        mapping[network_name] = module
        module.network_layer_name = network_name
    sd_model.network_layer_mapping = mapping


def list_available_networks():
    available_networks.clear()
    available_network_aliases.clear()
    folder = shared.cmd_opts.lora_dir
    for file in sorted(os.listdir(folder)) if folder else []:
        if file.endswith(".safetensors"):
            name = os.path.splitext(file)[0]
            entry = network.NetworkOnDisk(name, os.path.join(folder, file))
            available_networks[name] = entry
            available_network_aliases[name] = entry


def _compvis_key(key):
    if key.startswith("lora_unet_"):
        return "diffusion_model_" + key[len("lora_unet_") :]
    for prefix in (
        "lora_te_",
        "lora_te1_",
    ):  # A1111 maps lora_te1_text_model to transformer_text_model on SD1
        if key.startswith(prefix):
            return "transformer_" + key[len(prefix) :]
    return key


def load_network(name, network_on_disk):
    net = network.Network(name, network_on_disk)
    state = safetensors.torch.load_file(network_on_disk.filename)
    matched = {}
    for key_network, weight in state.items():
        key, _, part = key_network.partition(".")
        sd_key = _compvis_key(key)
        sd_module = shared.sd_model.network_layer_mapping.get(sd_key)
        if sd_module is None:
            continue
        matched.setdefault(
            sd_key, NetworkWeights(network_key=key, sd_key=sd_key, w={}, sd_module=sd_module)
        ).w[part] = weight
    for sd_key, weights in matched.items():
        for module_type in module_types:  # as A1111: the first type that takes the layer's tensors
            module = module_type.create_module(net, weights)
            if module is not None:
                net.modules[sd_key] = module
                break
    return net


def load_networks(names, te_multipliers=None, unet_multipliers=None, dyn_dims=None):
    already_loaded = {net.name: net for net in loaded_networks if net.name in names}
    loaded_networks.clear()
    for i, name in enumerate(names):
        on_disk = available_network_aliases.get(name)
        if on_disk is None:
            continue
        net = already_loaded.get(name) or load_network(name, on_disk)
        net.mentioned_name = name
        on_disk.read_hash()
        net.te_multiplier = te_multipliers[i] if te_multipliers else 1.0
        net.unet_multiplier = unet_multipliers[i] if unet_multipliers else 1.0
        net.dyn_dim = dyn_dims[i] if dyn_dims else 1.0
        loaded_networks.append(net)


def network_restore_weights_from_backup(self):
    backup = getattr(self, "network_weights_backup", None)
    bias_backup = getattr(self, "network_bias_backup", None)
    with torch.no_grad():
        if backup is not None:
            self.weight.copy_(backup)
        if bias_backup is not None:
            self.bias.copy_(bias_backup)


def network_apply_weights(self):
    name = getattr(self, "network_layer_name", None)
    if name is None:
        return
    current = getattr(self, "network_current_names", ())
    wanted = tuple((x.name, x.te_multiplier, x.unet_multiplier, x.dyn_dim) for x in loaded_networks)
    if getattr(self, "network_weights_backup", None) is None and wanted != ():
        self.network_weights_backup = self.weight.detach().to("cpu", copy=True)
        bias = getattr(self, "bias", None)
        self.network_bias_backup = None if bias is None else bias.detach().to("cpu", copy=True)
    if current != wanted:
        network_restore_weights_from_backup(self)
        for net in loaded_networks:
            module = net.modules.get(name)
            if module is not None:
                with torch.no_grad():
                    updown, ex_bias = module.calc_updown(self.weight)
                    self.weight += updown.to(self.weight.dtype)
                    if ex_bias is not None and getattr(self, "bias", None) is not None:
                        self.bias += ex_bias.to(self.bias.dtype)
        self.network_current_names = wanted


def network_Linear_forward(self, input):
    network_apply_weights(self)
    return originals.Linear_forward(self, input)


def network_Conv2d_forward(self, input):
    network_apply_weights(self)
    return originals.Conv2d_forward(self, input)


def network_GroupNorm_forward(self, input):
    network_apply_weights(self)
    return originals.GroupNorm_forward(self, input)


def network_LayerNorm_forward(self, input):
    network_apply_weights(self)
    return originals.LayerNorm_forward(self, input)
