"""Train the synthetic ComposLoRA's base model and its 11 concept LoRAs (deterministic, CPU).

    python benchmarks/train_synthetic.py base                 # ~15 min on one core
    python benchmarks/train_synthetic.py lora kiro zebu ...   # ~3 min per LoRA on one core
    python benchmarks/train_synthetic.py check                # each LoRA alone, through its detector

Two one-thread processes (e.g. half the LoRAs each) beat one two-thread process on small CPUs.
The base model sees plain scenes only (white shapes on plain backgrounds); each LoRA sees its
own concept behind its trigger token, and its loss is weighted toward the pixels the concept
changes (small, local concepts otherwise learn a global tint first). LoRAs are trained at the
scale they are used at (0.8) and written in kohya format with ``save_lora``.
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loratorio_core.config import LoRAtorioConfig  # noqa: E402
from loratorio_core.lora.files import LayerUpdate, save_lora  # noqa: E402
from loratorio_core.synthetic import detectors, world  # noqa: E402
from loratorio_core.synthetic.model import (  # noqa: E402
    BASE_FILE,
    LORA_SCALE,
    TRAIN_STEPS,
    WEIGHTS,
    Job,
    TextEncoder,
    encode_images,
    load_model,
    lora_path,
    new_unet,
    sample,
    save_base,
    scaled_linear_alphas_cumprod,
)

LAYOUTS = [
    {"dx": dx, "dy": dy, "object_right": side}
    for dx in range(-2, 3)
    for dy in range(-1, 2)
    for side in (0, 1)
]


def base_dataset() -> tuple[Tensor, Tensor]:
    """Every plain scene: (M, 3, 32, 32) images and (M, T) caption ids."""
    images, ids = [], []
    for shape in world.BASE_SHAPES:
        for background in world.BASE_BACKGROUNDS:
            for layout in LAYOUTS[::2]:
                scene = world.Scene(background=background, figure=shape, **layout)
                images.append(world.render(scene))
                ids.append(world.tokenize(world.caption(scene)))
    return torch.stack(images), torch.stack(ids)


def concept_dataset(name: str) -> tuple[Tensor, Tensor, Tensor]:
    """Every scene of one concept: images, caption ids and (M, 1, 16, 16) latent-resolution
    masks of the pixels the concept changes (against the same scene without it)."""
    category = world.CONCEPT[name].category
    slot = {
        "character": "figure",
        "clothing": "clothing",
        "background": "background",
        "object": "object",
        "style": "style",
    }[category]
    images, ids, masks = [], [], []
    figures = [name] if category == "character" else list(world.BASE_SHAPES)
    backgrounds = [name] if category == "background" else list(world.BASE_BACKGROUNDS)
    for figure in figures:
        for background in backgrounds:
            for layout in LAYOUTS:
                scene = world.Scene(background=background, figure=figure, **layout)
                scene = replace(scene, **{slot: name})
                plain = replace(scene, **({slot: None} if slot in ("clothing", "object", "style") else {}))
                if category == "character":
                    plain = replace(scene, figure="square")
                if category == "background":
                    plain = replace(scene, background="gray")
                image = world.render(scene)
                changed = (image - world.render(plain)).abs().amax(0, keepdim=True) > 0.02
                images.append(image)
                ids.append(world.tokenize(world.caption(scene)))
                masks.append(F.max_pool2d(changed.float()[None], 2)[0])
    return torch.stack(images), torch.stack(ids), torch.stack(masks)


def noisy(latents: Tensor, alphas: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """(x_t, t, eps) for uniformly drawn timesteps."""
    t = torch.randint(0, TRAIN_STEPS, (latents.shape[0],), generator=gen)
    eps = torch.randn(latents.shape, generator=gen)
    a = alphas[t].view(-1, 1, 1, 1)
    return a.sqrt() * latents + (1 - a).sqrt() * eps, t, eps


def train_base(
    steps: int, batch: int, seed: int, out: Path, resume: bool = False, peak_lr: float = 2e-3
) -> None:
    """``resume``: continue from the base model in ``out`` (the shipped one is 2000 steps at
    peak_lr 2e-3, seed 0, then 2000 resumed steps at peak_lr 1e-3, seed 1)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    if resume:
        previous = load_model(out, loras=[])
        unet, text = (
            previous.unet.requires_grad_(True).train(),
            previous.text_encoder.requires_grad_(True).train(),
        )
    else:
        unet, text = new_unet(), TextEncoder()
    ema_unet, ema_text = copy.deepcopy(unet), copy.deepcopy(text)
    images, ids = base_dataset()
    latents = encode_images(images)
    alphas = scaled_linear_alphas_cumprod()
    params = [*unet.parameters(), *text.parameters()]
    opt = torch.optim.AdamW(params, lr=peak_lr, weight_decay=0.0)
    started = time.time()
    for step in range(steps):
        lr = peak_lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        pick = torch.randint(0, len(latents), (batch,), generator=gen)
        caption_ids = ids[pick].clone()
        caption_ids[torch.rand(batch, generator=gen) < 0.1] = 0  # the empty prompt, for CFG
        x_t, t, eps = noisy(latents[pick], alphas, gen)
        loss = F.mse_loss(unet(x_t, t, text(caption_ids)), eps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            decay = 0.999 if resume else min(0.999, (1 + step) / (10 + step))
            for ema, live in ((ema_unet, unet), (ema_text, text)):
                for p_ema, p in zip(ema.parameters(), live.parameters(), strict=True):
                    p_ema.lerp_(p, 1 - decay)
        if step % 50 == 0 or step == steps - 1:
            print(f"base step {step} loss {loss.item():.4f} ({time.time() - started:.0f} s)", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    save_base(out / BASE_FILE, ema_unet, ema_text)
    print(f"wrote {out / BASE_FILE} in {time.time() - started:.0f} s")


def lora_targets(unet: nn.Module) -> list[str]:
    """The layers a LoRA trains: every attention projection and every ResBlock conv."""
    names = []
    for name, module in unet.named_modules():
        if ".attn" in name and isinstance(module, nn.Linear):
            names.append(name)
        elif name.endswith(("in_layers.2", "out_layers.3")) and isinstance(module, nn.Conv2d):
            names.append(name)
    return names


class TrainableLoRA:
    """Low-rank updates on ``targets`` of ``unet`` through forward hooks (training only; sampling
    uses the project's ``LoRARuntime`` on the saved file)."""

    def __init__(self, unet: nn.Module, targets: list[str], rank: int, scale: float, gen: torch.Generator):
        modules = dict(unet.named_modules())
        self.rank, self.scale = rank, scale
        self.params: dict[str, tuple[nn.Parameter, nn.Parameter]] = {}
        self.handles = []
        for name in targets:
            module = modules[name]
            if isinstance(module, nn.Linear):
                down = torch.randn(rank, module.in_features, generator=gen) / module.in_features**0.5
                up = torch.zeros(module.out_features, rank)
            else:
                fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
                down = torch.randn(rank, module.in_channels, *module.kernel_size, generator=gen) / fan_in**0.5
                up = torch.zeros(module.out_channels, rank, 1, 1)
            pair = (nn.Parameter(down), nn.Parameter(up))
            self.params[name] = pair
            self.handles.append(module.register_forward_hook(self._hook(module, pair)))

    def _hook(self, module: nn.Module, pair: tuple[nn.Parameter, nn.Parameter]):
        down, up = pair

        def hook(mod, args, output):
            x = args[0]
            if isinstance(module, nn.Linear):
                delta = F.linear(F.linear(x, down), up)
            else:
                delta = F.conv2d(F.conv2d(x, down, None, module.stride, module.padding), up)
            return output + self.scale * delta

        return hook

    def parameters(self) -> list[nn.Parameter]:
        return [p for pair in self.params.values() for p in pair]

    def layers(self) -> dict[tuple[str, str], LayerUpdate]:
        """The kohya layers (alpha = rank, so the file's up @ down is the update itself), fp16."""
        return {
            ("unet", name.replace(".", "_")): LayerUpdate(
                down=down.detach().half(), up=up.detach().half(), alpha=float(self.rank)
            )
            for name, (down, up) in self.params.items()
        }


def train_lora(
    name: str, steps: int, batch: int, rank: int, seed: int, weights: Path, concept_weight: float = 4.0
) -> None:
    gen = torch.Generator().manual_seed(seed + sum(map(ord, name)))
    model = load_model(weights, loras=[])
    unet, text = model.unet, model.text_encoder
    images, ids, masks = concept_dataset(name)
    latents = encode_images(images)
    with torch.no_grad():
        contexts = text(ids)
    # Loss weight: 1 everywhere, 1 + concept_weight on the latent pixels the concept changes.
    weight = 1.0 + concept_weight * masks
    lora = TrainableLoRA(unet, lora_targets(unet), rank, LORA_SCALE, gen)
    opt = torch.optim.AdamW(lora.parameters(), lr=4e-3, weight_decay=0.0)
    started = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = 4e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        pick = torch.randint(0, len(latents), (batch,), generator=gen)
        x_t, t, eps = noisy(latents[pick], model.alphas_cumprod, gen)
        error = (unet(x_t, t, contexts[pick]) - eps) ** 2
        loss = (error * weight[pick]).sum() / (weight[pick].sum() * error.shape[1])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"{name} step {step} loss {loss.item():.4f} ({time.time() - started:.0f} s)", flush=True)
    concept = world.CONCEPT[name]
    metadata = {
        "ss_output_name": name,
        "loratorio_trigger": name,
        "loratorio_category": concept.category,
        "loratorio_description": concept.description,
    }
    save_lora(lora_path(name, weights), lora.layers(), metadata)
    print(f"wrote {lora_path(name, weights)} in {time.time() - started:.0f} s", flush=True)


def alone_rates(names: list[str], seeds: int, weights: Path) -> dict[str, float]:
    """Each LoRA alone (LoRAtorio with one LoRA is that LoRA under CFG), prompt = its training
    caption form: the rate its detector finds its concept. This bounds any composition."""
    model = load_model(weights, loras=names)
    rng = random.Random(0)
    jobs = []
    for name in names:
        scene = world.scene_for((name,), rng, background="gray")
        jobs.append(Job((name,), tuple(world.caption(scene)), tuple(range(seeds))))
    out = sample(model, jobs, LoRAtorioConfig(mode="merge"))
    return {
        name: float(detectors.detect(name, images).float().mean())
        for name, images in zip(names, out.images, strict=True)
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=("base", "lora", "check"))
    parser.add_argument("names", nargs="*", help="LoRA concepts (default: all 11)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--weights", type=Path, default=WEIGHTS)
    parser.add_argument(
        "--concept-weight", type=float, default=4.0, help="LoRA: extra loss weight on its pixels"
    )
    parser.add_argument("--resume", action="store_true", help="base: continue from the weights' base model")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (base 2e-3, LoRA 4e-3)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = args.names or [c.name for c in world.CONCEPTS]
    if args.what == "base":
        train_base(args.steps or 2000, args.batch, args.seed, args.weights, args.resume, args.lr or 2e-3)
    elif args.what == "lora":
        for name in names:
            train_lora(
                name, args.steps or 500, args.batch, args.rank, args.seed, args.weights, args.concept_weight
            )
    else:
        for name, rate in alone_rates(names, 16, args.weights).items():
            print(f"{name:8s} alone: detected in {rate:.0%} of 16 images")


if __name__ == "__main__":
    main()
