"""Pools of LoRAs for dynamic selection: a folder, a named pool, or LoRA names.

Named pools live in ``pools.json`` beside the extension (``{"name": ["lora", ...]}``), edited in
the LoRAtorio tab. Pool LoRAs are read with LoRAtorio's own loader (.safetensors only) and cached
until their file changes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from loratorio_core.lora import LoRAFile, load_lora

POOLS_FILE = Path(__file__).resolve().parent.parent / "pools.json"
_cache: dict[str, tuple[float, LoRAFile]] = {}


def read_pools(path: Path = POOLS_FILE) -> dict[str, list[str]]:
    if not path.is_file():
        return {}
    try:
        pools = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not a valid pools file ({error}); fix or delete it") from None
    if not isinstance(pools, dict) or not all(isinstance(v, list) for v in pools.values()):
        raise ValueError(f"{path}: must map pool names to lists of LoRA names")
    return {str(k): [str(n) for n in v] for k, v in pools.items()}


def save_pool(name: str, loras: list[str], path: Path = POOLS_FILE) -> dict[str, list[str]]:
    name = name.strip()
    if not name:
        raise ValueError("a pool needs a name")
    pools = read_pools(path)
    if loras:
        pools[name] = list(loras)
    else:
        pools.pop(name, None)
    path.write_text(json.dumps(pools, indent=2), encoding="utf-8")
    return pools


def resolve(pool: str, available: dict, path: Path = POOLS_FILE) -> list[Path]:
    """The LoRA files of a pool setting: a folder, a named pool, or comma-separated LoRA names.

    available: the WebUI's LoRA list (name -> an object with ``filename``).
    """
    pool = pool.strip()
    folder = Path(os.path.expanduser(pool))
    if folder.is_dir():
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise ValueError(f"LoRAtorio pool {pool!r}: the folder holds no .safetensors LoRA")
        return files
    names = read_pools(path).get(pool) or [n.strip() for n in pool.split(",") if n.strip()]
    files, missing = [], []
    for name in names:
        entry = available.get(name)
        (files if entry is not None else missing).append(Path(entry.filename) if entry is not None else name)
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
