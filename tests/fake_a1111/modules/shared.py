"""modules.shared: options, state, the loaded model."""

from types import SimpleNamespace


class OptionInfo:
    def __init__(
        self,
        default=None,
        label="",
        component=None,
        component_args=None,
        onchange=None,
        section=None,
        refresh=None,
        comment_before="",
        comment_after="",
        infotext=None,
        restrict_api=False,
        category_id=None,
    ):
        self.default, self.label, self.component, self.component_args = (
            default,
            label,
            component,
            component_args,
        )
        self.section, self.infotext = section, infotext

    def info(self, text):
        return self

    def needs_reload_ui(self):
        return self


def options_section(section_identifier, options_dict):
    for value in options_dict.values():
        value.section = section_identifier
    return options_dict


class Options:
    def __init__(self):
        object.__setattr__(self, "data", {})
        object.__setattr__(self, "data_labels", {})

    def __getattr__(self, item):
        if item in self.data:
            return self.data[item]
        if item in self.data_labels:
            return self.data_labels[item].default
        raise AttributeError(item)

    def __setattr__(self, key, value):
        self.data[key] = value

    def add_option(self, key, info):
        self.data_labels[key] = info
        self.data.setdefault(key, info.default)

    def onchange(self, key, func, call=True):
        pass


class State:
    def __init__(self):
        self.interrupted = False
        self.skipped = False
        self.sampling_step = 0
        self.sampling_steps = 0

    def interrupt(self):
        self.interrupted = True


opts = Options()
opts.data.update(
    batch_cond_uncond=True,
    lora_functional=False,
    skip_early_cond=0.0,
    s_min_uncond=0.0,
    return_grid=True,
    grid_only_if_multiple=True,
    s_min_uncond_all=False,
    pad_cond_uncond=False,
    pad_cond_uncond_v0=False,
)
options_templates = opts.data_labels
state = State()
sd_model = None
cmd_opts = SimpleNamespace(lora_dir=None)
