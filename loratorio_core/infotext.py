"""The generation parameters ("infotext") that record a composition: the one writer for every
interface.

The keys and values are the ones AUTOMATIC1111 and Forge show under an image and paste back
("Read generation parameters", "Send to"): the WebUI extension puts them into the generation's
parameters and ``loratorio generate`` into its PNGs, so a picture from either pastes into the
extension's fields. Nothing is written for a generation that composed nothing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from .config import LoRAtorioConfig, format_patch

# The core's mode names -> the labels the WebUI shows and the infotext records.
MODE_LABELS = {"loratorio": "LoRAtorio", "composite": "Composite", "switch": "Switch", "merge": "Merge"}

ENABLED = "LoRAtorio"
MODE = "LoRAtorio mode"
PATCH_SIZE = "LoRAtorio patch size"
WEIGHTING = "LoRAtorio weighting"  # absent: softmin, the only rule before 0.2
TEMPERATURE = "LoRAtorio temperature"
RECENTER = "LoRAtorio recenter"
POOL = "LoRAtorio pool"
TOP_K = "LoRAtorio top-k"
RESELECT_EVERY = "LoRAtorio reselect every"
KEPT = "LoRAtorio kept"  # per image: the LoRAs top-k kept
EXACT_EVERY = "LoRAtorio exact every"  # the gated single pass; written only when it is on
EXACT_FIRST = "LoRAtorio exact first"
UNCOND_LORAS = "LoRAtorio uncond LoRAs"  # written only when the uncond reuses the cond's change


def generation_params(config: LoRAtorioConfig, pool: str = "") -> dict[str, object]:
    """The parameters that record a composition made with ``config`` (from ``pool``, if any)."""
    params: dict[str, object] = {
        ENABLED: True,
        MODE: MODE_LABELS[config.mode],
        PATCH_SIZE: format_patch(config),  # "1/16" (of the latent's side) or "4" (latent pixels)
        WEIGHTING: config.weighting,
        TEMPERATURE: config.temperature,
        RECENTER: config.recenter,
    }
    if pool:
        params[POOL] = pool
    if config.top_k is not None:
        params[TOP_K] = config.top_k
        params[RESELECT_EVERY] = config.reselect_every
    if config.gated:
        params[EXACT_EVERY] = config.exact_every
        params[EXACT_FIRST] = config.exact_first
    if config.reuses_cond_change:
        params[UNCOND_LORAS] = config.uncond_loras
    return params


def kept_value(names: Sequence[str]) -> str:
    """The ``LoRAtorio kept`` value of one image."""
    return ", ".join(names)


def format_params(params: Mapping[str, object]) -> str:
    """The parameters line as A1111 writes it: ``key: value`` joined by ", ", a value holding a
    comma, colon or newline JSON-quoted (so it reads back whole); None values left out."""
    parts = []
    for key, value in params.items():
        if value is None:
            continue
        text = str(value)
        if any(mark in text for mark in (",", ":", "\n")):
            text = json.dumps(text, ensure_ascii=False)
        parts.append(f"{key}: {text}")
    return ", ".join(parts)
