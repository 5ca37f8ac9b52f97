"""modules.sd_samplers_kdiffusion: k-diffusion's eps/v wrappers and two samplers (Euler; Heun, 2nd order)."""

import torch
from modules import sd_samplers_common, shared
from modules.sd_samplers_cfg_denoiser import CFGDenoiser


class DiscreteSchedule(torch.nn.Module):
    def __init__(self, alphas_cumprod):
        super().__init__()
        self.sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        self.log_sigmas = self.sigmas.log()

    def sigma_to_t(self, sigma):
        log_sigma = sigma.log()
        dists = log_sigma - self.log_sigmas[:, None]
        low_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=self.log_sigmas.shape[0] - 2)
        high_idx = low_idx + 1
        low, high = self.log_sigmas[low_idx], self.log_sigmas[high_idx]
        w = ((low - log_sigma) / (low - high)).clamp(0, 1)
        t = (1 - w) * low_idx + w * high_idx
        return t.view(sigma.shape)

    def t_to_sigma(self, t):
        t = t.float()
        low_idx, high_idx, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low_idx] + w * self.log_sigmas[high_idx]).exp()


class CompVisDenoiser(DiscreteSchedule):
    def __init__(self, model, quantize=False):
        super().__init__(model.alphas_cumprod)
        self.inner_model = model

    def forward(self, input, sigma, **kwargs):
        c_out, c_in = -sigma[:, None, None, None], 1 / (sigma[:, None, None, None] ** 2 + 1) ** 0.5
        eps = self.inner_model.apply_model(input * c_in, self.sigma_to_t(sigma), **kwargs)
        return input + eps * c_out


class CompVisVDenoiser(DiscreteSchedule):
    def __init__(self, model, quantize=False):
        super().__init__(model.alphas_cumprod)
        self.inner_model = model

    def forward(self, input, sigma, **kwargs):
        s = sigma[:, None, None, None]
        c_skip, c_out, c_in = 1 / (s**2 + 1), -s / (s**2 + 1) ** 0.5, 1 / (s**2 + 1) ** 0.5
        return (
            self.inner_model.apply_model(input * c_in, self.sigma_to_t(sigma), kwargs["cond"]) * c_out
            + input * c_skip
        )


class CFGDenoiserKDiffusion(CFGDenoiser):
    @property
    def inner_model(self):
        if self.model_wrap is None:
            cls = CompVisVDenoiser if shared.sd_model.parameterization == "v" else CompVisDenoiser
            self.model_wrap = cls(shared.sd_model)
        return self.model_wrap


class KDiffusionSampler:
    def __init__(self, name, sd_model):
        self.name = name
        self.second_order = name == "Heun"
        self.model_wrap_cfg = CFGDenoiserKDiffusion(self)
        self.model_wrap = self.model_wrap_cfg.inner_model
        self.sampler_extra_args = {}
        self.last_latent = None

    def get_sigmas(self, steps):
        ts = torch.linspace(999, 0, steps)
        return torch.cat([self.model_wrap.t_to_sigma(ts), ts.new_zeros(1)])

    def _launch(self, p, x, sigmas, c, uc, image_conditioning, steps):
        self.model_wrap_cfg.step = 0
        self.model_wrap_cfg.p = p
        self.model_wrap_cfg.steps = steps
        self.model_wrap_cfg.total_steps = steps * 2 if self.second_order else steps
        self.model_wrap_cfg.image_cfg_scale = getattr(p, "image_cfg_scale", None)  # Sampler.initialize
        self.sampler_extra_args = {
            "cond": c,
            "image_cond": image_conditioning,
            "uncond": uc,
            "cond_scale": p.cfg_scale,
            "s_min_uncond": getattr(p, "s_min_uncond", 0.0),
        }
        shared.state.sampling_steps = steps
        self.last_latent = x
        try:
            return self._loop(x, sigmas)
        except sd_samplers_common.InterruptedException:
            return self.last_latent

    def _loop(self, x, sigmas):
        model = self.model_wrap_cfg
        s_in = x.new_ones([x.shape[0]])
        for i in range(len(sigmas) - 1):
            denoised = model(x, sigmas[i] * s_in, **self.sampler_extra_args)
            d = (x - denoised) / sigmas[i]
            dt = sigmas[i + 1] - sigmas[i]
            if self.second_order and sigmas[i + 1] > 0:
                x2 = x + d * dt
                d2 = (x2 - model(x2, sigmas[i + 1] * s_in, **self.sampler_extra_args)) / sigmas[i + 1]
                x = x + (d + d2) / 2 * dt
            else:
                x = x + d * dt
            self.last_latent = x
            shared.state.sampling_step = i + 1
        return x

    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        steps = steps or p.steps
        sigmas = self.get_sigmas(steps)
        return self._launch(
            p, x * sigmas[0], sigmas, conditioning, unconditional_conditioning, image_conditioning, steps
        )

    def sample_img2img(
        self, p, x, noise, conditioning, unconditional_conditioning, steps=None, image_conditioning=None
    ):
        steps = steps or p.steps
        self.model_wrap_cfg.init_latent = x
        t_enc = int(min(p.denoising_strength, 0.999) * steps)
        sigmas = self.get_sigmas(steps)[steps - t_enc - 1 :]
        return self._launch(
            p,
            x + noise * sigmas[0],
            sigmas,
            conditioning,
            unconditional_conditioning,
            image_conditioning,
            t_enc + 1,
        )


def create_sampler(name, sd_model):
    return KDiffusionSampler(name, sd_model)
