"""The LoRAtorio script A1111 and Forge run: UI, argument parsing, and the hooks into generation."""

from __future__ import annotations

import inspect
import re
from dataclasses import replace

import gradio as gr
from modules import script_callbacks, scripts
from modules.ui_components import InputAccordion, ToolButton

from loratorio_core import infotext
from loratorio_core.config import UNCOND_LORAS, WEIGHTINGS

from . import hosts, options, session, tab, xyz
from .args import ARGS, MODE_LABELS, NAMES, PATCH_CHOICES, Settings, from_infotext, parse_args
from .maps import mean_weights, weight_map_images

TOOLTIPS = {arg.name: arg.help for arg in ARGS}
# The WebUI's ui-config.json keeps each control's value by its label, and A1111 writes every
# control's default there at first start: under the labels of earlier versions ("Patch size": 4,
# "Temperature": 1.0, softmin's) it would override the defaults those versions did not have.
PATCH_LABEL = "Patch size (fraction or pixels)"
TEMPERATURE_LABEL = "Temperature (tau)"
UNCOND_LORAS_LABEL = "Negative branch LoRAs (lam < 1; reuse: faster)"
OLD_LABELS = ("Patch size", "Temperature")
# WebUI 1.10 takes a list value of extra_generation_params per image (A1111 47ed9b2d), in the release
# that gave callbacks their names; before it (A1111 1.6-1.9, old Forge) a list is written whole
LISTS_PER_IMAGE = "name" in inspect.signature(script_callbacks.on_ui_tabs).parameters
HOST = hosts.detect()
SESSION = hosts.session_class(HOST)


class LoRAtorioScript(scripts.Script):
    def title(self):
        return "LoRAtorio"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        xyz.register()  # when xyz_grid loaded before us (API-only mode runs ui() before on_before_ui)
        defaults = Settings(
            patch_size=_default_patch(),
            weighting=_default_weighting(),
            temperature=float(options.get("loratorio_default_tau")),
            recenter=float(options.get("loratorio_default_recenter")),
        )
        with InputAccordion(False, label="LoRAtorio", elem_id=self.elem_id("enabled")) as enabled:
            with gr.Row():
                mode = gr.Radio(
                    choices=list(MODE_LABELS), value=defaults.mode, label="Mode", elem_id=self.elem_id("mode")
                )
            with gr.Row():
                patch_size, weighting, temperature, recenter = self._method_controls(defaults)
            with gr.Row():
                pool, top_k, reselect_every = self._pool_controls(defaults)
            show_maps = gr.Checkbox(value=False, label="Show weight maps", elem_id=self.elem_id("show_maps"))
            exact_every, exact_first, uncond_loras = _speed_controls(self, defaults)
        controls = [enabled, mode, patch_size, temperature, recenter, pool, top_k, reselect_every, show_maps]
        controls += [exact_every, exact_first, weighting, uncond_loras]
        self.infotext_fields = [
            (control, _paste(arg.name)) for control, arg in zip(controls, ARGS, strict=True) if arg.infotext
        ]
        self.paste_field_names = [arg.infotext for arg in ARGS if arg.infotext]
        return controls

    def _method_controls(self, defaults: Settings) -> tuple:
        """Patch size, weighting rule, temperature and re-centering, in the row ``ui`` opened."""
        # a fraction of the latent's side (each pass its own size) or absolute latent pixels
        patch_size = gr.Dropdown(
            choices=PATCH_CHOICES,
            value=defaults.patch_size,
            allow_custom_value=True,
            label=PATCH_LABEL,
            elem_id=self.elem_id("patch_size"),
        )
        weighting = gr.Dropdown(
            choices=list(WEIGHTINGS),
            value=defaults.weighting,
            label="Weighting",
            elem_id=self.elem_id("weighting"),
        )
        temperature = gr.Slider(
            0.001,
            10.0,
            step=0.001,
            value=defaults.temperature,
            label=TEMPERATURE_LABEL,
            elem_id=self.elem_id("temperature"),
        )
        recenter = gr.Slider(
            0.0,
            1.0,
            step=0.05,
            value=defaults.recenter,
            label="Re-centering (lam)",
            elem_id=self.elem_id("recenter"),
        )
        return patch_size, weighting, temperature, recenter

    def _pool_controls(self, defaults: Settings) -> tuple:
        """Pool (with its refresh button), top-k and reselect-every, in the row ``ui`` opened."""
        # Named pools from the LoRAtorio tab to pick, or a folder / LoRA names typed in.
        pool = gr.Dropdown(
            choices=[""] + tab.pool_names(),
            value="",
            allow_custom_value=True,
            label="Pool (folder or named pool)",
            elem_id=self.elem_id("pool"),
        )
        refresh = ToolButton(value="\U0001f504", elem_id=self.elem_id("pool_refresh"))
        refresh.click(fn=lambda: gr.update(choices=[""] + tab.pool_names()), inputs=[], outputs=[pool])
        top_k = gr.Slider(
            minimum=0, maximum=16, step=1, value=0, label="Top-k (0: all)", elem_id=self.elem_id("top_k")
        )
        reselect_every = gr.Slider(
            1,
            50,
            step=1,
            value=defaults.reselect_every,
            label="Reselect every",
            elem_id=self.elem_id("reselect_every"),
        )
        return pool, top_k, reselect_every

    def process(self, p, *args):
        session.stop()  # whatever an interrupted or failed generation left behind
        self.kept_per_image = []
        values = list(args)
        overrides = getattr(p, "loratorio_overrides", {})  # X/Y/Z axes
        for name, value in overrides.items():
            values += [arg.default for arg in ARGS[len(values) :]]
            values[NAMES.index(name)] = value
        try:
            settings = parse_args(values)
        except ValueError as error:
            session.fail(error, SESSION)
            return
        if overrides and "enabled" not in overrides:
            settings = replace(settings, enabled=True)  # plotting a LoRAtorio setting means using it
        if not settings.enabled and options.get("loratorio_auto_compose") and _prompt_loras(p) >= 2:
            settings = replace(settings, enabled=True)
        if settings.enabled:
            session.start(
                p,
                settings,
                SESSION,
                max_rows=int(options.get("loratorio_max_rows")) or None,
                per_lora_text=options.get("loratorio_text_encoders") == options.PER_LORA,
            )

    def process_before_every_sampling(self, p, *args, **kwargs):
        active = session.current()
        if active is not None:
            active.start_pass(p)

    # A1111 before 1.9 has no process_before_every_sampling: the pass is set up at its first
    # on_cfg_denoiser instead, after the prompts were encoded (as 1.9+ does) and before any UNet call.
    def process_batch(self, p, *args, **kwargs):
        active = session.current()
        if active is not None and not _runner_has_sampling_hook(p):
            active.pending = p

    def before_hr(self, p, *args):
        self.process_batch(p)

    def postprocess_batch(self, p, *args, **kwargs):
        self.kept_per_image = []
        active = session.current()
        if active is not None and active.rows is not None and active.rows.kept:
            kept = active.rows.kept
            values = [infotext.kept_value(kept.get(i, [])) for i in range(len(kept))]
            if LISTS_PER_IMAGE:
                p.extra_generation_params[infotext.KEPT] = values
            else:
                self.kept_per_image = values

    def postprocess_image(self, p, pp, *args):
        """Before WebUI 1.10 the infotext writes a list value whole: each image's own value is set
        here, just before that image's infotext is made (the grid's then shows the last image's)."""
        if getattr(self, "kept_per_image", None):
            p.extra_generation_params[infotext.KEPT] = self.kept_per_image.pop(0)

    def postprocess(self, p, processed, *args):
        active = session.current()
        try:
            if active is not None and active.settings is not None and active.settings.show_maps:
                _add_maps(active, processed)
        finally:
            session.stop()


def _default_patch() -> str:
    """The settings' default patch size; the built-in default when a hand-edited one does not parse."""
    try:
        return parse_args([False, "LoRAtorio", options.get("loratorio_default_patch")]).patch_size
    except ValueError:
        return Settings().patch_size


def _default_weighting() -> str:
    """The settings' default weighting rule; the built-in default for a hand-edited unknown one."""
    rule = str(options.get("loratorio_default_weighting"))
    return rule if rule in WEIGHTINGS else Settings().weighting


def _runner_has_sampling_hook(p) -> bool:
    return hasattr(type(getattr(p, "scripts", None)), "process_before_every_sampling")


def _prompt_loras(p) -> int:
    prompt = (getattr(p, "all_prompts", None) or [getattr(p, "prompt", "")])[0]
    return len(set(re.findall(r"<(?:lora|lyco):([^:>]+)", prompt)))


def _add_maps(session, processed) -> None:
    """Each image's LoRA weight maps (mean over the steps of its last pass), after the images.
    The WebUI puts the grid (batch size or count > 1) before the images: ``index_of_first_image``."""
    first = getattr(processed, "index_of_first_image", 0)
    extra, extra_info = [], []
    for batch, rows in session.last_pass_of_batch().items():
        names = [a.name for a in rows.adapters]
        for sample in range(session.batch_size):
            index = first + batch * session.batch_size + sample
            weights = mean_weights(rows.weights, sample)
            if weights is None or index >= len(processed.images):
                continue
            for image, name in weight_map_images(processed.images[index], weights, names):
                extra.append(image)
                extra_info.append(f"LoRAtorio weight map: {name}")
    processed.images.extend(extra)
    if hasattr(processed, "infotexts"):
        processed.infotexts.extend(extra_info)


def _paste(name):
    def value(params):
        return from_infotext(params).get(name)

    return value


def _register(hook, callback) -> None:
    """Named callbacks (A1111 1.9+, new Forge) can be ordered by users; A1111 1.8 and old Forge take
    no name."""
    if "name" in inspect.signature(hook).parameters:
        hook(callback, name="loratorio")
    else:
        hook(callback)


_register(script_callbacks.on_cfg_denoiser, session.on_cfg_denoiser)
_register(script_callbacks.on_ui_settings, options.register)
_register(script_callbacks.on_before_ui, xyz.register)
_register(script_callbacks.on_ui_tabs, tab.build)
_register(script_callbacks.on_script_unloaded, session.stop)


def _speed_controls(script, defaults: Settings):
    """The gated single pass (exact steps first and every K-th, one gated row between) and the
    negative branch's LoRAs (evaluated, or the positive's change reused): faster, see README for
    the measured cost and quality."""
    with gr.Row():
        exact_every = gr.Slider(
            1,
            20,
            step=1,
            value=defaults.exact_every,
            label="Exact every K steps (1: every step; more: gated single pass between, faster)",
            elem_id=script.elem_id("exact_every"),
        )
        exact_first = gr.Slider(
            1,
            20,
            step=1,
            value=defaults.exact_first,
            label="Exact first steps (gated single pass)",
            elem_id=script.elem_id("exact_first"),
        )
        uncond_loras = gr.Radio(
            choices=list(UNCOND_LORAS),
            value=defaults.uncond_loras,
            label=UNCOND_LORAS_LABEL,
            elem_id=script.elem_id("uncond_loras"),
        )
    return exact_every, exact_first, uncond_loras
