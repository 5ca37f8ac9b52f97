"""ldm_patched.modules.lora (old Forge): "lora" patches are 4-tuples (up, down, alpha, mid), no DoRA."""

from backend.patcher import lora as _new


def load_lora(lora, to_load):
    patches, rest = _new.load_lora(lora, to_load)
    return {k: (kind, v[:4]) if kind == "lora" else (kind, v) for k, (kind, v) in patches.items()}, rest


model_lora_keys_unet = _new.model_lora_keys_unet
model_lora_keys_clip = _new.model_lora_keys_clip
