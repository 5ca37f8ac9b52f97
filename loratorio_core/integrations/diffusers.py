"""LoRAtorio (and the merge, switch and composite baselines) on a diffusers SD / SDXL pipeline.

The pipeline's own components are used as they are (UNet, text encoders, VAE, any scheduler);
this module runs the denoising loop: each step the core plans the rows, the per-row runtime
evaluates them in one UNet call (or ``max_rows`` at a time), and the core combines them. The
pipeline's weights are never modified: every LoRA acts through hooks that are gone when a call
returns, also after an error or an interrupt.

    pipe = StableDiffusionPipeline.from_pretrained(folder)
    composer = LoRAtorioDiffusers(pipe, ["character.safetensors", "background.safetensors"], [0.8, 1.0])
    result = composer("a knight in a forest", steps=30, guidance_scale=7.5, seed=1)
    result.images[0].save("out.png")

Similarity is always measured on noise predictions: v- and x0-prediction models' outputs are
converted to eps for the core and back for the scheduler. Text-encoder parts of a LoRA are applied
per adapter: each LoRA's rows see the prompt as encoded with that LoRA's text-encoder layers
(encoded once per adapter set and cached per prompt).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import Tensor

from ..config import LoRAtorioConfig
from ..guidance import denoised_from_eps, eps_from_denoised, eps_from_v, v_from_eps
from ..lora.binding import BoundLoRA, bind_lora
from ..lora.files import PICKLE_SUFFIXES, LoRAFile, LoRAFileError, load_lora, read_header, tag_frequencies
from ..lora.keymap import layer_aliases
from ..lora.runtime import LoRARuntime, evaluate_entries
from ..relevance import named_by_prompts
from ..step import Adapter, StepComposer, StepPlan

__all__ = ["GenerationResult", "LoRAtorioDiffusers", "is_sdxl", "load_pipeline"]


def is_sdxl(pipe) -> bool:
    """Whether the pipeline is SDXL-shaped (a second text encoder and pooled embeddings)."""
    return getattr(pipe, "text_encoder_2", None) is not None


@dataclass
class GenerationResult:
    """images: PIL images (or the decoded tensor with output_type='pt'); latents: the final
    latents; weights: per step, each LoRA's patch weights (N, B, h, w) on the CPU when maps were
    recorded; kept: per step, the top-k sets; rows: model rows evaluated per step (per sample)."""

    images: list
    latents: Tensor
    weights: list[Tensor | None] = field(default_factory=list)
    kept: list[Tensor | None] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)


class LoRAtorioDiffusers:
    """Composes LoRAs on a diffusers pipeline.

    loras: LoRA files (paths or loaded ``LoRAFile``s) in prompt order. scales: their multipliers
    (1.0 each by default). max_rows: evaluate at most this many UNet rows per call (memory),
    with identical results. text_encoder_loras: apply the LoRAs' text-encoder layers per
    adapter (True) or ignore them (False). asked: per LoRA, whether the user asked for it by name
    (the CLI's ``--lora``, against ``--pool``): with top-k those are kept first, then the LoRAs
    whose training tags the prompt names, then the most divergent.
    """

    def __init__(
        self,
        pipe,
        loras: Sequence[LoRAFile | str | os.PathLike],
        scales: Sequence[float] | None = None,
        config: LoRAtorioConfig | None = None,
        *,
        max_rows: int | None = None,
        text_encoder_loras: bool = True,
        asked: Sequence[bool] | None = None,
    ):
        self.pipe = pipe
        self.config = config if config is not None else LoRAtorioConfig()
        self.loras = [lora if isinstance(lora, LoRAFile) else load_lora(lora) for lora in loras]
        scales = [1.0] * len(self.loras) if scales is None else list(scales)
        if len(scales) != len(self.loras):
            raise ValueError(f"scales has {len(scales)} entries for {len(self.loras)} LoRAs")
        self.adapters = [Adapter(lora.name, float(s)) for lora, s in zip(self.loras, scales, strict=True)]
        self.max_rows = max_rows
        self.asked = [False] * len(self.loras) if asked is None else [bool(a) for a in asked]
        if len(self.asked) != len(self.loras):
            raise ValueError(f"asked has {len(self.asked)} entries for {len(self.loras)} LoRAs")
        self.warnings: list[str] = []

        unet_aliases = layer_aliases(pipe.unet)
        self.unet_bound = [bind_lora(pipe.unet, lora, "unet", unet_aliases) for lora in self.loras]
        self.unet_runtime = LoRARuntime(pipe.unet, [b.layers for b in self.unet_bound])
        self.text_runtimes: list[tuple[str, LoRARuntime]] = []
        self._text_adapters: set[int] = set()
        encoders = [("te1", "text_encoder"), ("te2", "text_encoder_2")]
        for component, attribute in encoders:
            encoder = getattr(pipe, attribute, None)
            if encoder is None or not text_encoder_loras:
                continue
            aliases = layer_aliases(encoder)
            bound = [bind_lora(encoder, lora, component, aliases) for lora in self.loras]
            self._report(bound, attribute)
            self._text_adapters |= {i for i, b in enumerate(bound) if b.layers}
            self.text_runtimes.append((attribute, LoRARuntime(encoder, [b.layers for b in bound])))
        self._report(self.unet_bound, "unet")
        self._prompt_cache: dict[tuple, dict[str, Tensor]] = {}

    def _report(self, bound: list[BoundLoRA], where: str) -> None:
        for b in bound:
            if b.unmatched:
                self.warnings.append(
                    f"{b.path}: {len(b.unmatched)} {where} layer(s) match nothing in this model and are "
                    f"ignored (e.g. {b.unmatched[0]})"
                )

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] = "",
        *,
        steps: int = 30,
        guidance_scale: float = 7.5,
        height: int | None = None,
        width: int | None = None,
        seed: int | None = 0,
        num_images_per_prompt: int = 1,
        record_weights: bool = False,
        on_step: Callable[[int, int], None] | None = None,
        output_type: str = "pil",
    ) -> GenerationResult:
        pipe = self.pipe
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = (
            [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        )
        if len(negatives) != len(prompts):
            raise ValueError(f"negative_prompt has {len(negatives)} entries for {len(prompts)} prompts")
        batch = len(prompts) * num_images_per_prompt
        cfg = guidance_scale > 1.0
        unet = pipe.unet
        device, dtype = unet.device, unet.dtype
        scale_factor = getattr(pipe, "vae_scale_factor", 8)
        default = unet.config.sample_size * scale_factor
        height, width = height or default, width or default
        if height % scale_factor or width % scale_factor:
            raise ValueError(f"height and width must be multiples of {scale_factor}; got {height}x{width}")

        generator = torch.Generator("cpu").manual_seed(seed) if seed is not None else None
        shape = (batch, unet.config.in_channels, height // scale_factor, width // scale_factor)
        scheduler = pipe.scheduler
        scheduler.set_timesteps(steps, device=device)
        latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(device, dtype)
        latents = latents * scheduler.init_noise_sigma
        composer = StepComposer(self.config)
        named = self._named(prompts, num_images_per_prompt)
        result = GenerationResult(images=[], latents=latents)
        kept = gates = None
        with ExitStack() as attached:
            for runtime in (self.unet_runtime, *(r for _, r in self.text_runtimes)):
                attached.enter_context(runtime)
            conditioning = self._conditioning_table(
                prompts, negatives, num_images_per_prompt, cfg, (height, width)
            )
            for index, t in enumerate(scheduler.timesteps):
                plan = composer.plan(
                    index, self.adapters, batch_size=batch, cfg=cfg, kept=kept, gates=gates, named=named
                )
                scaled = scheduler.scale_model_input(latents, t)
                for row in plan.rows:  # a gated row's LoRA set (top-k's kept ones) may be new
                    key = self._text_key(row.adapters)
                    if key not in conditioning:
                        conditioning[key] = self._encoded(
                            prompts, negatives, num_images_per_prompt, cfg, (height, width), key
                        )
                batched = self._entry_inputs(plan, scaled, conditioning)
                output = evaluate_entries(
                    partial(_unet_output, unet, t),
                    self.unet_runtime,
                    plan.entry_adapters,
                    batched,
                    max_rows=self.max_rows,
                )
                to_eps, from_eps = _prediction_space(scheduler, t, index)
                step = composer.combine(plan, to_eps(output, batched["x"]), guidance_scale if cfg else None)
                kept, gates = step.kept, step.gates
                latents = scheduler.step(from_eps(step.eps, scaled), t, latents, return_dict=False)[0]
                result.rows.append(len(plan.rows))
                result.kept.append(None if step.kept is None else step.kept.cpu())
                result.weights.append(
                    step.weights.float().cpu() if record_weights and step.weights is not None else None
                )
                if on_step is not None:
                    on_step(index + 1, len(scheduler.timesteps))
        result.latents = latents
        result.images = self._decode(latents, output_type)
        return result

    def _named(self, prompts: list[str], repeat: int) -> Tensor | None:
        """(N, B) the LoRAs each image asks for: by name (``asked``) or by the training tags (kohya
        ``ss_tag_frequency``) its prompt names; top-k keeps them first. None without top-k or when
        nothing is asked for."""
        if self.config.top_k is None:
            return None
        tags = [tag_frequencies(lora.metadata) for lora in self.loras]
        # diffusers lays out each prompt's images side by side (repeat_interleave order)
        return named_by_prompts([p for p in prompts for _ in range(repeat)], tags, self.asked)

    # --- conditioning --------------------------------------------------------------------------

    def _text_key(self, adapters: tuple[tuple[int, float], ...]) -> tuple:
        """The part of a row's adapter set that changes its text conditioning."""
        return tuple((i, s) for i, s in adapters if i in self._text_adapters)

    def _conditioning_table(self, prompts, negatives, repeat, cfg, size) -> dict:
        """Encoded prompts per text-adapter set the plan can ask for (cached per prompt)."""
        keys = {()}
        for i, adapter in enumerate(self.adapters):
            keys.add(self._text_key(((i, adapter.scale),)))
        if self.config.mode == "merge":
            keys.add(self._text_key(tuple((i, a.scale) for i, a in enumerate(self.adapters))))
        return {key: self._encoded(prompts, negatives, repeat, cfg, size, key) for key in keys}

    def _encoded(self, prompts, negatives, repeat, cfg, size, key) -> dict[str, Tensor]:
        """The prompts encoded with the text-adapter set ``key`` (cached)."""
        cache_key = (tuple(prompts), tuple(negatives), repeat, cfg, size, key)
        if cache_key not in self._prompt_cache:
            self._prompt_cache[cache_key] = self._encode(prompts, negatives, repeat, cfg, size, key)
        return self._prompt_cache[cache_key]

    def _encode(self, prompts, negatives, repeat, cfg, size, key) -> dict[str, Tensor]:
        pipe, device = self.pipe, self.pipe.unet.device
        with ExitStack() as active:
            for _, runtime in self.text_runtimes:
                active.enter_context(runtime.everywhere(key))
            if is_sdxl(pipe):
                # As the pipeline itself does: an empty negative prompt may mean zero embeddings.
                no_negative = not any(negatives) and getattr(
                    pipe.config, "force_zeros_for_empty_prompt", False
                )
                cond, uncond, pooled, pooled_uncond = pipe.encode_prompt(
                    prompt=prompts,
                    device=device,
                    num_images_per_prompt=repeat,
                    do_classifier_free_guidance=cfg,
                    negative_prompt=None if no_negative else negatives,
                )
                height, width = size
                time_ids = torch.tensor(
                    [[height, width, 0, 0, height, width]], device=device, dtype=cond.dtype
                )
                encoded = {
                    "cond": cond,
                    "cond_pooled": pooled,
                    "time_ids": time_ids.expand(cond.shape[0], -1),
                }
                if cfg:
                    encoded.update(uncond=uncond, uncond_pooled=pooled_uncond)
                return encoded
            cond, uncond = pipe.encode_prompt(prompts, device, repeat, cfg, negatives)
            return {"cond": cond, "uncond": uncond} if cfg else {"cond": cond}

    def _entry_inputs(self, plan: StepPlan, scaled: Tensor, table: dict) -> dict:
        """The UNet inputs of every entry of the plan, in entry order."""
        contexts, pooled, time_ids = [], [], []
        for row in plan.rows:
            encoded = table[self._text_key(row.adapters)]
            samples = list(row.samples)
            contexts.append(encoded[row.branch][samples])
            if "time_ids" in encoded:
                pooled.append(encoded[f"{row.branch}_pooled"][samples])
                time_ids.append(encoded["time_ids"][samples])
        batched = {"x": scaled[plan.sample_index.to(scaled.device)], "context": torch.cat(contexts)}
        if pooled:
            batched.update(text_embeds=torch.cat(pooled), time_ids=torch.cat(time_ids))
        return batched

    def _decode(self, latents: Tensor, output_type: str):
        pipe = self.pipe
        if output_type == "latent":
            return [latents]
        vae = pipe.vae
        needs_upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
        decode_dtype = torch.float32 if needs_upcast else vae.dtype
        if needs_upcast:
            vae.to(torch.float32)
        try:
            image = vae.decode(latents.to(decode_dtype) / vae.config.scaling_factor, return_dict=False)[0]
        finally:
            if needs_upcast:
                vae.to(torch.float16)
        return pipe.image_processor.postprocess(image, output_type=output_type)


def _unet_output(unet, t, x: Tensor, context: Tensor, **added: Tensor) -> Tensor:
    return unet(x, t, encoder_hidden_states=context, added_cond_kwargs=added or None).sample


def _prediction_space(scheduler, t, index: int) -> tuple[Callable, Callable]:
    """(model output -> eps, eps -> model output) for the scheduler's prediction type.

    Both use the model's own input x (the scaled latent, sqrt(a) x0 + sqrt(1 - a) eps) and the
    step's noise level: the sigma the scheduler uses when it has one, else the one of its schedule's
    alpha-bar a at timestep t (sigma^2 = (1 - a) / a); the conversions are the core's.
    """
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return (lambda out, x: out), (lambda eps, x: eps)
    sigmas = getattr(scheduler, "sigmas", None)
    step_index = getattr(scheduler, "step_index", None)
    if sigmas is not None and step_index is not None:
        sigma = float(sigmas[step_index])
    else:
        alpha_bar = float(scheduler.alphas_cumprod[int(t)])
        sigma = ((1.0 - alpha_bar) / alpha_bar) ** 0.5
    if kind == "v_prediction":
        return (lambda v, x: eps_from_v(x, v, sigma)), (lambda eps, x: v_from_eps(x, eps, sigma))
    if kind == "sample":
        # x0 <-> eps are written for k-diffusion's unscaled latent: x * sqrt(1 + sigma^2)
        unscaled = (1.0 + sigma * sigma) ** 0.5
        return (
            (lambda x0, x: eps_from_denoised(x * unscaled, x0, sigma)),
            (lambda eps, x: denoised_from_eps(x * unscaled, eps, sigma)),
        )
    raise ValueError(f"scheduler prediction_type {kind!r} is not supported (epsilon, v_prediction, sample)")


def load_pipeline(model: str, device: str, dtype: str):
    """A diffusers SD or SDXL pipeline from a folder or a single .safetensors file."""
    try:
        import diffusers
        import torch
    except ImportError:
        raise ValueError("generate needs diffusers: pip install 'loratorio[diffusers]'") from None
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(dtype)
    if torch_dtype is None:
        torch_dtype = torch.float16 if device.startswith("cuda") else torch.float32
    # Loading bars and advice from diffusers/transformers would bury our one-line messages.
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass
    path = Path(model)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(f"{path}: pickle checkpoints can run code; use a .safetensors checkpoint")
    try:
        with warnings.catch_warnings():
            # diffusers >= 0.36 renames torch_dtype (older ones need it): not the user's concern.
            warnings.simplefilter("ignore", FutureWarning)
            if path.is_dir():
                if not (path / "model_index.json").is_file():
                    raise ValueError(f"{path}: not a diffusers model folder (no model_index.json)")
                pipe = diffusers.DiffusionPipeline.from_pretrained(str(path), torch_dtype=torch_dtype)
            elif path.is_file():
                keys = _checkpoint_keys(path)
                xl = any(k.startswith("conditioner.embedders.1") for k in keys)
                cls = diffusers.StableDiffusionXLPipeline if xl else diffusers.StableDiffusionPipeline
                pipe = cls.from_single_file(str(path), torch_dtype=torch_dtype)
            else:
                raise ValueError(f"{path}: no such model folder or file")
    except ValueError:
        raise
    except Exception as error:  # diffusers raises many kinds; one clear line is what a user needs
        raise ValueError(
            f"{path}: cannot be loaded as a diffusers SD/SDXL pipeline ({_first_line(error)})"
        ) from None
    if getattr(pipe, "unet", None) is None or getattr(pipe, "text_encoder", None) is None:
        raise ValueError(
            f"{path}: {type(pipe).__name__} is not a Stable Diffusion / SDXL pipeline with a UNet"
        )
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _checkpoint_keys(path: Path) -> list[str]:
    try:
        return [key for key in read_header(path) if key != "__metadata__"]
    except LoRAFileError as error:
        raise ValueError(f"{path}: not a safetensors checkpoint ({error.problem})") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]
