"""The LoRAtorio script A1111 and Forge run: UI, argument parsing, and the hooks into generation."""

from __future__ import annotations

import gradio as gr
from modules import script_callbacks, scripts
from modules.ui_components import InputAccordion

from . import a1111
from .args import ARGS, MODE_LABELS, Settings, from_infotext, parse_args

TOOLTIPS = {arg.name: arg.help for arg in ARGS}


class LoRAtorioScript(scripts.Script):
    def title(self):
        return "LoRAtorio"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        defaults = Settings()
        with InputAccordion(False, label="LoRAtorio", elem_id=self.elem_id("enabled")) as enabled:
            with gr.Row():
                mode = gr.Radio(
                    choices=list(MODE_LABELS), value=defaults.mode, label="Mode", elem_id=self.elem_id("mode")
                )
            with gr.Row():
                patch_size = gr.Slider(
                    1,
                    16,
                    step=1,
                    value=defaults.patch_size,
                    label="Patch size",
                    elem_id=self.elem_id("patch_size"),
                )
                temperature = gr.Slider(
                    0.001,
                    1.0,
                    step=0.001,
                    value=defaults.temperature,
                    label="Temperature",
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
            with gr.Row():
                pool = gr.Textbox(value="", label="Pool (folder or named pool)", elem_id=self.elem_id("pool"))
                top_k = gr.Slider(
                    minimum=0,
                    maximum=16,
                    step=1,
                    value=0,
                    label="Top-k (0: all)",
                    elem_id=self.elem_id("top_k"),
                )
                reselect_every = gr.Slider(
                    1,
                    50,
                    step=1,
                    value=defaults.reselect_every,
                    label="Reselect every",
                    elem_id=self.elem_id("reselect_every"),
                )
            show_maps = gr.Checkbox(value=False, label="Show weight maps", elem_id=self.elem_id("show_maps"))
        controls = [enabled, mode, patch_size, temperature, recenter, pool, top_k, reselect_every, show_maps]
        self.infotext_fields = [
            (control, _paste(arg.name)) for control, arg in zip(controls, ARGS, strict=True) if arg.infotext
        ]
        self.paste_field_names = [arg.infotext for arg in ARGS if arg.infotext]
        return controls

    def process(self, p, *args):
        a1111.stop()  # whatever an interrupted or failed generation left behind
        try:
            settings = parse_args(args)
        except ValueError as error:
            a1111.fail(error)
            return
        if settings.enabled:
            a1111.start(p, settings)

    def process_before_every_sampling(self, p, *args, **kwargs):
        session = a1111.current()
        if session is not None:
            session.begin_pass(p)

    def postprocess_batch(self, p, *args, **kwargs):
        session = a1111.current()
        if session is not None and session.rows is not None and session.rows.kept:
            kept = session.rows.kept
            p.extra_generation_params["LoRAtorio kept"] = [
                ", ".join(kept.get(i, [])) for i in range(len(kept))
            ]

    def postprocess(self, p, processed, *args):
        a1111.stop()


def _paste(name):
    def value(params):
        return from_infotext(params).get(name)

    return value


script_callbacks.on_cfg_denoiser(a1111.on_cfg_denoiser, name="loratorio")
script_callbacks.on_script_unloaded(a1111.stop, name="loratorio")
