"""comfy/patcher_extension.py: wrapper lists kept in transformer_options["wrappers"][type][key],
and the executor that calls them outermost first, the original function last."""

from __future__ import annotations


class WrappersMP:
    OUTER_SAMPLE = "outer_sample"
    CALC_COND_BATCH = "calc_cond_batch"
    APPLY_MODEL = "apply_model"


def add_wrapper_with_key(wrapper_type, key, wrapper, transformer_options, is_model_options=False):
    if is_model_options:
        transformer_options = transformer_options.setdefault("transformer_options", {})
    wrappers = transformer_options.setdefault("wrappers", {})
    wrappers.setdefault(wrapper_type, {}).setdefault(key, []).append(wrapper)


def get_all_wrappers(wrapper_type, transformer_options, is_model_options=False):
    if is_model_options:
        transformer_options = transformer_options.get("transformer_options", {})
    out = []
    for wrappers in transformer_options.get("wrappers", {}).get(wrapper_type, {}).values():
        out.extend(wrappers)
    return out


def copy_nested_dicts(input_dict: dict):
    """As ComfyUI's: dicts copied at every level, other values shared."""
    return {k: copy_nested_dicts(v) if isinstance(v, dict) else v for k, v in input_dict.items()}


def merge_nested_dicts(dict1: dict, dict2: dict, copy_dict1=True):
    merged = copy_nested_dicts(dict1) if copy_dict1 else dict1
    for key, value in dict2.items():
        if isinstance(value, dict):
            merged[key] = merge_nested_dicts(merged.get(key, {}), value) if key in merged else value
        elif isinstance(value, list):
            merged[key] = merged.get(key, []) + value
        else:
            merged[key] = value
    return merged


class WrapperExecutor:
    def __init__(self, original, wrappers, idx):
        self.original, self.wrappers, self.idx = original, list(wrappers), idx
        self.is_last = idx == len(wrappers)

    def __call__(self, *args, **kwargs):
        return WrapperExecutor(self.original, self.wrappers, self.idx + 1).execute(*args, **kwargs)

    def execute(self, *args, **kwargs):
        if self.is_last:
            return self.original(*args, **kwargs)
        return self.wrappers[self.idx](self, *args, **kwargs)

    @classmethod
    def new_executor(cls, original, wrappers, idx=0):
        return cls(original, wrappers, idx)
