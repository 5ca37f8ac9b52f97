"""backend.sampling.sampling_function: Forge's CFG in x0 space. calc_cond_uncond_batch runs the cond
(0) and uncond (1) chunks, in reverse order of listing, through model_options' model_function_wrapper
(apply_model, {input, timestep, c, cond_or_uncond}); the wrapper returns denoised x0."""

import math

import torch
from backend import memory_management


def _compile(cond, strength=1.0):
    if isinstance(cond, dict):
        model_conds = {"c_crossattn": cond["crossattn"], "y": cond["vector"]}
    else:
        model_conds = {"c_crossattn": cond}
    return {"model_conds": model_conds, "strength": strength}


def compile_conditions(cond):
    return None if cond is None else [_compile(cond)]


def compile_weighted_conditions(cond, weights):
    """One entry per AND sub-prompt index j: the j-th sub-prompt's rows of every image."""
    results = []
    for cond_pre in map(list, zip(*weights, strict=False)):  # ragged AND lists truncate, as in Forge
        indices = [i for i, _ in cond_pre]
        weight = cond_pre[-1][1]
        feed = {k: v[indices] for k, v in cond.items()} if isinstance(cond, dict) else cond[indices]
        results.append(_compile(feed, weight))
    return results


def cond_cat(c_list):
    out = {}
    for key in c_list[0]:
        out[key] = torch.cat([c[key] for c in c_list])
    return out


def calc_cond_uncond_batch(model, cond, uncond, x_in, timestep, model_options):
    out_cond, out_count = torch.zeros_like(x_in), torch.ones_like(x_in) * 1e-37
    out_uncond, out_uncond_count = torch.zeros_like(x_in), torch.ones_like(x_in) * 1e-37
    COND, UNCOND = 0, 1
    to_run = [(entry, COND) for entry in cond]
    if uncond is not None:
        to_run += [(entry, UNCOND) for entry in uncond]
    max_chunks = model_options.get("fake_max_chunks_per_call")  # stands in for low free memory
    while to_run:
        to_batch_temp = list(range(len(to_run)))
        to_batch_temp.reverse()
        to_batch = to_batch_temp if max_chunks is None else to_batch_temp[:max_chunks]
        input_x, mult, c, cond_or_uncond = [], [], [], []
        control = model_options.get("fake_control")
        for x in to_batch:
            entry, kind = to_run.pop(x)
            input_x.append(x_in)
            mult.append(torch.ones_like(x_in) * entry["strength"])
            c.append(entry["model_conds"])
            cond_or_uncond.append(kind)
        batch_chunks = len(cond_or_uncond)
        input_x = torch.cat(input_x)
        c = cond_cat(c)
        timestep_ = torch.cat([timestep] * batch_chunks)
        transformer_options = model_options.get("transformer_options", {}).copy()
        transformer_options["cond_or_uncond"] = cond_or_uncond[:]
        transformer_options["sigmas"] = timestep
        rows = x_in.shape[0]
        transformer_options["cond_mark"] = torch.tensor(cond_or_uncond).repeat_interleave(rows).float()
        transformer_options["cond_indices"] = [
            i for i, k in enumerate(cond_or_uncond) for _ in range(rows) if k == 0
        ]
        transformer_options["uncond_indices"] = [
            i for i, k in enumerate(cond_or_uncond) for _ in range(rows) if k == 1
        ]
        c["transformer_options"] = transformer_options
        if control is not None:
            c["control"] = control.get_control(input_x, timestep_, c.copy(), batch_chunks)
            c["control_model"] = control
        if "model_function_wrapper" in model_options:
            output = model_options["model_function_wrapper"](
                model.apply_model,
                {"input": input_x, "timestep": timestep_, "c": c, "cond_or_uncond": cond_or_uncond},
            ).chunk(batch_chunks)
        else:
            output = model.apply_model(input_x, timestep_, **c).chunk(batch_chunks)
        for o in range(batch_chunks):
            if cond_or_uncond[o] == COND:
                out_cond += output[o] * mult[o]
                out_count += mult[o]
            else:
                out_uncond += output[o] * mult[o]
                out_uncond_count += mult[o]
    return out_cond / out_count, out_uncond / out_uncond_count


def sampling_function_inner(
    model,
    x,
    timestep,
    uncond,
    cond,
    cond_scale,
    model_options={},  # noqa: B006 -- Forge's signature
    seed=None,
    return_full=False,
):
    if math.isclose(cond_scale, 1.0) and not model_options.get("disable_cfg1_optimization", False):
        uncond_ = None
    else:
        uncond_ = uncond
    cond_pred, uncond_pred = calc_cond_uncond_batch(model, cond, uncond_, x, timestep, model_options)
    cfg_result = uncond_pred + (cond_pred - uncond_pred) * cond_scale
    for fn in model_options.get("sampler_post_cfg_function", []):
        cfg_result = fn(
            {
                "denoised": cfg_result,
                "cond_denoised": cond_pred,
                "uncond_denoised": uncond_pred,
                "sigma": timestep,
                "input": x,
                "model": model,
                "model_options": model_options,
            }
        )
    return (cfg_result, cond_pred, uncond_pred) if return_full else cfg_result


def sampling_function(self, denoiser_params, cond_scale, cond_composition):
    unet_patcher = self.inner_model.inner_model.forge_objects.unet
    model = unet_patcher.model
    x, timestep = denoiser_params.x, denoiser_params.sigma
    uncond = compile_conditions(denoiser_params.text_uncond)
    cond = compile_weighted_conditions(denoiser_params.text_cond, cond_composition)
    if (
        model.diffusion_model.config.in_channels > x.shape[1]
    ):  # inpainting: the image conditioning as c_concat
        for entry in cond + uncond:
            entry["model_conds"]["c_concat"] = denoiser_params.image_cond
    model_options = dict(unet_patcher.model_options)
    model_options["fake_control"] = unet_patcher.controlnet_linked_list
    return sampling_function_inner(
        model, x, timestep, uncond, cond, cond_scale, model_options, return_full=True
    )


def sampling_prepare(unet, x):
    B, C, H, W = x.shape
    estimate = unet.model_options.get("memory_peak_estimation_modifier", unet.memory_required)
    memory_management.load_models_gpu(
        models=[unet] + unet.extra_model_patchers_during_sampling,
        memory_required=estimate([B * 2, C, H, W]),
        hard_memory_preservation=unet.extra_preserved_memory_during_sampling,
    )


def sampling_cleanup(unet):
    pass
