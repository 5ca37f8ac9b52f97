"""The LoRAtorio section of the WebUI's settings, and reading it back."""

from __future__ import annotations

from loratorio_core.config import WEIGHTINGS, LoRAtorioConfig

from .args import PATCH_CHOICES

SECTION = ("loratorio", "LoRAtorio")
SHARED, PER_LORA = "shared", "per LoRA"

# key -> (default, label, component kind, component args)
OPTIONS = {
    "loratorio_max_rows": (
        0,
        "Rows per UNet forward (0: all of a step at once; lower it to save memory)",
        "slider",
        {"minimum": 0, "maximum": 64, "step": 1},
    ),
    "loratorio_auto_compose": (
        False,
        "Compose automatically when the prompt has two or more LoRAs (LoRAtorio off otherwise)",
        "checkbox",
        {},
    ),
    "loratorio_text_encoders": (
        SHARED,
        "Text-encoder parts of composed LoRAs: shared (every row sees the prompt as all of them encode "
        "it, as the built-in Lora does) or per LoRA (each LoRA's rows see its own encoding, the base "
        "rows the plain one; one more prompt encoding per LoRA and pass)",
        "radio",
        {"choices": [SHARED, PER_LORA]},
    ),
    # A new key: the old "loratorio_default_patch_size" (an absolute 4) sits in every user's saved
    # settings, and would keep them off the fraction default.
    "loratorio_default_patch": (
        "1/16",
        "Default patch size (a fraction of the latent's shorter side, or latent pixels)",
        "dropdown",
        {"choices": PATCH_CHOICES},
    ),
    "loratorio_default_weighting": (
        LoRAtorioConfig().weighting,
        "Default weighting rule (contrast: where each LoRA acts decides; softmin: the paper's)",
        "dropdown",
        {"choices": list(WEIGHTINGS)},
    ),
    # A new key, as for the patch: the old "loratorio_default_temperature" (1.0, softmin's) sits in
    # users' saved settings and would give the power rule a temperature nobody chose for it.
    "loratorio_default_tau": (
        LoRAtorioConfig().temperature,
        "Default temperature of the weighting rule",
        "slider",
        {"minimum": 0.001, "maximum": 10.0, "step": 0.001},
    ),
    "loratorio_default_recenter": (
        0.5,
        "Default re-centering (lam)",
        "slider",
        {"minimum": 0.0, "maximum": 1.0, "step": 0.05},
    ),
}


def register() -> None:
    """on_ui_settings: add the options to the WebUI's settings."""
    import gradio as gr
    from modules import shared

    components = {"slider": gr.Slider, "checkbox": gr.Checkbox, "radio": gr.Radio, "dropdown": gr.Dropdown}
    for key, (default, label, kind, args) in OPTIONS.items():
        shared.opts.add_option(
            key, shared.OptionInfo(default, label, components[kind], args, section=SECTION)
        )


def get(key: str):
    """An option's value, its default before the settings are registered."""
    from modules import shared

    return shared.opts.data.get(key, OPTIONS[key][0])
