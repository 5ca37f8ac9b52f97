"""ldm_patched.modules.model_management (old Forge): loading a patcher that is not loaded yet unloads
its clones and merges its patches (the old patcher's refresh: restore, then merge all)."""

from backend.memory_management import current_loaded_models, load_model_gpu, load_models_gpu  # noqa: F401
