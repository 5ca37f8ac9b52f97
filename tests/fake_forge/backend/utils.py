"""backend.utils: file loading and dotted attribute access, as the patchers use them."""

import safetensors.torch


def load_torch_file(ckpt, safe_load=False, device=None):
    return safetensors.torch.load_file(ckpt, device=str(device or "cpu"))


def get_attr(obj, attr):
    for name in attr.split("."):
        obj = getattr(obj, name)
    return obj


def get_attr_with_parent(obj, attr):
    names = attr.split(".")
    parent = get_attr(obj, ".".join(names[:-1])) if len(names) > 1 else obj
    return parent, names[-1], getattr(parent, names[-1])


def set_attr_raw(obj, attr, value):
    parent, name, _ = get_attr_with_parent(obj, attr)
    setattr(parent, name, value)
