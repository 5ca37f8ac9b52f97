"""The built-in Lora's lora_patches.py: class-level forward patches of Linear, Conv2d, GroupNorm and
LayerNorm."""

import networks
import torch


class LoraPatches:
    def __init__(self):
        self.Linear_forward = torch.nn.Linear.forward
        self.Conv2d_forward = torch.nn.Conv2d.forward
        torch.nn.Linear.forward = networks.network_Linear_forward
        self.GroupNorm_forward = torch.nn.GroupNorm.forward
        self.LayerNorm_forward = torch.nn.LayerNorm.forward
        torch.nn.Conv2d.forward = networks.network_Conv2d_forward
        torch.nn.GroupNorm.forward = networks.network_GroupNorm_forward
        torch.nn.LayerNorm.forward = networks.network_LayerNorm_forward

    def undo(self):
        torch.nn.Linear.forward = self.Linear_forward
        torch.nn.Conv2d.forward = self.Conv2d_forward
        torch.nn.GroupNorm.forward = self.GroupNorm_forward
        torch.nn.LayerNorm.forward = self.LayerNorm_forward
