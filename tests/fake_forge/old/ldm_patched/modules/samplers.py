"""ldm_patched.modules.samplers (old Forge): the same calc_cond_uncond_batch (chunks reversed, split by the
memory check) and pre-CFG functions as the new backend's; the fake shares that implementation."""

from backend.sampling.sampling_function import calc_cond_uncond_batch, sampling_function_inner  # noqa: F401
