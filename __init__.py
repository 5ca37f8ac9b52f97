"""ComfyUI's entry point: ComfyUI imports this file from ``custom_nodes/<this folder>/`` and reads
``NODE_CLASS_MAPPINGS`` / ``NODE_DISPLAY_NAME_MAPPINGS``. The A1111/Forge WebUIs never import it
(they load ``scripts/*.py`` by file), and neither does the ``loratorio`` package (``loratorio_core``).
The two packages are loaded by file under names no other custom node can shadow, as
``scripts/loratorio.py`` loads them in the WebUIs."""

import importlib.util
import os
import sys

_ROOT = os.path.dirname(os.path.abspath(__file__))


def _load(name, folder):
    if name in sys.modules:
        return sys.modules[name]
    location = os.path.join(_ROOT, folder)
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(location, "__init__.py"), submodule_search_locations=[location]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_load("loratorio_core", "loratorio_core")
_load("loratorio_extension", "extension")

from loratorio_extension.comfyui_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
