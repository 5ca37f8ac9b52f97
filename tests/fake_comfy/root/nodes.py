"""nodes.py: the built-in nodes the example workflows use, custom-node loading (a folder's
``__init__.py`` imported under its path's name, its NODE_CLASS_MAPPINGS / NODE_DISPLAY_NAME_MAPPINGS
merged into these), and ``execute``: an API-format prompt run node by node (links are
``[node_id, output_index]``), each choice input checked against the node's INPUT_TYPES."""

from __future__ import annotations

import importlib.util
import os
import sys

import comfy.model_management
import comfy.samplers
import comfy.sd
import comfy.utils
import folder_paths
import torch
import torch.nn.functional as F

CHECKPOINTS: dict[str, tuple] = {}  # name -> (MODEL, CLIP, VAE): what the test installed
CONTROLNETS: dict[str, object] = {}
MAX_RESOLUTION = 16384


class CheckpointLoaderSimple:
    RETURN_TYPES, FUNCTION = ("MODEL", "CLIP", "VAE"), "load_checkpoint"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"ckpt_name": (sorted(CHECKPOINTS),)}}

    def load_checkpoint(self, ckpt_name):
        return CHECKPOINTS[ckpt_name]


class LoraLoader:
    RETURN_TYPES, FUNCTION = ("MODEL", "CLIP"), "load_lora"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "clip": ("CLIP",),
                "lora_name": (folder_paths.get_filename_list("loras"),),
                "strength_model": ("FLOAT",),
                "strength_clip": ("FLOAT",),
            }
        }

    def load_lora(self, model, clip, lora_name, strength_model, strength_clip):
        lora = comfy.utils.load_torch_file(
            folder_paths.get_full_path_or_raise("loras", lora_name), safe_load=True
        )
        return comfy.sd.load_lora_for_models(model, clip, lora, strength_model, strength_clip)


class CLIPTextEncode:
    RETURN_TYPES, FUNCTION = ("CONDITIONING",), "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING",), "clip": ("CLIP",)}}

    def encode(self, clip, text):
        cond, pooled = clip.encode(text)
        return ([[cond, {"pooled_output": pooled}]],)


def _with(conditioning, **values):
    return [[t, {**d, **values}] for t, d in conditioning]


class ConditioningCombine:
    RETURN_TYPES, FUNCTION = ("CONDITIONING",), "combine"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conditioning_1": ("CONDITIONING",), "conditioning_2": ("CONDITIONING",)}}

    def combine(self, conditioning_1, conditioning_2):
        return (conditioning_1 + conditioning_2,)


class ConditioningSetArea:
    RETURN_TYPES, FUNCTION = ("CONDITIONING",), "append"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "conditioning": ("CONDITIONING",),
                "width": ("INT",),
                "height": ("INT",),
                "x": ("INT",),
                "y": ("INT",),
                "strength": ("FLOAT",),
            }
        }

    def append(self, conditioning, width, height, x, y, strength):
        return (
            _with(
                conditioning,
                area=(height // 8, width // 8, y // 8, x // 8),
                strength=strength,
                set_area_to_bounds=False,
            ),
        )


class ConditioningSetMask:
    RETURN_TYPES, FUNCTION = ("CONDITIONING",), "append"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "conditioning": ("CONDITIONING",),
                "mask": ("MASK",),
                "strength": ("FLOAT",),
                "set_cond_area": (["default", "mask bounds"],),
            }
        }

    def append(self, conditioning, mask, set_cond_area, strength):
        return (_with(conditioning, mask=mask if mask.ndim == 3 else mask[None], mask_strength=strength),)


class SolidMask:
    RETURN_TYPES, FUNCTION = ("MASK",), "solid"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("FLOAT",), "width": ("INT",), "height": ("INT",)}}

    def solid(self, value, width, height):
        mask = torch.full((1, height, width), float(value))
        mask[:, : height // 2] = 0.0  # the fake's solid mask covers the lower half: a real region
        return (mask,)


class FakeControlNet:
    """A ControlNet's part in calc_cond_batch: get_control(x_noisy, t, cond, batched_number,
    transformer_options) -> residuals with one row per row of the call."""

    def __init__(self, hint, strength):
        self.hint, self.strength = hint, strength

    def get_control(self, x_noisy, t, cond, batched_number, transformer_options):
        hint = F.adaptive_avg_pool2d(self.hint.movedim(-1, 1).mean(1, keepdim=True), x_noisy.shape[2:])
        return {
            "output": [self.strength * (0.05 * x_noisy.flip(-1) + 0.1 * hint.to(x_noisy))],
            "middle": [None],
        }


class ControlNetLoader:
    RETURN_TYPES, FUNCTION = ("CONTROL_NET",), "load_controlnet"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"control_net_name": (sorted(CONTROLNETS) or ["none"],)}}

    def load_controlnet(self, control_net_name):
        return (control_net_name,)


class ControlNetApply:
    RETURN_TYPES, FUNCTION = ("CONDITIONING",), "apply_controlnet"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "conditioning": ("CONDITIONING",),
                "control_net": ("CONTROL_NET",),
                "image": ("IMAGE",),
                "strength": ("FLOAT",),
            }
        }

    def apply_controlnet(self, conditioning, control_net, image, strength):
        return (_with(conditioning, control=FakeControlNet(image, strength)),)


class EmptyLatentImage:
    RETURN_TYPES, FUNCTION = ("LATENT",), "generate"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"width": ("INT",), "height": ("INT",), "batch_size": ("INT",)}}

    def generate(self, width, height, batch_size=1):
        return ({"samples": torch.zeros([batch_size, 4, height // 8, width // 8])},)


class FakeVAE:
    """Pixels <-> latent by a fixed map: 8x8 blocks, three channels (a test stand-in for a VAE)."""

    def decode(self, samples):
        return (
            ((samples[:, :3].tanh() + 1) / 2).repeat_interleave(8, 2).repeat_interleave(8, 3).movedim(1, -1)
        )

    def encode(self, pixels):
        blocks = F.avg_pool2d(pixels.movedim(-1, 1) * 2 - 1, 8).clamp(-0.99, 0.99).atanh()
        return torch.cat([blocks, blocks.mean(1, keepdim=True)], 1)


class VAEDecode:
    RETURN_TYPES, FUNCTION = ("IMAGE",), "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "vae": ("VAE",)}}

    def decode(self, vae, samples):
        return (vae.decode(samples["samples"]),)


class VAEEncode:
    RETURN_TYPES, FUNCTION = ("LATENT",), "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"pixels": ("IMAGE",), "vae": ("VAE",)}}

    def encode(self, vae, pixels):
        return ({"samples": vae.encode(pixels)},)


class SetLatentNoiseMask:
    RETURN_TYPES, FUNCTION = ("LATENT",), "set_mask"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "mask": ("MASK",)}}

    def set_mask(self, samples, mask):
        return ({**samples, "noise_mask": mask.reshape((-1, 1, mask.shape[-2], mask.shape[-1]))},)


class LoadImage:
    RETURN_TYPES, FUNCTION = ("IMAGE", "MASK"), "load_image"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("STRING",)}}

    def load_image(self, image):
        g = torch.Generator().manual_seed(sum(map(ord, image)))
        return torch.rand(1, 64, 64, 3, generator=g), torch.zeros(1, 64, 64)


def prepare_noise(latent_image, seed):
    generator = torch.manual_seed(seed)
    return torch.randn(
        latent_image.size(), dtype=latent_image.dtype, layout=latent_image.layout, generator=generator
    )


def _callback(step, x0, x, total_steps):
    comfy.model_management.throw_exception_if_processing_interrupted()  # the server's progress hook


def common_ksampler(
    model,
    seed,
    steps,
    cfg,
    sampler_name,
    scheduler,
    positive,
    negative,
    latent,
    denoise=1.0,
    disable_noise=False,
    start_step=None,
    last_step=None,
    force_full_denoise=False,
    sigmas=None,
):
    latent_image = latent["samples"]
    noise = torch.zeros_like(latent_image) if disable_noise else prepare_noise(latent_image, seed)
    sampling = model.model.model_sampling
    if sigmas is None:
        total = steps if denoise >= 0.9999 else int(steps / denoise)
        sigmas = comfy.samplers.calculate_sigmas(sampling, scheduler, total)[-(steps + 1) :]
        if last_step is not None and last_step < len(sigmas) - 1:
            sigmas = sigmas[: last_step + 1]
            if force_full_denoise:
                sigmas[-1] = 0
        if start_step is not None:
            sigmas = sigmas[start_step:]
    mask = latent.get("noise_mask")
    if mask is not None:
        mask = F.interpolate(
            mask.reshape(-1, 1, *mask.shape[-2:]), size=latent_image.shape[2:], mode="bilinear"
        )
    samples = comfy.samplers.sample(
        model,
        noise,
        positive,
        negative,
        cfg,
        sampler_name,
        sigmas,
        latent_image,
        seed,
        denoise_mask=mask,
        callback=_callback,
    )
    return ({**latent, "samples": samples},)


class KSampler:
    RETURN_TYPES, FUNCTION = ("LATENT",), "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "seed": ("INT",),
                "steps": ("INT",),
                "cfg": ("FLOAT",),
                "sampler_name": (comfy.samplers.SAMPLER_NAMES,),
                "scheduler": (comfy.samplers.SCHEDULER_NAMES,),
                "positive": ("CONDITIONING",),
                "negative": ("CONDITIONING",),
                "latent_image": ("LATENT",),
                "denoise": ("FLOAT",),
            }
        }

    def sample(
        self, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise=1.0
    ):
        return common_ksampler(
            model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise
        )


class KSamplerAdvanced:
    RETURN_TYPES, FUNCTION = ("LATENT",), "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "add_noise": (["enable", "disable"],),
                "noise_seed": ("INT",),
                "steps": ("INT",),
                "cfg": ("FLOAT",),
                "sampler_name": (comfy.samplers.SAMPLER_NAMES,),
                "scheduler": (comfy.samplers.SCHEDULER_NAMES,),
                "positive": ("CONDITIONING",),
                "negative": ("CONDITIONING",),
                "latent_image": ("LATENT",),
                "start_at_step": ("INT",),
                "end_at_step": ("INT",),
                "return_with_leftover_noise": (["disable", "enable"],),
            }
        }

    def sample(
        self,
        model,
        add_noise,
        noise_seed,
        steps,
        cfg,
        sampler_name,
        scheduler,
        positive,
        negative,
        latent_image,
        start_at_step,
        end_at_step,
        return_with_leftover_noise,
        denoise=1.0,
    ):
        return common_ksampler(
            model,
            noise_seed,
            steps,
            cfg,
            sampler_name,
            scheduler,
            positive,
            negative,
            latent_image,
            denoise=denoise,
            disable_noise=add_noise == "disable",
            start_step=start_at_step,
            last_step=end_at_step,
            force_full_denoise=return_with_leftover_noise != "enable",
        )


class KSamplerSelect:
    RETURN_TYPES, FUNCTION = ("SAMPLER",), "get_sampler"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"sampler_name": (comfy.samplers.SAMPLER_NAMES,)}}

    def get_sampler(self, sampler_name):
        return (sampler_name,)


class BasicScheduler:
    RETURN_TYPES, FUNCTION = ("SIGMAS",), "get_sigmas"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "scheduler": (comfy.samplers.SCHEDULER_NAMES,),
                "steps": ("INT",),
                "denoise": ("FLOAT",),
            }
        }

    def get_sigmas(self, model, scheduler, steps, denoise):
        total = steps if denoise >= 1.0 else int(steps / denoise)
        return (
            comfy.samplers.calculate_sigmas(model.model.model_sampling, scheduler, total)[-(steps + 1) :],
        )


class SamplerCustom:
    RETURN_TYPES, FUNCTION = ("LATENT", "LATENT"), "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "add_noise": ("BOOLEAN",),
                "noise_seed": ("INT",),
                "cfg": ("FLOAT",),
                "positive": ("CONDITIONING",),
                "negative": ("CONDITIONING",),
                "sampler": ("SAMPLER",),
                "sigmas": ("SIGMAS",),
                "latent_image": ("LATENT",),
            }
        }

    def sample(self, model, add_noise, noise_seed, cfg, positive, negative, sampler, sigmas, latent_image):
        out = common_ksampler(
            model,
            noise_seed,
            len(sigmas) - 1,
            cfg,
            sampler,
            None,
            positive,
            negative,
            latent_image,
            disable_noise=not add_noise,
            sigmas=sigmas,
        )[0]
        return out, out


class SaveImage:
    RETURN_TYPES, FUNCTION, OUTPUT_NODE = (), "save_images", True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",), "filename_prefix": ("STRING",)}}

    def save_images(self, images, filename_prefix="ComfyUI"):
        SAVED.setdefault(filename_prefix, []).append(images)
        return ()


SAVED: dict[str, list] = {}
NODE_CLASS_MAPPINGS = {
    name: cls for name, cls in list(globals().items()) if isinstance(cls, type) and hasattr(cls, "FUNCTION")
}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}


def load_custom_node(module_path: str) -> bool:
    """As ComfyUI's: the folder's __init__.py imported under the path's name, its mappings merged."""
    sys_module_name = module_path.replace(".", "_x_")
    spec = importlib.util.spec_from_file_location(sys_module_name, os.path.join(module_path, "__init__.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[sys_module_name] = module
    spec.loader.exec_module(module)
    if getattr(module, "NODE_CLASS_MAPPINGS", None) is None:
        return False
    NODE_CLASS_MAPPINGS.update(module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(getattr(module, "NODE_DISPLAY_NAME_MAPPINGS", {}) or {})
    return True


def execute(prompt: dict) -> dict:
    """Run an API-format prompt: every output node and what it needs; each node once. Returns the
    outputs of every node run (node id -> tuple)."""
    done: dict[str, tuple] = {}

    def run(node_id: str) -> tuple:
        if node_id in done:
            return done[node_id]
        node = prompt[node_id]
        cls = NODE_CLASS_MAPPINGS[node["class_type"]]
        types = cls.INPUT_TYPES()
        kinds = {**types.get("required", {}), **types.get("optional", {})}
        inputs = {}
        for name, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                value = run(value[0])[value[1]]
            elif name in kinds and isinstance(kinds[name][0], list) and value not in kinds[name][0]:
                raise ValueError(
                    f"node {node_id} ({node['class_type']}): {name}={value!r} is not one of {kinds[name][0]}"
                )
            inputs[name] = value
        with torch.inference_mode():
            done[node_id] = tuple(getattr(cls(), cls.FUNCTION)(**inputs))
        return done[node_id]

    for node_id, node in prompt.items():
        if getattr(NODE_CLASS_MAPPINGS[node["class_type"]], "OUTPUT_NODE", False):
            run(node_id)
    return done
