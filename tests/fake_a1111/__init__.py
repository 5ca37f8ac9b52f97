"""A faithful fake of AUTOMATIC1111 1.10.1's ``modules`` package and built-in Lora extension.

Written from reading A1111's source (commit 82a973c0) for the extension's tests: the script
runner and its hook order, callbacks, the CFG denoiser's batching (cond rows first, AND repeats,
one call or chunks), the k-diffusion eps/v wrappers and samplers (Euler, second-order Heun),
processing with hires fix and img2img, extra networks, and the built-in Lora that merges weights
on forward through class-level patches. ``install()`` puts it on ``sys.modules``; ``uninstall()``
takes it off and undoes the patches. A test fixture, never shipped.
"""

import os
import sys
from types import SimpleNamespace

HERE = os.path.dirname(os.path.abspath(__file__))
_PATHS = [HERE, os.path.join(HERE, "lora_builtin")]
_MODULES = (
    "modules",
    "gradio",
    "networks",
    "network",
    "network_lora",
    "network_norm",
    "lora_patches",
    "extra_networks_lora",
)


def _purge():
    for name in list(sys.modules):
        if (
            name.split(".")[0] in _MODULES
            or name.startswith("loratorio_extension")
            or name == "loratorio_script"
        ):
            del sys.modules[name]


def install(sd_model, lora_dir):
    """Put the fake WebUI on sys.modules with ``sd_model`` loaded and LoRAs listed from ``lora_dir``."""
    _purge()
    for path in reversed(_PATHS):
        sys.path.insert(0, path)
    import extra_networks_lora
    import lora_patches
    import networks
    from modules import errors, extra_networks, paths_internal, shared

    errors.reported.clear()
    shared.sd_model = sd_model
    shared.cmd_opts.lora_dir = str(lora_dir)
    # the WebUI's data folder holds models/Lora; here the test's folder holding the LoRA folder
    paths_internal.data_path = os.path.dirname(os.path.abspath(lora_dir))
    shared.state.interrupted = shared.state.skipped = False
    networks.originals = lora_patches.LoraPatches()
    networks.assign_network_names_to_compvis_modules(sd_model)
    networks.list_available_networks()
    extra_networks.extra_network_registry.clear()
    extra_networks.register_extra_network(extra_networks_lora.ExtraNetworkLora())
    return SimpleNamespace(shared=shared, networks=networks, errors=errors)


def uninstall():
    networks = sys.modules.get("networks")
    if networks is not None and networks.originals is not None:
        networks.originals.undo()
    for path in _PATHS:
        while path in sys.path:
            sys.path.remove(path)
    _purge()
