"""LoRAtorio for AUTOMATIC1111 and Forge: the entry script the WebUI discovers. All logic lives in
the repository's ``extension`` package (loaded under a name no other extension can shadow) and in
``loratorio_core``."""

import importlib.util
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name, folder):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name,
        os.path.join(_ROOT, folder, "__init__.py"),
        submodule_search_locations=[os.path.join(_ROOT, folder)],
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_load("loratorio_core", "loratorio_core")
_load("loratorio_extension", "extension")

from loratorio_extension.script import LoRAtorioScript  # noqa: E402,F401 - the WebUI finds the Script subclass here
