"""modules.sd_samplers_cfg_denoiser (Forge): on_cfg_denoiser fires, then Forge's sampling_function
does CFG in x0 space through the UNet patcher's options; the denoiser counts its calls."""

import torch
from backend.sampling.sampling_function import sampling_function
from modules import prompt_parser, script_callbacks, sd_samplers_common
from modules.shared import state


class CFGDenoiser(torch.nn.Module):
    def __init__(self, sampler):
        super().__init__()
        self.sampler = sampler
        self.model_wrap = None
        self.step = 0
        self.steps = None
        self.total_steps = None
        self.p = None

    @property
    def inner_model(self):
        raise NotImplementedError

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        if state.interrupted or state.skipped:
            raise sd_samplers_common.InterruptedException
        cond_composition, cond = prompt_parser.reconstruct_multicond_batch(cond, self.step)
        uncond = prompt_parser.reconstruct_cond_batch(uncond, self.step)
        params = script_callbacks.CFGDenoiserParams(
            x, image_cond, sigma, state.sampling_step, state.sampling_steps, cond, uncond, self
        )
        script_callbacks.cfg_denoiser_callback(params)
        if self.p.is_hr_pass:
            cond_scale = self.p.hr_cfg
        denoised, _, _ = sampling_function(
            self, denoiser_params=params, cond_scale=cond_scale, cond_composition=cond_composition
        )
        self.step += 1
        return denoised
