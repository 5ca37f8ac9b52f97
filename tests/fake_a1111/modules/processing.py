"""modules.processing: the per-batch order of hooks, extra networks, conds, sampling, hires, infotext,
and the grid A1111 puts before the images."""

import json
import math

import torch
import torch.nn.functional as F
from modules import extra_networks, prompt_parser, scripts, sd_samplers_kdiffusion, shared


class Processed:
    def __init__(self, p, images, infotexts, index_of_first_image=0):
        self.images, self.infotexts = images, infotexts
        self.extra_generation_params = p.extra_generation_params
        self.index_of_first_image = index_of_first_image
        self.comments = "".join(f"{comment}\n" for comment in p.comments)


class StableDiffusionProcessing:
    def __init__(
        self,
        sd_model=None,
        prompt="",
        negative_prompt="",
        seed=1,
        steps=4,
        cfg_scale=7.0,
        width=64,
        height=64,
        batch_size=1,
        n_iter=1,
        sampler_name="Euler",
        scripts=None,
        script_args=None,
        denoising_strength=0.6,
        s_min_uncond=None,
    ):
        self.sd_model = sd_model or shared.sd_model
        self.prompt, self.negative_prompt, self.seed = prompt, negative_prompt, seed
        self.steps, self.cfg_scale, self.width, self.height = steps, cfg_scale, width, height
        self.batch_size, self.n_iter, self.sampler_name = batch_size, n_iter, sampler_name
        self.scripts, self.script_args = scripts, tuple(script_args or ())
        self.denoising_strength = denoising_strength
        self.s_min_uncond = s_min_uncond if s_min_uncond is not None else shared.opts.s_min_uncond
        self.extra_generation_params = {}
        self.override_settings = {}
        self.is_hr_pass = False
        self.disable_extra_networks = False
        self.iteration = 0
        self.prompts = self.negative_prompts = self.seeds = None
        self.extra_network_data = None
        self.sampler = None
        self.do_not_save_grid = False
        self.comments = {}

    def comment(self, text):
        self.comments[text] = 1

    def setup_prompts(self):
        prompts = (
            self.prompt if isinstance(self.prompt, list) else [self.prompt] * (self.batch_size * self.n_iter)
        )
        self.all_prompts = prompts
        self.all_negative_prompts = [self.negative_prompt] * len(prompts)
        self.all_seeds = [self.seed + i for i in range(len(prompts))]

    def parse_extra_network_prompts(self):
        self.prompts, self.extra_network_data = extra_networks.parse_prompts(self.prompts)

    def setup_conds(self):
        self.c, self.uc = self._encode()

    def _encode(self):
        """(c, uc) of the prompts, as get_multicond_learned_conditioning / get_learned_conditioning."""
        model = self.sd_model
        subs = prompt_parser.get_multicond_prompt_list(self.prompts)
        flat = [s for sub in subs for s in sub]
        encoded = model.get_learned_conditioning(flat)
        rows, k = [], 0
        for sub in subs:
            rows.append([(_row(encoded, k + j), 1.0) for j in range(len(sub))])
            k += len(sub)
        c = prompt_parser.MulticondLearnedConditioning((len(self.prompts),), rows)
        negatives = model.get_learned_conditioning(self.negative_prompts)
        return c, [_row(negatives, i) for i in range(len(self.negative_prompts))]

    def noise(self, shape, offset=0):
        g = torch.Generator().manual_seed(self.seeds[0] + 1000 * offset)
        return torch.randn(shape, generator=g)


def _row(encoded, i):
    if isinstance(encoded, dict):
        return {key: value[i] for key, value in encoded.items()}
    return encoded[i]


class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    def __init__(self, *args, enable_hr=False, hr_scale=2.0, hr_second_pass_steps=0, **kwargs):
        super().__init__(*args, **kwargs)
        self.enable_hr, self.hr_scale, self.hr_second_pass_steps = enable_hr, hr_scale, hr_second_pass_steps

    def image_conditioning(self, x):
        return self.sd_model.image_conditioning(x, None)

    def setup_conds(self):
        if self.is_hr_pass:  # as A1111: in the hires pass only the hires conds are (re)made
            self.hr_c = None
            self.calculate_hr_conds()
            return
        super().setup_conds()
        self.hr_c = self.hr_uc = None
        if self.enable_hr:
            # as A1111 (hires_fix_use_firstpass_conds off): the hires conds under the hires prompt's
            # networks, then the first pass's networks activated again
            extra_networks.activate(self, self.extra_network_data)
            self.calculate_hr_conds()
            extra_networks.activate(self, self.extra_network_data)

    def calculate_hr_conds(self):
        if self.hr_c is not None:
            return
        self.hr_c, self.hr_uc = self._encode()

    def sample(self, conditioning, unconditional_conditioning, seeds):
        self.sampler = sd_samplers_kdiffusion.create_sampler(self.sampler_name, self.sd_model)
        x = self.noise((len(seeds), 4, self.height // 8, self.width // 8))
        self.scripts.process_before_every_sampling(
            self, x=x, noise=x, c=conditioning, uc=unconditional_conditioning
        )
        samples = self.sampler.sample(
            self, x, conditioning, unconditional_conditioning, image_conditioning=self.image_conditioning(x)
        )
        if not self.enable_hr:
            return samples
        if shared.state.interrupted:
            return samples
        self.is_hr_pass = True
        self.sampler = sd_samplers_kdiffusion.create_sampler(self.sampler_name, self.sd_model)
        samples = F.interpolate(samples, scale_factor=self.hr_scale, mode="nearest")
        noise = self.noise(samples.shape, offset=1)
        if not self.disable_extra_networks:
            extra_networks.activate(self, self.extra_network_data)
        self.calculate_hr_conds()
        self.scripts.before_hr(self)
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


class StableDiffusionProcessingImg2Img(StableDiffusionProcessing):
    def __init__(self, *args, init_latent=None, mask=None, image_cfg_scale=1.5, **kwargs):
        super().__init__(*args, **kwargs)
        self.init_latent, self.mask, self.image_cfg_scale = init_latent, mask, image_cfg_scale

    def sample(self, conditioning, unconditional_conditioning, seeds):
        # as init(): the Image CFG scale only counts for an edit (instruct-pix2pix) model
        self.image_cfg_scale = self.image_cfg_scale if shared.sd_model.cond_stage_key == "edit" else None
        self.sampler = sd_samplers_kdiffusion.create_sampler(self.sampler_name, self.sd_model)
        x = self.init_latent.expand(len(seeds), -1, -1, -1)
        noise = self.noise(x.shape)
        self.scripts.process_before_every_sampling(
            self, x=x, noise=noise, c=conditioning, uc=unconditional_conditioning
        )
        image_conditioning = self.sd_model.image_conditioning(x, self.mask)
        return self.sampler.sample_img2img(
            self, x, noise, conditioning, unconditional_conditioning, image_conditioning=image_conditioning
        )


LISTS_PER_IMAGE = True  # WebUI 1.10 takes a list value per image; before it (1.8: old Forge) it is written whole


def create_infotext(p, index):
    params = {
        "Steps": p.steps,
        "Sampler": p.sampler_name,
        "CFG scale": p.cfg_scale,
        "Seed": p.all_seeds[index],
        "Size": f"{p.width}x{p.height}",
        **p.extra_generation_params,
    }
    # as create_infotext (1.10): a list value holds one entry per image of the batch; 1.8 quotes it whole
    if LISTS_PER_IMAGE:
        params = {k: (v[index % len(v)] if isinstance(v, list) else v) for k, v in params.items()}
    else:
        params = {k: (json.dumps(v) if isinstance(v, list) else v) for k, v in params.items()}
    text = ", ".join(f"{k}: {v}" for k, v in params.items() if v is not None)
    return f"{p.all_prompts[index]}\nNegative prompt: {p.all_negative_prompts[index]}\n{text}"


def process_images(p):
    """As process_images_inner: no try/finally around sampling (an exception skips postprocess)."""
    p.setup_prompts()
    p.scripts.process(p)
    images, infotexts = [], []
    with torch.no_grad():
        for n in range(p.n_iter):
            p.iteration = n
            if shared.state.interrupted:
                break
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
    res = processed_with_grid(p, images, infotexts)
    p.scripts.postprocess(p, res)
    return res


def processed_with_grid(p, images, infotexts):
    """As the end of process_images_inner: with "return grid" on (A1111's default) and more than one
    image, the grid goes first, with its own infotext, and index_of_first_image says so."""
    opts = shared.opts
    index_of_first_image = 0
    unwanted = len(images) < 2 and opts.grid_only_if_multiple
    if opts.return_grid and not p.do_not_save_grid and not unwanted:
        infotexts.insert(0, create_infotext(p, 0))
        images.insert(0, image_grid(images, p.batch_size))
        index_of_first_image = 1
    return Processed(p, images, infotexts, index_of_first_image=index_of_first_image)


def image_grid(imgs, batch_size):
    """modules.images.image_grid with n_rows -1 (the default): round(sqrt(n)) rows, the images
    (latents here) tiled row by row."""
    rows = min(round(math.sqrt(len(imgs))), len(imgs))
    cols = math.ceil(len(imgs) / rows)
    channels, height, width = imgs[0].shape
    grid = imgs[0].new_zeros((channels, rows * height, cols * width))
    for i, img in enumerate(imgs):
        row, col = divmod(i, cols)
        grid[:, row * height : (row + 1) * height, col * width : (col + 1) * width] = img
    return grid
