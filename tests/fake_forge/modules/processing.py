"""modules.processing (Forge): the A1111 flow plus Forge's forge_objects lifecycle. Each batch
starts from the original patchers, takes the LoRA-applied ones after extra networks, and every
sampling pass starts from a fresh shallow copy of those, right before process_before_every_sampling.
New Forge calls that hook three times with hires fix (once before the reset, on the first pass's
objects); old Forge once per pass."""

import torch
import torch.nn.functional as F
from modules import a1111_version, extra_networks, scripts, sd_samplers_kdiffusion, shared

_a1111 = a1111_version("processing")
Processed, create_infotext = _a1111.Processed, _a1111.create_infotext
StableDiffusionProcessing = _a1111.StableDiffusionProcessing
OLD_FORGE = False  # tag "previous": one process_before_every_sampling call for the hires pass


def _fresh_objects(p):
    p.sd_model.forge_objects = p.sd_model.forge_objects_after_applying_lora.shallow_copy()


class StableDiffusionProcessingTxt2Img(_a1111.StableDiffusionProcessingTxt2Img):
    def __init__(self, *args, hr_cfg=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.hr_cfg = self.cfg_scale if hr_cfg is None else hr_cfg

    def sample(self, conditioning, unconditional_conditioning, seeds):
        self.sampler = sd_samplers_kdiffusion.create_sampler(self.sampler_name, self.sd_model)
        x = self.noise((len(seeds), 4, self.height // 8, self.width // 8))
        _fresh_objects(self)
        self.scripts.process_before_every_sampling(
            self, x=x, noise=x, c=conditioning, uc=unconditional_conditioning
        )
        samples = self.sampler.sample(
            self, x, conditioning, unconditional_conditioning, image_conditioning=self.image_conditioning(x)
        )
        if not self.enable_hr or shared.state.interrupted:
            return samples
        self.is_hr_pass = True
        self.sampler = sd_samplers_kdiffusion.create_sampler(self.sampler_name, self.sd_model)
        samples = F.interpolate(samples, scale_factor=self.hr_scale, mode="nearest")
        noise = self.noise(samples.shape, offset=1)
        if not self.disable_extra_networks:
            extra_networks.activate(self, self.extra_network_data)
        self.calculate_hr_conds()
        self.scripts.before_hr(self)
        if not OLD_FORGE:  # new Forge: once more on the first pass's objects, whose changes are dropped
            self.scripts.process_before_every_sampling(
                self, x=samples, noise=noise, c=self.hr_c, uc=self.hr_uc
            )
        _fresh_objects(self)
        self.scripts.process_before_every_sampling(self, x=samples, noise=noise, c=self.hr_c, uc=self.hr_uc)
        samples = self.sampler.sample_img2img(
            self,
            samples,
            noise,
            self.hr_c,
            self.hr_uc,
            steps=self.hr_second_pass_steps or self.steps,
            image_conditioning=self.image_conditioning(samples),
        )
        self.is_hr_pass = False
        return samples


class StableDiffusionProcessingImg2Img(_a1111.StableDiffusionProcessingImg2Img):
    def sample(self, conditioning, unconditional_conditioning, seeds):
        self.image_cfg_scale = None  # Forge's init(): no instruct-pix2pix
        self.sampler = sd_samplers_kdiffusion.create_sampler(self.sampler_name, self.sd_model)
        x = self.init_latent.expand(len(seeds), -1, -1, -1)
        noise = self.noise(x.shape)
        _fresh_objects(self)
        self.scripts.process_before_every_sampling(
            self, x=x, noise=noise, c=conditioning, uc=unconditional_conditioning
        )
        image_conditioning = self.sd_model.image_conditioning(x, self.mask)
        return self.sampler.sample_img2img(
            self, x, noise, conditioning, unconditional_conditioning, image_conditioning=image_conditioning
        )


def process_images(p):
    """As Forge's process_images_inner: the batch loop runs under inference_mode."""
    p.setup_prompts()
    p.scripts.process(p)
    images, infotexts = [], []
    with torch.inference_mode():
        for n in range(p.n_iter):
            p.iteration = n
            if shared.state.interrupted:
                break
            p.sd_model.forge_objects = p.sd_model.forge_objects_original.shallow_copy()
            sl = slice(n * p.batch_size, (n + 1) * p.batch_size)
            p.prompts, p.negative_prompts, p.seeds = (
                p.all_prompts[sl],
                p.all_negative_prompts[sl],
                p.all_seeds[sl],
            )
            p.scripts.before_process_batch(
                p, batch_number=n, prompts=p.prompts, seeds=p.seeds, subseeds=p.seeds
            )
            p.parse_extra_network_prompts()
            if not p.disable_extra_networks:
                extra_networks.activate(p, p.extra_network_data)
            _fresh_objects(p)
            p.scripts.process_batch(p, batch_number=n, prompts=p.prompts, seeds=p.seeds, subseeds=p.seeds)
            p.setup_conds()
            samples = p.sample(conditioning=p.c, unconditional_conditioning=p.uc, seeds=p.seeds)
            p.scripts.postprocess_batch(p, samples, batch_number=n)
            for i in range(samples.shape[0]):
                p.scripts.postprocess_image(p, scripts.PostprocessImageArgs(samples[i]))
                images.append(samples[i])
                infotexts.append(create_infotext(p, n * p.batch_size + i))
    if not p.disable_extra_networks and p.extra_network_data:
        extra_networks.deactivate(p, p.extra_network_data)
    res = Processed(p, images, infotexts)
    p.scripts.postprocess(p, res)
    return res
