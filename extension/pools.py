"""Pools of LoRAs for dynamic selection: a named pool, or folders and LoRA names, comma-separated,
each with an optional scale (``name:0.7``; 1.0 without one).

Named pools (``{"name": ["lora", "lora:0.7", ...]}``, edited in the LoRAtorio tab) are user data, so they live
in the WebUI's data folder, ``<data_dir>/loratorio/pools.json``, and never in the extension's own
folder: the WebUI's extension updater resets that folder to the newest commit (A1111 and Forge run
``git fetch`` + ``git reset --hard``), which would delete or overwrite them. Versions before this
one wrote the repository's ``pools.json``; pools found there are moved to the data folder once and
that file is put back to its committed content, so the work tree is clean and updates apply.

Pool LoRAs are read with LoRAtorio's own loader (.safetensors only) and cached until their file
changes.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from loratorio_core.lora import LoRAFile, load_lora, split_scale

LEGACY_FILE = Path(__file__).resolve().parent.parent / "pools.json"
LEGACY_CONTENT = "{}"  # the legacy file as the repository commits it
_cache: dict[str, tuple[float, LoRAFile]] = {}


def pools_file() -> Path:
    """Where named pools are saved: the WebUI's data folder (``--data-dir``), after moving any pools
    an older version left in the extension's folder."""
    from modules import paths_internal

    path = Path(paths_internal.data_path) / "loratorio" / "pools.json"
    migrate_legacy(path)
    return path


def migrate_legacy(target: Path, legacy: Path = LEGACY_FILE) -> None:
    """Move the pools of ``legacy`` into ``target`` (a pool already in ``target`` wins), then write
    ``legacy`` back to its committed content. Nothing to do when ``legacy`` holds no pool."""
    if not legacy.is_file():
        return
    old = _read(legacy)
    if not old:
        return
    current = _read(target) if target.is_file() else {}
    _write(target, {**old, **current})
    legacy.write_text(LEGACY_CONTENT, encoding="utf-8")
    print(
        f"LoRAtorio: moved {len(old)} saved pool(s) from {legacy} to {target}, where updates of the "
        "extension cannot touch them",
        file=sys.stderr,
    )


def read_pools(path: Path | None = None) -> dict[str, list[str]]:
    """The named pools (``path``: the pools file; default ``pools_file()``)."""
    path = pools_file() if path is None else path
    return _read(path) if path.is_file() else {}


def save_pool(name: str, loras: list[str], path: Path | None = None) -> dict[str, list[str]]:
    """Save (or, with no LoRAs, delete) the pool ``name``; returns every pool."""
    name = name.strip()
    if not name:
        raise ValueError("a pool needs a name")
    for entry in loras:
        split_scale(entry)  # a scale that does not parse fails here, naming the entry
    path = pools_file() if path is None else path
    pools = read_pools(path)
    if loras:
        pools[name] = list(loras)
    else:
        pools.pop(name, None)
    _write(path, pools)
    return pools


def resolve(pool: str, available: dict, path: Path | None = None) -> list[tuple[Path, float]]:
    """(file, scale) of each LoRA of a pool setting: a named pool, or comma-separated folders and
    LoRA names, each ``entry[:scale]``.

    available: the WebUI's LoRA list (name -> an object with ``filename``).
    """
    pool = pool.strip()
    entries = read_pools(path).get(pool) or [e for e in pool.split(",") if e.strip()]
    files, missing = [], []
    for entry in entries:
        try:
            target, scale = split_scale(entry)
        except ValueError as error:
            raise ValueError(f"LoRAtorio pool {pool!r}: {error}") from None
        scale = 1.0 if scale is None else scale
        folder = Path(os.path.expanduser(target))
        if folder.is_dir():
            found = sorted(folder.glob("*.safetensors"))
            if not found:
                raise ValueError(f"LoRAtorio pool {pool!r}: the folder {target} holds no .safetensors LoRA")
            files += [(file, scale) for file in found]
        elif target in available:
            files.append((Path(available[target].filename), scale))
        else:
            missing.append(target)
    if missing:
        raise ValueError(
            f"LoRAtorio pool {pool!r}: no folder, named pool or LoRA called {', '.join(map(str, missing))} "
            "(refresh the LoRA list, or check the name)"
        )
    return files


def load_cached(path: Path) -> LoRAFile:
    key = str(path)
    mtime = os.path.getmtime(path)
    if key not in _cache or _cache[key][0] != mtime:
        _cache[key] = (mtime, load_lora(path))
    return _cache[key][1]


def _read(path: Path) -> dict[str, list[str]]:
    try:
        pools = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not a valid pools file ({error}); fix or delete it") from None
    if not isinstance(pools, dict) or not all(isinstance(v, list) for v in pools.values()):
        raise ValueError(f"{path}: must map pool names to lists of LoRA names; fix or delete it")
    return {str(k): [str(n) for n in v] for k, v in pools.items()}


def _write(path: Path, pools: dict[str, list[str]]) -> None:
    """Whole or not at all: a crash mid-write must not leave a truncated pools file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps(pools, indent=2), encoding="utf-8")
    os.replace(partial, path)
