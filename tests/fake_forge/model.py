"""A tiny SD1/SDXL-shaped checkpoint as Forge holds it: patchers in ``forge_objects`` (UNet patcher over
a KModel over the LDM-layout UNet, whose Linear layers are Forge's own, not ``nn.Linear``), the CLIP
patcher whose LoRAs merge before encoding, eps or v prediction, inpainting."""

import torch
import torch.nn.functional as F
from backend import memory_management
from backend.diffusion_engine.base import ForgeObjects
from backend.modules.k_model import KModel
from backend.modules.k_prediction import Prediction
from backend.patcher.base import ModelPatcher
from backend.patcher.unet import UnetPatcher

from fake_a1111.model import FakeSD


class ForgeLinear(torch.nn.Module):
    """ForgeOperations.Linear: a Linear that is not a ``torch.nn.Linear``."""

    def __init__(self, linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


def _forge_operations(module):
    for name, child in module.named_children():
        if isinstance(child, torch.nn.Linear):
            setattr(module, name, ForgeLinear(child))
        else:
            _forge_operations(child)


class FakeCLIP:
    """backend.patcher.clip.CLIP: the text encoder and its own patcher; a clone shares the encoder and
    clones the patcher (whose LoRAs merge into the shared encoder when it is loaded)."""

    def __init__(self, model=None, load_device=None, offload_device=None, patcher_class=ModelPatcher):
        if model is None:
            return
        self.cond_stage_model = model
        self.patcher = patcher_class(model, load_device, offload_device)

    def clone(self):
        n = type(self)()
        n.cond_stage_model, n.patcher = self.cond_stage_model, self.patcher.clone()
        return n

    def add_patches(self, *args, **kwargs):
        return self.patcher.add_patches(*args, **kwargs)


class FakeForgeSD:
    def __init__(self, xl=False, parameterization="eps", inpaint=False, seed=0, old=False):
        source = FakeSD(xl=xl, parameterization=parameterization, inpaint=inpaint, seed=seed)
        unet = source.model.diffusion_model
        _forge_operations(unet)
        prediction = "v_prediction" if parameterization == "v" else "epsilon"
        kmodel = KModel(unet, Prediction(source.alphas_cumprod, prediction))
        cpu = torch.device("cpu")
        if old:  # ldm_patched Forge: per-parameter patch lists
            from ldm_patched.modules.model_patcher import ModelPatcher as OldModelPatcher
            from modules_forge.unet_patcher import UnetPatcher as OldUnetPatcher

            clip = FakeCLIP(source.cond_stage_model, cpu, cpu, patcher_class=OldModelPatcher)
            patchers = OldUnetPatcher(kmodel, cpu, cpu), clip
        else:
            patchers = UnetPatcher(kmodel, cpu, cpu), FakeCLIP(source.cond_stage_model, cpu, cpu)
        objects = ForgeObjects(*patchers, None, None)
        self.forge_objects = objects
        self.forge_objects_original = objects.shallow_copy()
        self.forge_objects_after_applying_lora = objects.shallow_copy()
        self.current_lora_hash = str([])
        self.is_sdxl, self.is_inpaint, self.parameterization = xl, inpaint, parameterization
        self.alphas_cumprod = source.alphas_cumprod
        self._source = source

    def get_learned_conditioning(self, prompts):
        clip = self.forge_objects.clip
        memory_management.load_model_gpu(clip.patcher)  # a patcher not loaded yet merges its LoRAs
        return clip.cond_stage_model(prompts)

    def image_conditioning(self, x, mask):
        return self._source.image_conditioning(x, mask)
