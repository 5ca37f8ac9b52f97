"""backend.modules.k_model: KModel -- the UNet and its predictor; apply_model takes sigma and
returns the denoised x0 (float32)."""

import torch


class KModel(torch.nn.Module):
    def __init__(self, diffusion_model, predictor, computation_dtype=torch.float32):
        super().__init__()
        self.diffusion_model = diffusion_model
        self.predictor = predictor
        self.computation_dtype = computation_dtype

    def apply_model(
        self,
        x,
        t,
        c_concat=None,
        c_crossattn=None,
        control=None,
        transformer_options={},  # noqa: B006 -- Forge's signature
        **kwargs,
    ):
        sigma = t
        xc = self.predictor.calculate_input(sigma, x)
        if c_concat is not None:
            xc = torch.cat([xc, c_concat], dim=1)
        t = self.predictor.timestep(t).float()
        extra = {k: v.to(self.computation_dtype) for k, v in kwargs.items() if torch.is_tensor(v)}
        out = self.diffusion_model(xc, t, context=c_crossattn, **extra).float()
        if control is not None:  # the fake UNet takes a ControlNet's residual on its output
            out = out + control["output"][0]
        return self.predictor.calculate_denoised(sigma, out, x)

    def memory_required(self, input_shape):
        """Forge's estimate with PyTorch attention: 1.28 * area * dtype size * 16384 bytes."""
        area = input_shape[0] * input_shape[2] * input_shape[3]
        dtype_size = torch.empty((), dtype=self.computation_dtype).element_size()
        return 1.28 * area * dtype_size * 16384
