"""One generation with LoRAtorio on, whatever the host: what it set up, so that all of it can be put
back, and the module-level entry points the script and callbacks call.

A host's session (``a1111.A1111Session``, ``forge_f2.Forge2Session``, ``forge_f0.Forge0Session``)
finds the LoRAs to compose at the start of every sampling pass (``begin_pass``), hands them to
``compose`` (per-row runtime on the host's UNet + a ``RowComposer`` over the host's labelled CFG
rows), routes the host's UNet calls through it, and undoes everything in ``close``. What all hosts
do alike lives here (the pool's LoRAs: ``add_pool``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Hashable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch

from loratorio_core import Adapter
from loratorio_core.lora import LayerUpdate, LoRARuntime
from loratorio_core.relevance import named_by_prompts
from loratorio_core.rows import RowComposer

from .args import Settings


@dataclass
class Session:
    """What a generation with LoRAtorio on has changed, host-independent."""

    settings: Settings | None
    error: str | None = None
    runtime: LoRARuntime | None = None
    rows: RowComposer | None = None
    adapters: list[Adapter] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    max_rows: int | None = None
    passes: list = field(default_factory=list)  # (batch number, composer) of each sampling pass
    batch_size: int = 1
    per_lora_text: bool = False  # each LoRA's rows see the prompt as its own text-encoder part encodes it
    pool_tags: dict[str, dict[str, int]] = field(default_factory=dict)  # pool LoRA -> its training tags

    def warn(self, message: str) -> None:
        """Tell the user in the console, as WebUI extensions do (kept for tests too)."""
        if message not in self.warnings:
            self.warnings.append(message)
            print(f"LoRAtorio: {message}", file=sys.stderr)

    def begin_pass(self, p) -> None:
        raise NotImplementedError

    def start_pass(self, p) -> None:
        """Begin a sampling pass; when it composes nothing, say so where the user looks."""
        self.begin_pass(p)
        if self.rows is None and self.error is None:
            self.note(
                p,
                "nothing composed: the prompt has no LoRA that the WebUI loaded and LoRAtorio can compose "
                "(a <lora:...> tag it cannot load, or every LoRA left to its own merge: see the lines "
                "above) and no pool; this image was made without LoRAtorio",
            )

    def note(self, p, message: str) -> None:
        """In the console and in the generation's own warnings under the image (``p.comment``)."""
        self.warn(message)
        comment = getattr(p, "comment", None)
        if callable(comment):
            comment(f"LoRAtorio: {message}")

    def on_cfg_denoiser(self, params) -> None:
        """A1111 reads its CFG batch layout here; other hosts do not need it."""

    def compose(self, p, unet, adapters: list[Adapter], layers: list[Mapping[str, LayerUpdate]]) -> None:
        """Start this pass's composition of ``adapters`` (their UNet ``layers``) on ``unet``."""
        self.adapters = adapters
        config = self.settings.config(len(adapters))
        self.runtime = LoRARuntime(unet, layers).attach()
        self.rows = RowComposer(
            config,
            adapters,
            self.runtime,
            max_rows=self.max_rows,
            record_weights=self.settings.show_maps,
            named=self.named(p, adapters) if config.top_k is not None else None,
        )
        self.passes.append((getattr(p, "iteration", 0), self.rows))
        self.batch_size = getattr(p, "batch_size", 1)
        p.extra_generation_params.update(self.settings.infotext())  # recorded only once composed

    def named(self, p, adapters: list[Adapter]) -> torch.Tensor | None:
        """(N, images) what each image of the batch asks for, which top-k keeps first: the prompt's
        own LoRAs (its ``<lora:...>`` tags brought them) and the pool's LoRAs whose training tags
        its prompt names."""
        batch = getattr(p, "batch_size", 1)
        prompts = list(getattr(p, "prompts", None) or [getattr(p, "prompt", "")] * batch)
        tags = [self.pool_tags.get(a.name, {}) for a in adapters]
        return named_by_prompts(prompts, tags, asked=[a.name not in self.pool_tags for a in adapters])

    def add_pool(self, networks, unet, adapters: list[Adapter], layers: list) -> bool:
        """Append the pool's LoRAs that the prompt did not bring to ``adapters`` and ``layers``.
        False on a bad pool or LoRA file: the error is kept, and the host fails this generation
        with it at the first UNet call (nothing is attached yet, so the model is as it was)."""
        self.pool_tags = {}
        if not self.settings.pool:
            return True
        taken = {a.name for a in adapters}
        try:
            for adapter, pool_layers in self.pool_layers(networks, unet, taken):
                adapters.append(adapter)
                layers.append(pool_layers)
        except ValueError as error:
            self.error = str(error)
            return False
        return True

    def pool_layers(
        self, networks, unet, taken: set[str]
    ) -> Iterator[tuple[Adapter, dict[str, LayerUpdate]]]:
        """(adapter, UNet layers) of the pool's LoRAs not already composed from the prompt."""
        from loratorio_core.lora import bind_lora, layer_aliases, tag_frequencies

        from .pools import load_cached, resolve

        aliases = layer_aliases(unet)
        for path, scale in resolve(self.settings.pool, networks.available_network_aliases):
            if path.stem in taken:
                continue
            lora = load_cached(path)
            bound = bind_lora(unet, lora, "unet", aliases)
            self.pool_tags[path.stem] = tag_frequencies(lora.metadata)
            yield Adapter(path.stem, scale), bound.layers

    def last_pass_of_batch(self) -> dict[int, RowComposer]:
        """The composer of each batch's last pass (its hires pass when there is one)."""
        return {batch: rows for batch, rows in self.passes}

    def end_pass(self) -> None:
        if self.runtime is not None:
            self.runtime.detach()
        self.runtime = self.rows = None

    def close(self) -> None:
        """Put everything back."""
        self.end_pass()


_session: Session | None = None


def start(
    p, settings: Settings, kind: type[Session], max_rows: int | None = None, per_lora_text: bool = False
) -> Session:
    stop()
    global _session
    _session = kind(settings, max_rows=max_rows, per_lora_text=per_lora_text)
    return _session


def fail(error: Exception, kind: type[Session]) -> Session:
    """Bad script arguments: the generation stops at its first UNet call with this message."""
    stop()
    global _session
    _session = kind(None, error=str(error))
    return _session


def current() -> Session | None:
    return _session


def stop() -> None:
    global _session
    if _session is not None:
        _session.close()
        _session = None


def on_cfg_denoiser(params) -> None:
    if _session is not None:
        _session.on_cfg_denoiser(params)


def sampler_step(denoiser) -> int:
    """The sampler step of this denoiser call: second-order samplers call twice a step."""
    steps, total = getattr(denoiser, "steps", None), getattr(denoiser, "total_steps", None)
    calls_per_step = max(1, round(total / steps)) if steps and total else 1
    return int(denoiser.step) // calls_per_step


_COND_CACHES = ("cached_c", "cached_uc", "cached_hr_c", "cached_hr_uc")  # the hosts' prompt-cond caches


def encode_variants(p, variants: Mapping[Hashable, Callable[[], AbstractContextManager]]) -> dict:
    """The pass's prompts encoded by the host's own code once inside each variant (a context in
    which the text encoder carries some LoRAs' parts and not others): key -> (cond, uncond), as
    ``p.c, p.uc`` (hires pass: ``p.hr_c, p.hr_uc``) hold them.

    p's conds are left as they were, and so are the host's caches (shadowed on this instance only).
    No extra network is activated: Txt2Img's own ``setup_conds`` re-activates them to make the hires
    conds (in Forge that rebuilds ``forge_objects``), so the first pass uses the base class's."""
    from modules import processing

    hires = bool(getattr(p, "is_hr_pass", False))
    names = ("hr_c", "hr_uc") if hires else ("c", "uc")
    kept = {name: p.__dict__[name] for name in ("c", "uc", "hr_c", "hr_uc") if name in p.__dict__}
    encoded = {}
    try:
        for key, variant in variants.items():
            with variant():
                for cache in _COND_CACHES:
                    setattr(p, cache, [None, None])
                if hires:
                    p.hr_c = None  # calculate_hr_conds keeps hr_c when it is set
                    p.calculate_hr_conds()
                else:
                    processing.StableDiffusionProcessing.setup_conds(p)
                encoded[key] = tuple(getattr(p, name, None) for name in names)
    finally:
        for name in _COND_CACHES + ("c", "uc", "hr_c", "hr_uc"):
            p.__dict__.pop(name, None)
        p.__dict__.update(kept)
    return encoded
