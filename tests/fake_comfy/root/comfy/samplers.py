"""comfy/samplers.py: the conds' areas and masks, calc_cond_batch (chunks batched while they fit in
free memory, the list reversed so the uncond chunk comes first, the model_function_wrapper called
with apply_model and {"input", "timestep", "c", "cond_or_uncond"}, outputs summed by mult per
branch), the CALC_COND_BATCH wrappers, sampling_function (CFG 1 skips the uncond), KSampler's
samplers and schedulers, inpainting through the noise mask."""

from __future__ import annotations

import collections
import math
import uuid

import torch

import comfy.model_management as model_management
import comfy.patcher_extension

SAMPLER_NAMES = ["euler", "euler_ancestral", "heun", "dpmpp_2m"]
SCHEDULER_NAMES = ["normal", "karras", "simple"]


def get_area_and_mult(conds, x_in, timestep_in):
    dims = tuple(x_in.shape[2:])
    area, strength = None, conds.get("strength", 1.0)
    if "timestep_start" in conds and timestep_in[0] > conds["timestep_start"]:
        return None
    if "timestep_end" in conds and timestep_in[0] < conds["timestep_end"]:
        return None
    input_x = x_in
    if "area" in conds:
        area = list(conds["area"])  # (h, w, y, x) in latent pixels
        for i in range(len(dims)):
            area[i] = min(input_x.shape[i + 2] - area[len(dims) + i], area[i])
            input_x = input_x.narrow(i + 2, area[len(dims) + i], area[i])
    if "mask" in conds:
        mask = conds["mask"][: input_x.shape[0]] * conds.get("mask_strength", 1.0)
        if area is not None:
            for i in range(len(dims)):
                mask = mask.narrow(i + 1, area[len(dims) + i], area[i])
        mask = mask.unsqueeze(1).repeat((input_x.shape[0] // mask.shape[0], input_x.shape[1], 1, 1))
    else:
        mask = torch.ones_like(input_x)
    mult = mask * strength
    conditioning = {
        k: v.process_cond(batch_size=x_in.shape[0], area=area) for k, v in conds["model_conds"].items()
    }
    cond_obj = collections.namedtuple(
        "cond_obj", ["input_x", "mult", "conditioning", "area", "control", "uuid"]
    )
    return cond_obj(input_x, mult, conditioning, area, conds.get("control"), conds["uuid"])


def can_concat_cond(c1, c2):
    if c1.input_x.shape != c2.input_x.shape:
        return False
    if (c1.control is None) != (c2.control is None) or (
        c1.control is not None and c1.control is not c2.control
    ):
        return False
    if c1.conditioning.keys() != c2.conditioning.keys():
        return False
    return all(c1.conditioning[k].can_concat(c2.conditioning[k]) for k in c1.conditioning)


def cond_cat(c_list):
    temp = {}
    for x in c_list:
        for k in x:
            temp.setdefault(k, []).append(x[k])
    return {k: conds[0].concat(conds[1:]) for k, conds in temp.items()}


def calc_cond_batch(model, conds, x_in, timestep, model_options):
    executor = comfy.patcher_extension.WrapperExecutor.new_executor(
        _calc_cond_batch,
        comfy.patcher_extension.get_all_wrappers(
            comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, model_options, is_model_options=True
        ),
    )
    return executor.execute(model, conds, x_in, timestep, model_options)


def _batch_that_fits(model, to_run, first_shape):
    to_batch_temp = [x for x in range(len(to_run)) if can_concat_cond(to_run[x][0], to_run[0][0])]
    to_batch_temp.reverse()
    to_batch = to_batch_temp[:1]
    free_memory = model_management.get_free_memory()
    for i in range(1, len(to_batch_temp) + 1):
        batch_amount = to_batch_temp[: len(to_batch_temp) // i]
        input_shape = [len(batch_amount) * first_shape[0]] + list(first_shape)[1:]
        if model.memory_required(input_shape) * 1.5 < free_memory:
            return batch_amount
    return to_batch


def _calc_cond_batch(model, conds, x_in, timestep, model_options):
    out_conds = [torch.zeros_like(x_in) for _ in conds]
    out_counts = [torch.ones_like(x_in) * 1e-37 for _ in conds]
    to_run = []
    for i, cond in enumerate(conds):
        for x in cond or []:
            p = get_area_and_mult(x, x_in, timestep)
            if p is not None:
                to_run.append((p, i))
    while to_run:
        to_batch = _batch_that_fits(model, to_run, to_run[0][0].input_x.shape)
        input_x, mult, c, cond_or_uncond, uuids, area = [], [], [], [], [], []
        control = None
        for x in to_batch:
            p, index = to_run.pop(x)
            input_x.append(p.input_x)
            mult.append(p.mult)
            c.append(p.conditioning)
            area.append(p.area)
            cond_or_uncond.append(index)
            uuids.append(p.uuid)
            control = p.control
        batch_chunks = len(cond_or_uncond)
        input_x = torch.cat(input_x)
        c = cond_cat(c)
        timestep_ = torch.cat([timestep] * batch_chunks)
        transformer_options = comfy.patcher_extension.merge_nested_dicts(
            {}, model_options.get("transformer_options", {})
        )
        transformer_options["cond_or_uncond"] = cond_or_uncond[:]
        transformer_options["uuids"] = uuids[:]
        transformer_options["sigmas"] = timestep
        c["transformer_options"] = transformer_options
        if control is not None:
            c["control"] = control.get_control(
                input_x, timestep_, c, len(cond_or_uncond), transformer_options
            )
        if "model_function_wrapper" in model_options:
            output = model_options["model_function_wrapper"](
                model.apply_model,
                {"input": input_x, "timestep": timestep_, "c": c, "cond_or_uncond": cond_or_uncond},
            ).chunk(batch_chunks)
        else:
            output = model.apply_model(input_x, timestep_, **c).chunk(batch_chunks)
        for o in range(batch_chunks):
            out_c, out_cts = out_conds[cond_or_uncond[o]], out_counts[cond_or_uncond[o]]
            a = area[o]
            if a is not None:
                dims = len(a) // 2
                for i in range(dims):
                    out_c = out_c.narrow(i + 2, a[i + dims], a[i])
                    out_cts = out_cts.narrow(i + 2, a[i + dims], a[i])
            out_c += output[o] * mult[o]
            out_cts += mult[o]
    return [out / count for out, count in zip(out_conds, out_counts, strict=True)]


def sampling_function(model, x, timestep, uncond, cond, cond_scale, model_options=None, seed=None):
    model_options = model_options or {}
    uncond_ = None if math.isclose(cond_scale, 1.0) else uncond
    out = calc_cond_batch(model, [cond, uncond_], x, timestep, model_options)
    if uncond_ is None:
        return out[0]
    return out[1] + (out[0] - out[1]) * cond_scale


# --- conds, schedulers, samplers --------------------------------------------------------------------


def encode_model_conds(model, conds, noise, concat=None):
    out = []
    for cond, extra in conds:
        entry = {k: v for k, v in extra.items() if k != "pooled_output"}
        entry["model_conds"] = model.extra_conds(cond, extra.get("pooled_output"), noise.shape[0], concat)
        entry["uuid"] = uuid.uuid4()
        if "mask" in entry:  # resized to the latent as ComfyUI's resolve_areas_and_cond_masks does
            mask = entry["mask"]
            mask = mask if mask.ndim == 3 else mask.unsqueeze(0)
            entry["mask"] = torch.nn.functional.interpolate(
                mask[:, None], size=noise.shape[2:], mode="bilinear"
            )[:, 0]
        if "area" in entry and entry["area"][0] == "percentage":
            raise NotImplementedError("percentage areas")
        out.append(entry)
    return out


def _inside(area, outer) -> bool:
    dims = len(area) // 2
    return all(area[dims + i] >= outer[dims + i] for i in range(dims)) and all(
        area[i] + area[dims + i] <= outer[i] + outer[dims + i] for i in range(dims)
    )


def create_cond_with_same_area_if_none(conds, c):
    """process_conds: every area of one branch gets one in the other, unless the other already has
    exactly that area as the smallest one containing it: a copy of ``c`` (its uuid included) with
    the model conds of the other branch's smallest cond containing it (or of one without area)."""
    if "area" not in c:
        return
    smallest = None
    for x in conds:
        if "area" in x:
            if _inside(c["area"], x["area"]) and (
                smallest is None
                or "area" not in smallest
                or math.prod(smallest["area"][: len(smallest["area"]) // 2])
                > math.prod(x["area"][: len(x["area"]) // 2])
            ):
                smallest = x
        elif smallest is None:
            smallest = x
    if smallest is None or ("area" in smallest and smallest["area"] == c["area"]):
        return
    out = c.copy()
    out["model_conds"] = smallest["model_conds"].copy()
    conds.append(out)


def calculate_sigmas(model_sampling, scheduler_name, steps):
    if scheduler_name == "karras":
        lo, hi = float(model_sampling.sigma_min), float(model_sampling.sigma_max)
        ramp = torch.linspace(0, 1, steps)
        sigmas = (hi ** (1 / 7) + ramp * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7
        return torch.cat([sigmas, sigmas.new_zeros(1)]).float()
    if scheduler_name == "simple":
        s = model_sampling.sigmas
        ss = len(s) / steps
        return torch.FloatTensor([float(s[-(1 + int(x * ss))]) for x in range(steps)] + [0.0])
    ts = torch.linspace(len(model_sampling.sigmas) - 1, 0, steps)
    return torch.cat([model_sampling.sigma(ts), torch.zeros(1)]).float()


def _to_d(x, sigma, denoised):
    return (x - denoised) / sigma


@torch.no_grad()
def run_sampler(name, model, x, sigmas, callback, generator):
    s_in = x.new_ones([x.shape[0]])
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        if callback is not None:
            callback(i, denoised, x, len(sigmas) - 1)
        if name == "heun" and sigmas[i + 1] > 0:
            d = _to_d(x, sigmas[i], denoised)
            x_2 = x + d * (sigmas[i + 1] - sigmas[i])
            d_2 = _to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1] * s_in))
            x = x + (d + d_2) / 2 * (sigmas[i + 1] - sigmas[i])
        elif name == "euler_ancestral":
            up = min(
                float(sigmas[i + 1]),
                float((sigmas[i + 1] ** 2 * (sigmas[i] ** 2 - sigmas[i + 1] ** 2) / sigmas[i] ** 2) ** 0.5),
            )
            down = float((sigmas[i + 1] ** 2 - up**2) ** 0.5)
            x = x + _to_d(x, sigmas[i], denoised) * (down - sigmas[i])
            if sigmas[i + 1] > 0:
                x = x + torch.randn(x.shape, generator=generator) * up
        elif name == "dpmpp_2m" and old_denoised is not None and sigmas[i + 1] > 0:
            t, t_next, t_prev = (-sigmas[j].log() for j in (i, i + 1, i - 1))
            h, r = t_next - t, (t - t_prev) / (t_next - t)
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigmas[i + 1] / sigmas[i]) * x - (-h).expm1() * denoised_d
        else:
            x = x + _to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
        old_denoised = denoised
    return x


def sample(
    model_patcher,
    noise,
    positive,
    negative,
    cfg,
    sampler_name,
    sigmas,
    latent_image,
    seed,
    denoise_mask=None,
    callback=None,
):
    """CFGGuider.sample + inner_sample: conds encoded, sample_sigmas put in a copy of the model
    options, every model call through sampling_function; the inpainting mask as KSamplerX0Inpaint."""
    import comfy.model_patcher

    model_management.load_models_gpu([model_patcher])
    model = model_patcher.model
    concat = None
    if model.inpaint:  # concat_cond: the noise mask (ones without one), then the latent image
        mask = denoise_mask if denoise_mask is not None else torch.ones_like(latent_image[:, :1])
        concat = torch.cat([mask.expand(latent_image.shape[0], 1, *latent_image.shape[2:]), latent_image], 1)
    pos = encode_model_conds(model, positive, noise, concat)
    neg = encode_model_conds(model, negative, noise, concat)
    for ours, theirs in ((pos, neg), (neg, pos)):
        for c in list(ours):
            create_cond_with_same_area_if_none(theirs, c)
    options = comfy.model_patcher.create_model_options_clone(model_patcher.model_options)
    options.setdefault("transformer_options", {})["sample_sigmas"] = sigmas
    sampling = model.model_sampling

    def denoiser(x, sigma):
        if denoise_mask is not None:
            x = x * denoise_mask + sampling.noise_scaling(sigma.view(-1, 1, 1, 1), noise, latent_image) * (
                1 - denoise_mask
            )
        out = sampling_function(model, x, sigma, neg, pos, cfg, options, seed)
        return out * denoise_mask + latent_image * (1 - denoise_mask) if denoise_mask is not None else out

    x = sampling.noise_scaling(sigmas[0], noise, latent_image)
    generator = torch.Generator().manual_seed(seed + 1)
    return run_sampler(sampler_name, denoiser, x, sigmas, callback, generator)
