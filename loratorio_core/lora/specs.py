"""``NAME[:SCALE]``: how a LoRA and its scale are written everywhere (the CLI's ``--lora`` and
``--pool``, the extension's pool names, saved pools)."""

from __future__ import annotations

import math


def split_scale(entry: str) -> tuple[str, float | None]:
    """``NAME[:SCALE]`` -> (name, scale), scale None when none is written. A colon that starts a
    path (``C:\\loras\\a.safetensors``) is part of the name. ValueError for a scale that is not a
    finite number."""
    entry = entry.strip()
    if ":" not in entry:
        return entry, None
    head, tail = entry.rsplit(":", 1)
    try:
        scale = float(tail)
    except ValueError:
        if any(mark in tail for mark in "/\\."):
            return entry, None  # a Windows drive or a path, not a scale
        raise ValueError(f"{entry!r}: {tail!r} is not a scale (write NAME:0.8)") from None
    if not math.isfinite(scale):
        raise ValueError(f"{entry!r}: the scale must be a finite number")
    return head.strip(), scale
