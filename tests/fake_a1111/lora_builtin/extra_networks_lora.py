"""The built-in Lora's <lora:name:te:unet> tags -> networks.load_networks, and the Lora hashes infotext."""

import networks
from modules import extra_networks


class ExtraNetworkLora(extra_networks.ExtraNetwork):
    def __init__(self):
        super().__init__("lora")

    def activate(self, p, params_list):
        names, te_multipliers, unet_multipliers = [], [], []
        for params in params_list:
            names.append(params.positional[0])
            te = float(params.positional[1]) if len(params.positional) > 1 else 1.0
            te = float(params.named.get("te", te))
            unet = float(params.positional[2]) if len(params.positional) > 2 else te
            unet = float(params.named.get("unet", unet))
            te_multipliers.append(te)
            unet_multipliers.append(unet)
        networks.load_networks(names, te_multipliers, unet_multipliers, None)
        if not getattr(p, "is_hr_pass", False) or not hasattr(p, "lora_hashes"):
            p.lora_hashes = {}
        for item in networks.loaded_networks:
            if item.network_on_disk.shorthash and item.mentioned_name:
                p.lora_hashes[item.mentioned_name] = item.network_on_disk.shorthash
        if p.lora_hashes:
            p.extra_generation_params["Lora hashes"] = ", ".join(
                f"{k}: {v}" for k, v in p.lora_hashes.items()
            )

    def deactivate(self, p):
        pass
