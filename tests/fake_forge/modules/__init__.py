"""Forge's ``modules``: where Forge's code differs from A1111's (processing, the CFG denoiser, the
k-diffusion sampler) it is faked here; every other module is the A1111 fake's, found through this
package's path."""

import importlib.util
import os
import sys

_A1111 = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "fake_a1111", "modules"
)
__path__.append(_A1111)


def a1111_version(name):
    """The A1111 fake's module ``name``, for the Forge fakes that build on it."""
    key = f"modules._a1111_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, os.path.join(_A1111, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]
