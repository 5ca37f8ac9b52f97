"""The built-in Lora's lora_patches.py: class-level forward patches of Linear and Conv2d."""

import networks
import torch


class LoraPatches:
    def __init__(self):
        self.Linear_forward = torch.nn.Linear.forward
        self.Conv2d_forward = torch.nn.Conv2d.forward
        torch.nn.Linear.forward = networks.network_Linear_forward
        torch.nn.Conv2d.forward = networks.network_Conv2d_forward

    def undo(self):
        torch.nn.Linear.forward = self.Linear_forward
        torch.nn.Conv2d.forward = self.Conv2d_forward
