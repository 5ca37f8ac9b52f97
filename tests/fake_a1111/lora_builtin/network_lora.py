"""The built-in Lora's network_lora.py: up/down (/mid) as real torch modules, calc_updown."""

import network
import torch


class ModuleTypeLora(network.ModuleType):
    def create_module(self, net, weights):
        if all(x in weights.w for x in ["lora_up.weight", "lora_down.weight"]):
            return NetworkModuleLora(net, weights)
        return None


class NetworkModuleLora(network.NetworkModule):
    def __init__(self, net, weights):
        super().__init__(net, weights)
        self.up_model = self.create_module(weights.w, "lora_up.weight")
        self.down_model = self.create_module(weights.w, "lora_down.weight")
        self.mid_model = self.create_module(weights.w, "lora_mid.weight", none_ok=True)
        self.dim = weights.w["lora_down.weight"].shape[0]

    def create_module(self, weights, key, none_ok=False):
        weight = weights.get(key)
        if weight is None and none_ok:
            return None
        if isinstance(self.sd_module, torch.nn.Linear):
            module = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
            weight = weight.reshape(weight.shape[0], -1)
        elif key == "lora_down.weight" and weight.shape[2:] != (1, 1):
            module = torch.nn.Conv2d(
                weight.shape[1],
                weight.shape[0],
                weight.shape[2:],
                self.sd_module.stride,
                self.sd_module.padding,
                bias=False,
            )
        elif key == "lora_mid.weight":
            module = torch.nn.Conv2d(
                weight.shape[1],
                weight.shape[0],
                weight.shape[2:],
                self.sd_module.stride,
                self.sd_module.padding,
                bias=False,
            )
        else:
            module = torch.nn.Conv2d(weight.shape[1], weight.shape[0], (1, 1), bias=False)
            weight = weight.reshape(weight.shape[0], weight.shape[1], 1, 1)
        with torch.no_grad():
            module.weight.copy_(weight)
        module.weight.requires_grad_(False)
        return module

    def calc_updown(self, orig_weight):
        up = self.up_model.weight.to(orig_weight.device)
        down = self.down_model.weight.to(orig_weight.device)
        if self.mid_model is not None:
            core = torch.einsum("ijkl,jc->ickl", self.mid_model.weight, down.flatten(1))
            updown = torch.einsum("oi,ickl->ockl", up.flatten(1), core)
        elif up.dim() == 4 and down.shape[2:] != (1, 1):
            updown = torch.einsum("or,rikl->oikl", up.flatten(1), down)
        else:
            updown = up.flatten(1) @ down.flatten(1)
        return self.finalize_updown(updown, orig_weight, self.shape)
