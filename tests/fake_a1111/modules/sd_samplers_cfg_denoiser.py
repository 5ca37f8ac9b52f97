"""modules.sd_samplers_cfg_denoiser: CFG batching as in 1.10.1 (cond rows first, then uncond)."""

import torch
from modules import prompt_parser, script_callbacks, sd_samplers_common
from modules.shared import opts, state


def catenate_conds(conds):
    if not isinstance(conds[0], dict):
        return torch.cat(conds)
    return {key: torch.cat([c[key] for c in conds]) for key in conds[0]}


def subscript_cond(cond, a, b):
    if not isinstance(cond, dict):
        return cond[a:b]
    return {key: vec[a:b] for key, vec in cond.items()}


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

    def combine_denoised(self, x_out, conds_list, uncond, cond_scale):
        denoised_uncond = x_out[-uncond.shape[0] :]
        denoised = torch.clone(denoised_uncond)
        for i, conds in enumerate(conds_list):
            for cond_index, weight in conds:
                denoised[i] += (x_out[cond_index] - denoised_uncond[i]) * (weight * cond_scale)
        return denoised

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        if state.interrupted or state.skipped:
            raise sd_samplers_common.InterruptedException
        conds_list, tensor = prompt_parser.reconstruct_multicond_batch(cond, self.step)
        uncond = prompt_parser.reconstruct_cond_batch(uncond, self.step)
        batch_size = len(conds_list)
        repeats = [len(conds_list[i]) for i in range(batch_size)]
        if isinstance(uncond, dict):

            def make_condition_dict(c_crossattn, c_concat):
                return {**c_crossattn, "c_concat": [c_concat]}
        else:

            def make_condition_dict(c_crossattn, c_concat):
                return {"c_crossattn": [c_crossattn], "c_concat": [c_concat]}

        x_in = torch.cat([torch.stack([x[i] for _ in range(n)]) for i, n in enumerate(repeats)] + [x])
        sigma_in = torch.cat(
            [torch.stack([sigma[i] for _ in range(n)]) for i, n in enumerate(repeats)] + [sigma]
        )
        image_cond_in = torch.cat(
            [torch.stack([image_cond[i] for _ in range(n)]) for i, n in enumerate(repeats)] + [image_cond]
        )
        params = script_callbacks.CFGDenoiserParams(
            x_in, image_cond_in, sigma_in, state.sampling_step, state.sampling_steps, tensor, uncond, self
        )
        script_callbacks.cfg_denoiser_callback(params)
        x_in, image_cond_in, sigma_in = params.x, params.image_cond, params.sigma
        tensor, uncond = params.text_cond, params.text_uncond
        cond_in = catenate_conds([tensor, uncond])
        if opts.batch_cond_uncond:
            x_out = self.inner_model(x_in, sigma_in, cond=make_condition_dict(cond_in, image_cond_in))
        else:
            x_out = torch.zeros_like(x_in)
            for batch_offset in range(0, x_out.shape[0], batch_size):
                a, b = batch_offset, min(batch_offset + batch_size, x_out.shape[0])
                x_out[a:b] = self.inner_model(
                    x_in[a:b],
                    sigma_in[a:b],
                    cond=make_condition_dict(subscript_cond(cond_in, a, b), image_cond_in[a:b]),
                )
        denoised = self.combine_denoised(x_out, conds_list, uncond, cond_scale)
        self.step += 1
        return denoised
