"""modules.script_callbacks: registration and runners (exceptions reported and swallowed)."""

from modules import errors

_callbacks: dict[str, list] = {}


class CFGDenoiserParams:
    def __init__(
        self, x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond, denoiser=None
    ):
        self.x, self.image_cond, self.sigma = x, image_cond, sigma
        self.sampling_step, self.total_sampling_steps = sampling_step, total_sampling_steps
        self.text_cond, self.text_uncond, self.denoiser = text_cond, text_uncond, denoiser


def _add(kind):
    def register(callback, *, name=None):
        _callbacks.setdefault(kind, []).append(callback)

    return register


def _run(kind, *args):
    results = []
    for callback in list(_callbacks.get(kind, [])):
        try:
            results.append(callback(*args))
        except Exception:
            errors.report(f"Error executing callback {kind}", exc_info=True)
    return results


for _kind in (
    "cfg_denoiser",
    "cfg_denoised",
    "ui_settings",
    "ui_tabs",
    "model_loaded",
    "script_unloaded",
    "infotext_pasted",
    "before_ui",
    "before_image_saved",
    "app_started",
):
    globals()[f"on_{_kind}"] = _add(_kind)


def cfg_denoiser_callback(params):
    _run("cfg_denoiser", params)


def model_loaded_callback(sd_model):
    _run("model_loaded", sd_model)


def script_unloaded_callback():
    _run("script_unloaded")


def before_ui_callback():
    for callback in reversed(_callbacks.get("before_ui", [])):
        callback()


def ui_settings_callback():
    _run("ui_settings")


def ui_tabs_callback():
    return [tab for result in _run("ui_tabs") for tab in (result or [])]


def infotext_pasted_callback(infotext, params):
    _run("infotext_pasted", infotext, params)


def clear_callbacks():
    _callbacks.clear()


def without_names():
    """As A1111 up to 1.8 and old Forge: the on_* registrations take the callback only (no name=)."""
    for kind in list(_callbacks) + [k[3:] for k in globals() if k.startswith("on_")]:
        named = _add(kind)
        globals()[f"on_{kind}"] = lambda callback, _named=named: _named(callback)
