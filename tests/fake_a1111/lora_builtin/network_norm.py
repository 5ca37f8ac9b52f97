"""The built-in Lora's network_norm.py: LyCORIS norm layers (w_norm/b_norm), a weight and a bias
added to a GroupNorm or LayerNorm."""

import network


class ModuleTypeNorm(network.ModuleType):
    def create_module(self, net, weights):
        if all(x in weights.w for x in ["w_norm", "b_norm"]):
            return NetworkModuleNorm(net, weights)
        return None


class NetworkModuleNorm(network.NetworkModule):
    def __init__(self, net, weights):
        super().__init__(net, weights)
        self.w_norm = weights.w.get("w_norm")
        self.b_norm = weights.w.get("b_norm")

    def calc_updown(self, orig_weight):
        output_shape = self.w_norm.shape
        updown = self.w_norm.to(orig_weight.device, dtype=orig_weight.dtype)
        ex_bias = None if self.b_norm is None else self.b_norm.to(orig_weight.device, dtype=orig_weight.dtype)
        return self.finalize_updown(updown, orig_weight, output_shape, ex_bias)
