"""A tiny LDM-shaped checkpoint as A1111 holds it: sd_model.model.diffusion_model, apply_model(x, t, cond),
a text encoder whose layers carry A1111's names, eps or v parameterization, SD1 or SDXL cond, inpainting."""

from dataclasses import replace

import torch
from torch import nn

from loratorio_core.models import UNetModel, tiny_config

CONTEXT, TOKENS, VECTOR = 16, 5, 8


class _Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = nn.Module()
        self.self_attn.q_proj = nn.Linear(CONTEXT, CONTEXT)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(CONTEXT, 2 * CONTEXT)
        self.mlp.fc2 = nn.Linear(2 * CONTEXT, CONTEXT)


class TinyTextEncoder(nn.Module):
    """Words -> (B, TOKENS, CONTEXT); module names like transformer.text_model.encoder.layers.0.mlp.fc1."""

    def __init__(self, xl: bool):
        super().__init__()
        self.embedding = nn.Embedding(97, CONTEXT)
        self.transformer = nn.Module()
        self.transformer.text_model = nn.Module()
        self.transformer.text_model.encoder = nn.Module()
        self.transformer.text_model.encoder.layers = nn.ModuleList([_Layer()])
        self.vector = nn.Linear(CONTEXT, VECTOR) if xl else None

    def forward(self, prompts):
        """As A1111's CLIP wrapper: a prompt longer than one chunk (TOKENS words, CLIP's 75 tokens)
        is encoded chunk by chunk and the chunks concatenated; every prompt of the batch gets as
        many chunks as the longest (empty ones after its end); SDXL's pooled vector is the first
        chunk's."""
        words = [[sum(map(ord, w)) % 97 for w in prompt.lower().split()] for prompt in prompts]
        chunks = max(1, *((len(ws) + TOKENS - 1) // TOKENS for ws in words))
        encoded = []
        for k in range(chunks):
            ids = [ws[k * TOKENS : (k + 1) * TOKENS] for ws in words]
            encoded.append(self._chunk(torch.tensor([i + [0] * (TOKENS - len(i)) for i in ids])))
        h = torch.cat(encoded, 1)
        if self.vector is None:
            return h
        return {"crossattn": h, "vector": self.vector(encoded[0].mean(1))}

    def _chunk(self, ids):
        h = self.embedding(ids)
        layer = self.transformer.text_model.encoder.layers[0]
        h = h + layer.self_attn.q_proj(h)
        return h + layer.mlp.fc2(torch.nn.functional.gelu(layer.mlp.fc1(h)))


class FakeSD(nn.Module):
    def __init__(self, xl=False, parameterization="eps", inpaint=False, seed=0, edit=False):
        super().__init__()
        torch.manual_seed(seed)
        config = replace(
            tiny_config(context_dim=CONTEXT),
            in_channels=9 if inpaint else 8 if edit else 4,
            out_channels=4,
            adm_in_channels=VECTOR if xl else None,
        )
        self.model = nn.Module()
        self.model.diffusion_model = UNetModel(config).eval()
        self.model.conditioning_key = "hybrid" if (inpaint or edit) and not xl else "crossattn"
        self.cond_stage_model = TinyTextEncoder(xl).eval()
        self.parameterization, self.is_sdxl, self.is_inpaint = parameterization, xl, inpaint
        self.cond_stage_key = "edit" if edit else "txt"  # instruct-pix2pix checkpoints say "edit"
        with torch.no_grad():  # sd_models.get_empty_cond, at load: the empty prompt, no LoRA
            empty = self.get_learned_conditioning([""])
        self.cond_stage_model_empty_prompt = empty["crossattn"] if xl else empty
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        self.alphas_cumprod = torch.cumprod(1 - betas, 0).float()

    def get_learned_conditioning(self, prompts):
        return self.cond_stage_model(prompts)

    def apply_model(self, x_noisy, t, cond):
        unet = self.model.diffusion_model
        concat = self.is_inpaint or self.cond_stage_key == "edit"
        x = torch.cat([x_noisy] + cond["c_concat"], dim=1) if concat else x_noisy
        if self.is_sdxl:
            return unet(x, t, context=cond["crossattn"], y=cond["vector"])
        return unet(x, t, context=torch.cat(cond["c_crossattn"], 1))

    def image_conditioning(self, x, mask):
        if self.cond_stage_key == "edit":  # edit_image_conditioning: the source image's latent
            return x
        if not self.is_inpaint:
            return x.new_zeros(x.shape[0], 5, 1, 1)
        mask = mask if mask is not None else torch.ones_like(x[:, :1])
        return torch.cat([mask, x * (1 - mask)], dim=1)
