"""modules.scripts: the Script API and the runner of always-on scripts' hooks."""

from collections import namedtuple

from modules import errors

AlwaysVisible = object()
ScriptClassData = namedtuple("ScriptClassData", ["script_class", "path", "basedir", "module"])
scripts_data: list = []
_current_basedir = None


def basedir():
    return _current_basedir


class PostprocessImageArgs:
    def __init__(self, image):
        self.image = image


class Script:
    name = None
    filename = None
    args_from = None
    args_to = None
    alwayson = False
    is_txt2img = False
    is_img2img = False
    infotext_fields = None
    paste_field_names = None

    def title(self):
        raise NotImplementedError

    def ui(self, is_img2img):
        pass

    def show(self, is_img2img):
        return True

    def process(self, p, *args):
        pass

    def before_process_batch(self, p, *args, **kwargs):
        pass

    def after_extra_networks_activate(self, p, *args, **kwargs):
        pass

    def process_before_every_sampling(self, p, *args, **kwargs):
        pass

    def process_batch(self, p, *args, **kwargs):
        pass

    def postprocess_batch(self, p, *args, **kwargs):
        pass

    def postprocess_image(self, p, pp, *args):
        pass

    def postprocess(self, p, processed, *args):
        pass

    def before_hr(self, p, *args):
        pass

    def elem_id(self, item_id):
        return f"script_{'img2img' if self.is_img2img else 'txt2img'}_{self.title().lower()}_{item_id}"


class ScriptRunner:
    """Always-on scripts with their argument ranges; every hook is try/except-reported."""

    def __init__(self, scripts, is_img2img=False):
        self.alwayson_scripts = []
        self.inputs = []
        self.infotext_fields = []
        for script in scripts:
            script.is_img2img, script.is_txt2img = is_img2img, not is_img2img
            if script.show(is_img2img) is not AlwaysVisible:
                continue
            script.alwayson = True
            controls = script.ui(is_img2img)
            script.name = script.title().lower()
            script.args_from = len(self.inputs)
            self.inputs.extend(controls or [])
            script.args_to = len(self.inputs)
            self.infotext_fields.extend(script.infotext_fields or [])
            self.alwayson_scripts.append(script)

    def default_args(self):
        return [getattr(control, "value", None) for control in self.inputs]

    def _run(self, hook, p, *extra, **kwargs):
        for script in self.alwayson_scripts:
            try:
                args = p.script_args[script.args_from : script.args_to]
                getattr(script, hook)(p, *extra, *args, **kwargs)
            except Exception:
                errors.report(f"Error running {hook}: {script.filename}", exc_info=True)

    def process(self, p):
        self._run("process", p)

    def before_process_batch(self, p, **kwargs):
        self._run("before_process_batch", p, **kwargs)

    def after_extra_networks_activate(self, p, **kwargs):
        self._run("after_extra_networks_activate", p, **kwargs)

    def process_before_every_sampling(self, p, **kwargs):
        self._run("process_before_every_sampling", p, **kwargs)

    def process_batch(self, p, **kwargs):
        self._run("process_batch", p, **kwargs)

    def postprocess_batch(self, p, images, **kwargs):
        self._run("postprocess_batch", p, images=images, **kwargs)

    def postprocess_image(self, p, pp):
        for script in self.alwayson_scripts:
            try:
                script.postprocess_image(p, pp, *p.script_args[script.args_from : script.args_to])
            except Exception:
                errors.report(f"Error running postprocess_image: {script.filename}", exc_info=True)

    def before_hr(self, p):
        self._run("before_hr", p)

    def postprocess(self, p, processed):
        for script in self.alwayson_scripts:
            try:
                script.postprocess(p, processed, *p.script_args[script.args_from : script.args_to])
            except Exception:
                errors.report(f"Error running postprocess: {script.filename}", exc_info=True)
