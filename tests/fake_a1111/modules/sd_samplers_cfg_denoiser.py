"""modules.sd_samplers_cfg_denoiser: CFG batching as in 1.10.1 (82a973c0, CFGDenoiser.forward): cond rows first
(AND sub-prompts as extra rows), then uncond rows; an edit model (instruct-pix2pix, Image CFG scale
not 1) adds a third chunk of uncond rows with a zero image conditioning; skip_early_cond and
"negative guidance minimum sigma" drop the uncond rows for some steps; pad_cond_uncond(_v0) pads the
shorter of cond/uncond; prompts of different token lengths run cond and uncond in separate calls."""

import torch
from modules import prompt_parser, script_callbacks, sd_samplers_common, shared
from modules.shared import opts, state


def catenate_conds(conds):
    if not isinstance(conds[0], dict):
        return torch.cat(conds)
    return {key: torch.cat([c[key] for c in conds]) for key in conds[0]}


def subscript_cond(cond, a, b):
    if not isinstance(cond, dict):
        return cond[a:b]
    return {key: vec[a:b] for key, vec in cond.items()}


def pad_cond(tensor, repeats, empty):
    if not isinstance(tensor, dict):
        return torch.cat([tensor, empty.repeat((tensor.shape[0], repeats, 1))], axis=1)
    tensor["crossattn"] = pad_cond(tensor["crossattn"], repeats, empty)
    return tensor


class CFGDenoiser(torch.nn.Module):
    def __init__(self, sampler):
        super().__init__()
        self.sampler = sampler
        self.model_wrap = None
        self.init_latent = None
        self.step = 0
        self.steps = None
        self.total_steps = None
        self.image_cfg_scale = None
        self.padded_cond_uncond = False
        self.padded_cond_uncond_v0 = False
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

    def combine_denoised_for_edit_model(self, x_out, cond_scale):
        out_cond, out_img_cond, out_uncond = x_out.chunk(3)
        return (
            out_uncond
            + cond_scale * (out_cond - out_img_cond)
            + self.image_cfg_scale * (out_img_cond - out_uncond)
        )

    def pad_cond_uncond(self, cond, uncond):
        empty = shared.sd_model.cond_stage_model_empty_prompt
        num_repeats = (cond.shape[1] - uncond.shape[1]) // empty.shape[1]
        if num_repeats < 0:
            cond = pad_cond(cond, -num_repeats, empty)
            self.padded_cond_uncond = True
        elif num_repeats > 0:
            uncond = pad_cond(uncond, num_repeats, empty)
            self.padded_cond_uncond = True
        return cond, uncond

    def pad_cond_uncond_v0(self, cond, uncond):
        is_dict_cond = isinstance(uncond, dict)
        uncond_vec = uncond["crossattn"] if is_dict_cond else uncond
        if uncond_vec.shape[1] < cond.shape[1]:
            last_vector = uncond_vec[:, -1:]
            uncond_vec = torch.hstack(
                [uncond_vec, last_vector.repeat([1, cond.shape[1] - uncond_vec.shape[1], 1])]
            )
            self.padded_cond_uncond_v0 = True
        elif uncond_vec.shape[1] > cond.shape[1]:
            uncond_vec = uncond_vec[:, : cond.shape[1]]
            self.padded_cond_uncond_v0 = True
        if is_dict_cond:
            uncond["crossattn"] = uncond_vec
        else:
            uncond = uncond_vec
        return cond, uncond

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        if state.interrupted or state.skipped:
            raise sd_samplers_common.InterruptedException
        is_edit_model = (
            shared.sd_model.cond_stage_key == "edit"
            and self.image_cfg_scale is not None
            and self.image_cfg_scale != 1.0
        )
        conds_list, tensor = prompt_parser.reconstruct_multicond_batch(cond, self.step)
        uncond = prompt_parser.reconstruct_cond_batch(uncond, self.step)
        assert not is_edit_model or all(len(conds) == 1 for conds in conds_list), (
            "AND is not supported for InstructPix2Pix checkpoint (unless using Image CFG scale = 1.0)"
        )
        batch_size = len(conds_list)
        repeats = [len(conds_list[i]) for i in range(batch_size)]
        image_uncond = image_cond
        if isinstance(uncond, dict):

            def make_condition_dict(c_crossattn, c_concat):
                return {**c_crossattn, "c_concat": [c_concat]}
        else:

            def make_condition_dict(c_crossattn, c_concat):
                return {"c_crossattn": [c_crossattn], "c_concat": [c_concat]}

        def per_cond_row(v):
            return [torch.stack([v[i] for _ in range(n)]) for i, n in enumerate(repeats)]

        if not is_edit_model:
            x_in = torch.cat(per_cond_row(x) + [x])
            sigma_in = torch.cat(per_cond_row(sigma) + [sigma])
            image_cond_in = torch.cat(per_cond_row(image_cond) + [image_uncond])
        else:
            x_in = torch.cat(per_cond_row(x) + [x] + [x])
            sigma_in = torch.cat(per_cond_row(sigma) + [sigma] + [sigma])
            image_cond_in = torch.cat(
                per_cond_row(image_cond) + [image_uncond] + [torch.zeros_like(self.init_latent)]
            )
        params = script_callbacks.CFGDenoiserParams(
            x_in, image_cond_in, sigma_in, state.sampling_step, state.sampling_steps, tensor, uncond, self
        )
        script_callbacks.cfg_denoiser_callback(params)
        x_in, image_cond_in, sigma_in = params.x, params.image_cond, params.sigma
        tensor, uncond = params.text_cond, params.text_uncond
        skip_uncond = False
        if opts.skip_early_cond != 0.0 and self.step / self.total_steps <= opts.skip_early_cond:
            skip_uncond = True
            self.p.extra_generation_params["Skip Early CFG"] = opts.skip_early_cond
        elif (
            (self.step % 2 or opts.s_min_uncond_all)
            and s_min_uncond > 0
            and sigma[0] < s_min_uncond
            and not is_edit_model
        ):
            # alternating uncond allows for higher thresholds without the quality loss normally expected
            skip_uncond = True
            self.p.extra_generation_params["NGMS"] = s_min_uncond
            if opts.s_min_uncond_all:
                self.p.extra_generation_params["NGMS all steps"] = opts.s_min_uncond_all
        if skip_uncond:
            x_in, sigma_in = x_in[:-batch_size], sigma_in[:-batch_size]
        self.padded_cond_uncond = self.padded_cond_uncond_v0 = False
        if opts.pad_cond_uncond_v0 and tensor.shape[1] != uncond.shape[1]:
            tensor, uncond = self.pad_cond_uncond_v0(tensor, uncond)
        elif opts.pad_cond_uncond and tensor.shape[1] != uncond.shape[1]:
            tensor, uncond = self.pad_cond_uncond(tensor, uncond)
        if tensor.shape[1] == uncond.shape[1] or skip_uncond:
            if is_edit_model:
                cond_in = catenate_conds([tensor, uncond, uncond])
            elif skip_uncond:
                cond_in = tensor
            else:
                cond_in = catenate_conds([tensor, uncond])
            if opts.batch_cond_uncond:
                x_out = self.inner_model(x_in, sigma_in, cond=make_condition_dict(cond_in, image_cond_in))
            else:
                x_out = torch.zeros_like(x_in)
                for batch_offset in range(0, x_out.shape[0], batch_size):
                    a, b = batch_offset, batch_offset + batch_size
                    x_out[a:b] = self.inner_model(
                        x_in[a:b],
                        sigma_in[a:b],
                        cond=make_condition_dict(subscript_cond(cond_in, a, b), image_cond_in[a:b]),
                    )
        else:
            x_out = torch.zeros_like(x_in)
            batch_size = batch_size * 2 if opts.batch_cond_uncond else batch_size
            for batch_offset in range(0, tensor.shape[0], batch_size):
                a, b = batch_offset, min(batch_offset + batch_size, tensor.shape[0])
                if not is_edit_model:
                    c_crossattn = subscript_cond(tensor, a, b)
                else:
                    c_crossattn = torch.cat([tensor[a:b]], uncond)
                x_out[a:b] = self.inner_model(
                    x_in[a:b], sigma_in[a:b], cond=make_condition_dict(c_crossattn, image_cond_in[a:b])
                )
            if not skip_uncond:
                n = uncond.shape[0]
                x_out[-n:] = self.inner_model(
                    x_in[-n:], sigma_in[-n:], cond=make_condition_dict(uncond, image_cond_in[-n:])
                )
        denoised_image_indexes = [x[0][0] for x in conds_list]
        if skip_uncond:
            fake_uncond = torch.cat([x_out[i : i + 1] for i in denoised_image_indexes])
            x_out = torch.cat([x_out, fake_uncond])  # the cond-denoised image where the uncond one would be
        if is_edit_model:
            denoised = self.combine_denoised_for_edit_model(x_out, cond_scale)
        elif skip_uncond:
            denoised = self.combine_denoised(x_out, conds_list, uncond, 1.0)
        else:
            denoised = self.combine_denoised(x_out, conds_list, uncond, cond_scale)
        self.step += 1
        return denoised
