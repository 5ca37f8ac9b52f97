"""modules.sd_samplers_kdiffusion (Forge): the sampler reads the schedule from the UNet patcher's
predictor and prepares (loads, merges LoRAs into) the patcher before sampling."""

from backend.sampling.sampling_function import sampling_cleanup, sampling_prepare
from modules import a1111_version, shared
from modules.sd_samplers_cfg_denoiser import CFGDenoiser

_a1111 = a1111_version("sd_samplers_kdiffusion")


class ForgeScheduleLinker:
    def __init__(self, predictor):
        self.predictor = predictor
        self.inner_model = None

    def t_to_sigma(self, t):
        return self.predictor.sigma(t)


class CFGDenoiserKDiffusion(CFGDenoiser):
    @property
    def inner_model(self):
        if self.model_wrap is None:
            self.model_wrap = ForgeScheduleLinker(shared.sd_model.forge_objects.unet.model.predictor)
            self.model_wrap.inner_model = shared.sd_model
        return self.model_wrap


class KDiffusionSampler(_a1111.KDiffusionSampler):
    def __init__(self, name, sd_model):
        self.name = name
        self.second_order = name == "Heun"
        self.model_wrap_cfg = CFGDenoiserKDiffusion(self)
        self.model_wrap = self.model_wrap_cfg.inner_model
        self.sampler_extra_args = {}
        self.last_latent = None

    def sample(self, p, x, *args, **kwargs):
        unet = self.model_wrap.inner_model.forge_objects.unet
        sampling_prepare(unet, x=x)
        try:
            return super().sample(p, x, *args, **kwargs)
        finally:
            sampling_cleanup(unet)

    def sample_img2img(self, p, x, *args, **kwargs):
        unet = self.model_wrap.inner_model.forge_objects.unet
        sampling_prepare(unet, x=x)
        try:
            return super().sample_img2img(p, x, *args, **kwargs)
        finally:
            sampling_cleanup(unet)


def create_sampler(name, sd_model):
    return KDiffusionSampler(name, sd_model)
