"""Which WebUI loaded the extension, decided once at load time from the packages it has."""

from __future__ import annotations

import importlib.util

A1111, FORGE, FORGE_OLD = "a1111", "forge", "forge-old"


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing or half-initialised
        return False


def detect() -> str:
    """``forge`` (the "backend" Forge, f2), ``forge-old`` (ldm_patched Forge f0 and reForge) or ``a1111``."""
    if not _has("modules_forge"):
        return A1111
    if _has("backend.patcher.unet"):
        return FORGE
    return FORGE_OLD


def session_class(host: str):
    """The Session subclass that drives generations on ``host``."""
    if host == A1111:
        from .a1111 import A1111Session

        return A1111Session
    if host == FORGE:
        from .forge_f2 import Forge2Session

        return Forge2Session
    from .forge_f0 import Forge0Session

    return Forge0Session
