"""The built-in Lora's network.py: a network on disk, a loaded network, its per-layer modules."""

import hashlib


class NetworkOnDisk:
    def __init__(self, name, filename):
        self.name, self.filename = name, filename
        self.alias = name
        self.shorthash = None

    def read_hash(self):
        with open(self.filename, "rb") as f:
            self.shorthash = hashlib.sha256(f.read()).hexdigest()[:12]


class Network:
    def __init__(self, name, network_on_disk):
        self.name, self.network_on_disk = name, network_on_disk
        self.te_multiplier = 1.0
        self.unet_multiplier = 1.0
        self.dyn_dim = None
        self.modules = {}
        self.mentioned_name = None


class ModuleType:
    def create_module(self, net, weights):
        return None


class NetworkModule:
    def __init__(self, net, weights):
        self.network, self.network_key, self.sd_key, self.sd_module = (
            net,
            weights.network_key,
            weights.sd_key,
            weights.sd_module,
        )
        self.shape = weights.sd_module.weight.shape
        self.alpha = weights.w["alpha"].item() if "alpha" in weights.w else None
        self.scale = None
        self.dim = None
        self.dora_scale = weights.w.get("dora_scale")
        self.bias = weights.w.get("bias")

    def multiplier(self):
        return (
            self.network.te_multiplier if "transformer" in self.sd_key[:20] else self.network.unet_multiplier
        )

    def calc_scale(self):
        if self.scale is not None:
            return self.scale
        if self.dim is not None and self.alpha is not None:
            return self.alpha / self.dim
        return 1.0

    def finalize_updown(self, updown, orig_weight, output_shape, ex_bias=None):
        updown = updown.reshape(output_shape)
        if orig_weight.size().numel() == updown.size().numel():
            updown = updown.reshape(orig_weight.shape)
        if ex_bias is not None:
            ex_bias = ex_bias * self.multiplier()
        return updown * self.calc_scale() * self.multiplier(), ex_bias
