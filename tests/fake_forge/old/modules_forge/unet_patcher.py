"""modules_forge.unet_patcher (old Forge): the UNet patcher with Forge's sampling extras."""

from ldm_patched.modules.model_patcher import ModelPatcher


class UnetPatcher(ModelPatcher):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.controlnet_linked_list = None
        self.extra_preserved_memory_during_sampling = 0
        self.extra_model_patchers_during_sampling = []
        self.extra_concat_condition = None

    def clone(self):
        n = self._copy_into(
            UnetPatcher(self.model, self.load_device, self.offload_device, self.size, self.current_device)
        )
        n.controlnet_linked_list = self.controlnet_linked_list
        n.extra_preserved_memory_during_sampling = self.extra_preserved_memory_during_sampling
        n.extra_model_patchers_during_sampling = self.extra_model_patchers_during_sampling.copy()
        n.extra_concat_condition = self.extra_concat_condition
        return n

    def add_extra_preserved_memory_during_sampling(self, memory_in_bytes: int):
        self.extra_preserved_memory_during_sampling += memory_in_bytes

    def append_model_option(self, k, v, ensure_uniqueness=False):
        if k not in self.model_options:
            self.model_options[k] = []
        if ensure_uniqueness and v in self.model_options[k]:
            return
        self.model_options[k].append(v)

    def add_sampler_pre_cfg_function(self, modifier, ensure_uniqueness=False):
        self.append_model_option("sampler_pre_cfg_function", modifier, ensure_uniqueness)

    def set_memory_peak_estimation_modifier(self, modifier):
        self.model_options["memory_peak_estimation_modifier"] = modifier

    def list_controlnets(self):
        return []
