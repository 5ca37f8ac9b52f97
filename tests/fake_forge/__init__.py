"""A faithful fake of Stable Diffusion WebUI Forge (new "backend" Forge, f2.0.1v1.10.1, commit
dfdcbab6) for the extension's tests, written from Forge's source: UnetPatcher (clone: lora_patches
copied shallowly, model_options deeply), the LoRA patch dictionary and the loader that merges it at
sampling start, KModel (sigma in, x0 out), the sampling function whose calc_cond_uncond_batch calls
model_options' model_function_wrapper with cond_or_uncond, Forge's processing flow with its three
process_before_every_sampling calls under hires fix, and the built-in LoRA. The rest of ``modules``
is the A1111 fake's. A test fixture, never shipped."""

import os
import sys
from types import SimpleNamespace

HERE = os.path.dirname(os.path.abspath(__file__))
A1111 = os.path.join(os.path.dirname(HERE), "fake_a1111")
OLD = os.path.join(HERE, "old")
_PATHS = [HERE, os.path.join(HERE, "lora_builtin"), os.path.join(A1111, "lora_builtin"), A1111]
_MODULES = (
    "modules",
    "gradio",
    "networks",
    "network",
    "extra_networks_lora",
    "backend",
    "modules_forge",
    "ldm_patched",
)


def _purge():
    for name in list(sys.modules):
        if (
            name.split(".")[0] in _MODULES
            or name.startswith("loratorio_extension")
            or name == "loratorio_script"
        ):
            del sys.modules[name]


def install(lora_dir, old=False, **model_kwargs):
    """Put the fake Forge on sys.modules with a FakeForgeSD(**model_kwargs) loaded and LoRAs listed
    from ``lora_dir``; the model is ``.sd`` of the result. ``old``: the ldm_patched Forge (tag
    "previous"), whose patchers keep per-parameter patch lists and which has no ``backend`` package
    (the fake's shared internals are imported first, then hidden from the import system)."""
    _purge()
    paths = [OLD, HERE, os.path.join(A1111, "lora_builtin"), A1111] if old else _PATHS
    for path in reversed(paths):
        sys.path.insert(0, path)
    import extra_networks_lora
    import gradio
    import networks
    from backend import memory_management
    from modules import errors, extra_networks, paths_internal, processing, script_callbacks, shared

    from fake_forge.model import FakeForgeSD

    processing.OLD_FORGE = old
    gradio.__version__ = "3.41.2" if old else "4.40.0"  # f0 (1.8-rc) and f2 (Gradio 4 + WebUI 1.10)
    processing._a1111.LISTS_PER_IMAGE = not old  # f0 (1.8) writes a list value of the infotext whole
    if old:  # its A1111 (1.8) registers callbacks without names
        script_callbacks.without_names()
    sd_model = FakeForgeSD(old=old, **model_kwargs)
    if old:
        import ldm_patched.modules.model_management  # noqa: F401  (its fake shares backend's)
        import ldm_patched.modules.samplers  # noqa: F401

        sys.path.remove(HERE)
        for name in [n for n in sys.modules if n == "backend" or n.startswith("backend.")]:
            del sys.modules[name]
    errors.reported.clear()
    memory_management.unload_all_models()
    shared.sd_model = sd_model
    shared.cmd_opts.lora_dir = str(lora_dir)
    # the WebUI's data folder holds models/Lora; here the test's folder holding the LoRA folder
    paths_internal.data_path = os.path.dirname(os.path.abspath(lora_dir))
    shared.state.interrupted = shared.state.skipped = False
    networks.list_available_networks()
    networks.load_lora_state_dict.cache_clear()
    extra_networks.extra_network_registry.clear()
    extra_networks.register_extra_network(extra_networks_lora.ExtraNetworkLora())
    return SimpleNamespace(
        shared=shared, networks=networks, errors=errors, memory=memory_management, sd=sd_model
    )


def uninstall():
    for path in [OLD, *_PATHS]:
        while path in sys.path:
            sys.path.remove(path)
    _purge()
