"""comfy/model_base.py, comfy/model_sampling.py, comfy/conds.py: BaseModel.apply_model (sigma in,
x0 out, eps or v prediction on SD's discrete schedule), its memory estimate, and the conds."""

from __future__ import annotations

import math

import torch
from torch import nn

import comfy.utils


class ModelSamplingDiscrete(nn.Module):
    def __init__(self, alphas_cumprod: torch.Tensor, prediction: str = "eps"):
        super().__init__()
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        self.register_buffer("sigmas", sigmas.float())
        self.register_buffer("log_sigmas", sigmas.log().float())
        self.prediction = prediction

    @property
    def sigma_min(self):
        return self.sigmas[0]

    @property
    def sigma_max(self):
        return self.sigmas[-1]

    def timestep(self, sigma):
        dists = sigma.log().to(self.log_sigmas.device) - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape).to(sigma.device)

    def sigma(self, timestep):
        t = torch.clamp(timestep.float(), 0, len(self.sigmas) - 1)
        low, high = t.floor().long(), t.ceil().long()
        w = t.frac()
        return (1 - w) * self.log_sigmas[low].exp() + w * self.log_sigmas[high].exp()

    def calculate_input(self, sigma, noise):
        sigma = sigma.view(sigma.shape[:1] + (1,) * (noise.ndim - 1))
        return noise / (sigma**2 + 1.0) ** 0.5

    def calculate_denoised(self, sigma, model_output, model_input):
        sigma = sigma.view(sigma.shape[:1] + (1,) * (model_output.ndim - 1))
        if self.prediction == "v":
            return model_input / (sigma**2 + 1.0) - model_output * sigma / (sigma**2 + 1.0) ** 0.5
        return model_input - model_output * sigma

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        return latent_image + noise * sigma


class BaseModel(nn.Module):
    def __init__(self, unet: nn.Module, alphas_cumprod, prediction="eps", xl=False, inpaint=False):
        super().__init__()
        self.diffusion_model = unet
        self.model_sampling = ModelSamplingDiscrete(alphas_cumprod, prediction)
        self.xl, self.inpaint = xl, inpaint
        self.current_patcher = None

    def apply_model(
        self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kwargs
    ):
        sigma = t
        xc = self.model_sampling.calculate_input(sigma, x)
        if c_concat is not None:
            xc = torch.cat([xc, c_concat.to(xc)], dim=1)
        timestep = self.model_sampling.timestep(sigma).float()
        out = self.diffusion_model(xc, timestep, context=c_crossattn, y=kwargs.get("y"))
        if control is not None and control.get("output"):
            out = out + control["output"][0]  # the fake ControlNet's residual, one row per input row
        return self.model_sampling.calculate_denoised(sigma, out, x)

    def memory_required(self, input_shape, cond_shapes=None):
        return math.prod(input_shape) * 4 * 1000  # proportional to the batch, as ComfyUI's estimate

    def extra_conds(self, cond, pooled, batch, concat=None):
        out = {"c_crossattn": CONDCrossAttn(cond)}
        if self.xl:
            out["y"] = CONDRegular(pooled)
        if concat is not None:
            out["c_concat"] = CONDNoiseShape(concat)
        return out


class CONDRegular:
    def __init__(self, cond):
        self.cond = cond

    def process_cond(self, batch_size, area=None, **kwargs):
        return self.__class__(comfy.utils.repeat_to_batch_size(self.cond, batch_size))

    def can_concat(self, other):
        return self.cond.shape == other.cond.shape

    def concat(self, others):
        return torch.cat([self.cond] + [x.cond for x in others])

    def size(self):
        return list(self.cond.size())


class CONDNoiseShape(CONDRegular):
    def process_cond(self, batch_size, area=None, **kwargs):
        data = self.cond
        if area is not None:
            dims = len(area) // 2
            for i in range(dims):
                data = data.narrow(i + 2, area[i + dims], area[i])
        return self.__class__(comfy.utils.repeat_to_batch_size(data, batch_size))


class CONDCrossAttn(CONDRegular):
    def can_concat(self, other):
        s1, s2 = self.cond.shape, other.cond.shape
        if s1 != s2:
            if s1[0] != s2[0] or s1[2] != s2[2]:
                return False
            if math.lcm(s1[1], s2[1]) // min(s1[1], s2[1]) > 4:
                return False
        return True

    def concat(self, others):
        conds = [self.cond] + [x.cond for x in others]
        crossattn_max_len = math.lcm(*(c.shape[1] for c in conds))
        out = []
        for c in conds:
            if c.shape[1] < crossattn_max_len:
                c = c.repeat(1, crossattn_max_len // c.shape[1], 1)
            out.append(c)
        return torch.cat(out)
