"""backend.sampling.sampling_function: Forge's CFG in x0 space. The conditions are compiled into
Condition objects (crossattn ones concatenate across token lengths by repeating to their lcm);
calc_cond_uncond_batch groups the chunks that concatenate with the first, reverses them (uncond
first) and runs as many per call as the memory check allows (``model.memory_required`` of the
batch against ``memory_management.get_free_memory``), each call through model_options'
model_function_wrapper(apply_model, {input, timestep, c, cond_or_uncond}); the wrapper returns x0.
Pre-CFG functions see (and may replace) the compiled conds first."""

import math

import torch
from backend import memory_management


def _lcm(a, b):
    return abs(a * b) // math.gcd(a, b)


class Condition:
    def __init__(self, cond):
        self.cond = cond

    def process_cond(self, batch_size, device, **kwargs):
        return self.__class__(self.cond.to(device))  # the batch already matches: no repeat needed here

    def can_concat(self, other):
        return self.cond.shape == other.cond.shape

    def concat(self, others):
        return torch.cat([self.cond] + [x.cond for x in others])


class ConditionCrossAttn(Condition):
    def can_concat(self, other):
        s1, s2 = self.cond.shape, other.cond.shape
        if s1 != s2:
            if s1[0] != s2[0] or s1[2] != s2[2]:
                return False
            if _lcm(s1[1], s2[1]) // min(s1[1], s2[1]) > 4:
                return False
        return True

    def concat(self, others):
        conds = [self.cond] + [x.cond for x in others]
        longest = self.cond.shape[1]
        for c in conds[1:]:
            longest = _lcm(longest, c.shape[1])
        return torch.cat(
            [c.repeat(1, longest // c.shape[1], 1) if c.shape[1] < longest else c for c in conds]
        )


def compile_conditions(cond):
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        return [{"cross_attn": cond, "model_conds": {"c_crossattn": ConditionCrossAttn(cond)}}]
    model_conds = {"c_crossattn": ConditionCrossAttn(cond["crossattn"]), "y": Condition(cond["vector"])}
    return [{"cross_attn": cond["crossattn"], "pooled_output": cond["vector"], "model_conds": model_conds}]


def compile_weighted_conditions(cond, weights):
    """One entry per AND sub-prompt index j: the j-th sub-prompt's rows of every image."""
    results = []
    for cond_pre in map(list, zip(*weights, strict=False)):  # ragged AND lists truncate, as in Forge
        indices = [i for i, _ in cond_pre]
        feed = {k: v[indices] for k, v in cond.items()} if isinstance(cond, dict) else cond[indices]
        entry = compile_conditions(feed)[0]
        entry["strength"] = cond_pre[-1][1]
        results.append(entry)
    return results


def _area_and_mult(entry, x_in):
    """get_area_and_mult without areas, masks or timestep ranges (the WebUI sets none)."""
    conditioning = {
        k: c.process_cond(batch_size=x_in.shape[0], device=x_in.device)
        for k, c in entry["model_conds"].items()
    }
    return {
        "input_x": x_in,
        "mult": torch.ones_like(x_in) * entry.get("strength", 1.0),
        "conditioning": conditioning,
        "control": entry.get("control"),
    }


def _can_concat_cond(c1, c2):
    if c1["input_x"].shape != c2["input_x"].shape or c1["control"] is not c2["control"]:
        return False
    a, b = c1["conditioning"], c2["conditioning"]
    return a.keys() == b.keys() and all(a[k].can_concat(b[k]) for k in a)


def cond_cat(c_list):
    return {key: c_list[0][key].concat([c[key] for c in c_list[1:]]) for key in c_list[0]}


def calc_cond_uncond_batch(model, cond, uncond, x_in, timestep, model_options):
    out_cond, out_count = torch.zeros_like(x_in), torch.ones_like(x_in) * 1e-37
    out_uncond, out_uncond_count = torch.zeros_like(x_in), torch.ones_like(x_in) * 1e-37
    COND, UNCOND = 0, 1
    to_run = [(_area_and_mult(entry, x_in), COND) for entry in cond]
    if uncond is not None:
        to_run += [(_area_and_mult(entry, x_in), UNCOND) for entry in uncond]
    while to_run:
        first = to_run[0]
        first_shape = first[0]["input_x"].shape
        to_batch_temp = [x for x in range(len(to_run)) if _can_concat_cond(to_run[x][0], first[0])]
        to_batch_temp.reverse()
        to_batch = to_batch_temp[:1]
        free_memory = memory_management.get_free_memory(x_in.device)
        for i in range(1, len(to_batch_temp) + 1):
            batch_amount = to_batch_temp[: len(to_batch_temp) // i]
            input_shape = [len(batch_amount) * first_shape[0]] + list(first_shape)[1:]
            if model.memory_required(input_shape) < free_memory:
                to_batch = batch_amount
                break
        input_x, mult, c, cond_or_uncond, control = [], [], [], [], None
        for x in to_batch:
            entry, kind = to_run.pop(x)
            input_x.append(entry["input_x"])
            mult.append(entry["mult"])
            c.append(entry["conditioning"])
            cond_or_uncond.append(kind)
            control = entry["control"]
        batch_chunks = len(cond_or_uncond)
        input_x = torch.cat(input_x)
        c = cond_cat(c)
        timestep_ = torch.cat([timestep] * batch_chunks)
        transformer_options = model_options.get("transformer_options", {}).copy()
        transformer_options["cond_or_uncond"] = cond_or_uncond[:]
        transformer_options["sigmas"] = timestep
        rows = timestep.shape[0]
        transformer_options["cond_mark"] = torch.tensor(cond_or_uncond).repeat_interleave(rows).float()
        transformer_options["cond_indices"] = [
            i * rows + r for i, k in enumerate(cond_or_uncond) for r in range(rows) if k == 0
        ]
        transformer_options["uncond_indices"] = [
            i * rows + r for i, k in enumerate(cond_or_uncond) for r in range(rows) if k == 1
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
    edit_strength = sum(item.get("strength", 1) for item in cond)
    if math.isclose(cond_scale, 1.0) and not model_options.get("disable_cfg1_optimization", False):
        uncond_ = None
    else:
        uncond_ = uncond
    for fn in model_options.get("sampler_pre_cfg_function", []):
        model, cond, uncond_, x, timestep, model_options = fn(
            model, cond, uncond_, x, timestep, model_options
        )
    cond_pred, uncond_pred = calc_cond_uncond_batch(model, cond, uncond_, x, timestep, model_options)
    if not math.isclose(edit_strength, 1.0):
        cfg_result = uncond_pred + (cond_pred - uncond_pred) * cond_scale * edit_strength
    else:
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
    control = unet_patcher.controlnet_linked_list
    x, timestep = denoiser_params.x, denoiser_params.sigma
    uncond = compile_conditions(denoiser_params.text_uncond)
    cond = compile_weighted_conditions(denoiser_params.text_cond, cond_composition)
    model_options = unet_patcher.model_options
    image_cond_in = denoiser_params.image_cond
    if (
        isinstance(image_cond_in, torch.Tensor)
        and image_cond_in.shape[0] == x.shape[0]
        and image_cond_in.shape[2:] == x.shape[2:]
    ):
        for entry in cond + uncond:
            entry["model_conds"]["c_concat"] = Condition(image_cond_in)
    if control is not None:
        for entry in cond + uncond:
            entry["control"] = control
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
