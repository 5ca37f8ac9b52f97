"""The LoRAtorio script's arguments: one table for the UI, the API, the infotext and X/Y/Z.

The WebUI passes a script its UI components' values positionally, and the API's
``alwayson_scripts: {"LoRAtorio": {"args": [...]}}`` does the same, so the order of ``ARGS`` is a
public contract: documented in README, only ever appended to. ``parse_args`` turns the values
(from either source) into ``Settings``, with a clear error naming the argument for bad input;
missing trailing values take their defaults, so older API clients keep working.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from loratorio_core import LoRAtorioConfig, infotext
from loratorio_core.config import UNCOND_LORAS, WEIGHTINGS, format_patch, parse_patch

# UI labels of the modes -> the core's names.
MODE_LABELS = {label: mode for mode, label in infotext.MODE_LABELS.items()}
_DEFAULTS = LoRAtorioConfig()
# The patch-size control's choices: fractions of the latent's side, then absolute latent pixels.
PATCH_CHOICES = ["1/32", "1/16", "1/8", "1/4"] + [str(size) for size in range(1, 17)]


class PatchSize:
    """The kind of the patch-size argument: a fraction of the latent's side ("1/16") or an absolute
    size in latent pixels (4 or "4"); held as the text users write ("1/16", "4")."""


@dataclass(frozen=True)
class Arg:
    """One script argument: its name, type, default, and the infotext key that records it.
    absent: its value when a LoRAtorio infotext lacks the key (the infotext writes some keys only
    when they are on, and older versions wrote fewer); None leaves the field as it is. choices:
    the values a string argument may take (checked by ``parse_args``), or None."""

    name: str
    kind: type
    default: object
    infotext: str
    help: str
    absent: object = None
    choices: tuple[str, ...] | None = None


ARGS: tuple[Arg, ...] = (
    Arg("enabled", bool, False, infotext.ENABLED, "compose the prompt's LoRAs with LoRAtorio"),
    Arg(
        "mode",
        str,
        "LoRAtorio",
        infotext.MODE,
        "LoRAtorio, or a baseline: Composite, Switch, Merge",
        choices=tuple(MODE_LABELS),
    ),
    Arg(
        "patch_size",
        PatchSize,
        format_patch(_DEFAULTS),
        infotext.PATCH_SIZE,
        "patch side: a fraction of the latent's shorter side (1/16) or latent pixels (4)",
    ),
    Arg("temperature", float, _DEFAULTS.temperature, infotext.TEMPERATURE, "SoftMin temperature"),
    Arg("recenter", float, _DEFAULTS.recenter, infotext.RECENTER, "lam of the re-centred uncond"),
    Arg("pool", str, "", infotext.POOL, "a named pool or a folder of LoRAs to choose from", absent=""),
    Arg("top_k", int, 0, infotext.TOP_K, "keep the k most relevant LoRAs per image (0: all)", absent=0),
    Arg(
        "reselect_every",
        int,
        _DEFAULTS.reselect_every,
        infotext.RESELECT_EVERY,
        "steps between selections",
    ),
    Arg("show_maps", bool, False, "", "add each LoRA's weight map to the outputs"),
    Arg(
        "exact_every",
        int,
        _DEFAULTS.exact_every,
        infotext.EXACT_EVERY,
        "gated single pass: exact steps every K-th step (1: every step, the method as written)",
        absent=1,
    ),
    Arg(
        "exact_first",
        int,
        _DEFAULTS.exact_first,
        infotext.EXACT_FIRST,
        "gated single pass: how many leading steps are exact",
    ),
    Arg(
        "weighting",
        str,
        _DEFAULTS.weighting,
        infotext.WEIGHTING,
        f"how divergences become patch weights: {', '.join(WEIGHTINGS)} (softmin: the paper's; "
        "contrast: the default, each LoRA's divergence over its own mean, so where it acts decides)",
        absent="softmin",  # pictures from before the setting were all made with softmin
        choices=WEIGHTINGS,
    ),
    Arg(
        "uncond_loras",
        str,
        _DEFAULTS.uncond_loras,
        infotext.UNCOND_LORAS,
        "with lam < 1, the LoRAs' part of the negative branch: evaluate (every LoRA runs the negative "
        "prompt, 2N + 2 rows a step) or reuse (the positive branch's LoRA change; N + 2 rows, faster)",
        absent="evaluate",  # written only when reuse: every other picture evaluated them
        choices=UNCOND_LORAS,
    ),
)
NAMES = tuple(arg.name for arg in ARGS)


@dataclass(frozen=True)
class Settings:
    """The script's arguments, checked."""

    enabled: bool = False
    mode: str = "LoRAtorio"
    patch_size: str = format_patch(_DEFAULTS)
    temperature: float = _DEFAULTS.temperature
    recenter: float = _DEFAULTS.recenter
    pool: str = ""
    top_k: int = 0
    reselect_every: int = _DEFAULTS.reselect_every
    show_maps: bool = False
    exact_every: int = _DEFAULTS.exact_every
    exact_first: int = _DEFAULTS.exact_first
    weighting: str = _DEFAULTS.weighting
    uncond_loras: str = _DEFAULTS.uncond_loras

    def config(self, num_loras: int | None = None) -> LoRAtorioConfig:
        """The core's config. With ``num_loras``, a top-k of at least that many keeps them all."""
        top_k = self.top_k or None
        if top_k is not None and num_loras is not None and top_k >= num_loras:
            top_k = None
        return LoRAtorioConfig(
            mode=MODE_LABELS[self.mode],
            **parse_patch(self.patch_size),
            weighting=self.weighting,
            temperature=self.temperature,
            recenter=self.recenter,
            top_k=top_k if MODE_LABELS[self.mode] == "loratorio" else None,
            reselect_every=self.reselect_every,
            exact_every=self.exact_every,
            exact_first=self.exact_first,
            uncond_loras=self.uncond_loras,
        )

    def infotext(self) -> dict[str, object]:
        """The generation parameters that record a composition made with these settings."""
        return infotext.generation_params(self.config(), pool=self.pool)


def parse_args(values: Sequence[object]) -> Settings:
    """Script argument values (UI or API order) -> Settings; ValueError naming the bad argument."""
    if len(values) > len(ARGS):
        raise ValueError(
            f"LoRAtorio takes at most {len(ARGS)} arguments ({', '.join(NAMES)}); got {len(values)}"
        )
    parsed = {}
    for index, arg in enumerate(ARGS):
        value = values[index] if index < len(values) else arg.default
        parsed[arg.name] = _coerce(index, arg, value)
    settings = Settings(**parsed)
    for index, arg in enumerate(ARGS):
        value = parsed[arg.name]
        if arg.choices is not None and value not in arg.choices:
            raise ValueError(
                f"LoRAtorio argument {index} ({arg.name}) must be one of {', '.join(arg.choices)}; "
                f"got {value!r}"
            )
    if settings.top_k < 0:
        raise ValueError(f"LoRAtorio argument 6 (top_k) must be 0 (off) or more; got {settings.top_k}")
    try:
        settings.config()
    except ValueError as error:
        raise ValueError(f"LoRAtorio: {error}") from None
    return settings


def from_infotext(params: dict[str, str]) -> dict[str, object]:
    """Generation parameters (as pasted back) -> argument values by name, for the UI fields."""
    if str(params.get(infotext.ENABLED, "")).lower() not in ("true", "1"):
        return {}
    out: dict[str, object] = {"enabled": True}
    for index, arg in enumerate(ARGS):
        if arg.infotext and arg.infotext not in params and arg.absent is not None:
            out[arg.name] = arg.absent
        elif arg.infotext and arg.infotext in params and arg.name != "enabled":
            try:
                out[arg.name] = _coerce(index, arg, params[arg.infotext])
            except ValueError:
                continue  # a hand-edited value that does not parse keeps the field as it is
    return out


def _coerce(index: int, arg: Arg, value: object) -> object:
    where = f"LoRAtorio argument {index} ({arg.name})"
    if arg.kind is PatchSize:
        try:
            return format_patch(LoRAtorioConfig(**parse_patch(value)))
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
    if arg.kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        raise ValueError(f"{where} must be true or false; got {value!r}")
    if arg.kind is str:
        if value is None:
            return arg.default
        if not isinstance(value, str):
            raise ValueError(f"{where} must be a string; got {value!r}")
        return value.strip()
    try:
        if isinstance(value, bool):
            raise TypeError
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where} must be a number; got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{where} must be a finite number; got {value!r}")
    if arg.kind is int:
        if number != int(number):
            raise ValueError(f"{where} must be a whole number; got {value!r}")
        return int(number)
    return number
