"""X/Y/Z plot axes for LoRAtorio's settings (the WebUI's built-in xyz_grid script)."""

from __future__ import annotations

from loratorio_core.config import UNCOND_LORAS, WEIGHTINGS

from .args import MODE_LABELS, PATCH_CHOICES

PREFIX = "[LoRAtorio] "


def _apply(name: str):
    def apply(p, value, values):
        # A new dict per cell: the grid shallow-copies p, so never mutate a shared one.
        p.loratorio_overrides = {**getattr(p, "loratorio_overrides", {}), name: value}

    return apply


def register() -> bool:
    """Add the axes to xyz_grid if it is loaded and they are not there yet; True when present."""
    from modules import scripts

    xyz = next((d.module for d in scripts.scripts_data if d.script_class.__module__ == "xyz_grid.py"), None)
    if xyz is None:
        return False
    if any(str(getattr(option, "label", "")).startswith(PREFIX) for option in xyz.axis_options):
        return True
    xyz.axis_options.extend(
        [
            xyz.AxisOption(PREFIX + "Enabled", str, _apply("enabled"), choices=lambda: ["True", "False"]),
            xyz.AxisOption(PREFIX + "Mode", str, _apply("mode"), choices=lambda: list(MODE_LABELS)),
            # "1/16, 1/8, 4": fractions of the latent's side and absolute sizes alike
            xyz.AxisOption(PREFIX + "Patch size", str, _apply("patch_size"), choices=lambda: PATCH_CHOICES),
            xyz.AxisOption(PREFIX + "Weighting", str, _apply("weighting"), choices=lambda: list(WEIGHTINGS)),
            xyz.AxisOption(PREFIX + "Temperature", float, _apply("temperature")),
            xyz.AxisOption(PREFIX + "Re-centering (lam)", float, _apply("recenter")),
            xyz.AxisOption(PREFIX + "Top-k", int, _apply("top_k")),
            xyz.AxisOption(PREFIX + "Exact every (gated)", int, _apply("exact_every")),
            xyz.AxisOption(PREFIX + "Exact first (gated)", int, _apply("exact_first")),
            xyz.AxisOption(
                PREFIX + "Negative branch LoRAs",
                str,
                _apply("uncond_loras"),
                choices=lambda: list(UNCOND_LORAS),
            ),
        ]
    )
    return True
