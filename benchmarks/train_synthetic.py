"""Train a synthetic ComposLoRA's base model and its 11 concept LoRAs (deterministic, CPU).

    python benchmarks/train_synthetic.py base                 # ~15 min on one core
    python benchmarks/train_synthetic.py lora kiro zebu ...   # ~3 min per LoRA on one core
    python benchmarks/train_synthetic.py check                # each LoRA alone, through its detector
    python benchmarks/train_synthetic.py metadata             # rewrite the LoRAs' metadata only
    python benchmarks/train_synthetic.py --benchmark pixelworld base ...   # the second benchmark

``--benchmark`` picks the world and model family (``synthetic``: the first benchmark, the
default; ``pixelworld``: the second); the training loops are the same for both. The prediction
target (epsilon or v), the schedule and the latent's size come from the benchmark's model module.

Two one-thread processes (e.g. half the LoRAs each) beat one two-thread process on small CPUs.
The base model sees plain scenes only (white shapes on plain backgrounds); each LoRA sees its
own concept behind its trigger token, and its loss is weighted toward the pixels the concept
changes (small, local concepts otherwise learn a global tint first). LoRAs are trained at the
scale they are used at (0.8) and written in kohya format with ``save_lora``.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import math
import random
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loratorio_core.config import LoRAtorioConfig  # noqa: E402
from loratorio_core.lora.files import LayerUpdate, save_lora  # noqa: E402
from loratorio_core.synthetic.checkpoint import dataset_name, save_base, tag_frequency  # noqa: E402
from loratorio_core.synthetic.composition import SLOTS  # noqa: E402
from loratorio_core.synthetic.sampler import Job, sample  # noqa: E402

BENCHMARKS = ("synthetic", "pixelworld")


@dataclass(frozen=True)
class Kit:
    """One benchmark's world, model, detectors and sampler settings (its modules)."""

    world: ModuleType
    model: ModuleType
    detectors: ModuleType
    benchmark: ModuleType

    @property
    def latent_factor(self) -> int:
        """Image pixels per latent pixel along a side (2 for space-to-depth, 1 in pixel space)."""
        return self.world.SIZE // self.model.LATENT_SHAPE[-1]


def kit_for(name: str) -> Kit:
    modules = [importlib.import_module(f"loratorio_core.{name}.{part}") for part in Kit.__dataclass_fields__]
    return Kit(*modules)


def base_dataset(kit: Kit) -> tuple[Tensor, Tensor]:
    """Every plain scene: (M, 3, S, S) images and (M, T) caption ids."""
    world = kit.world
    images, ids = [], []
    for shape in world.BASE_SHAPES:
        for background in world.BASE_BACKGROUNDS:
            for layout in world.LAYOUTS[::2]:
                scene = world.Scene(background=background, figure=shape, **layout)
                images.append(world.render(scene))
                ids.append(world.tokenize(world.caption(scene)))
    return torch.stack(images), torch.stack(ids)


def concept_scenes(kit: Kit, name: str) -> list[tuple[object, object]]:
    """Every training scene of one concept, each with the same scene without it (a plain shape
    for a character, the first plain backdrop for a background)."""
    world = kit.world
    category = world.CONCEPT[name].category
    slot = SLOTS[category]
    figures = [name] if category == "character" else list(world.BASE_SHAPES)
    backgrounds = [name] if category == "background" else list(world.BASE_BACKGROUNDS)
    pairs = []
    for figure in figures:
        for background in backgrounds:
            for layout in world.LAYOUTS:
                scene = world.Scene(background=background, figure=figure, **layout)
                scene = replace(scene, **{slot: name})
                plain = replace(scene, **({slot: None} if slot in ("clothing", "object", "style") else {}))
                if category == "character":
                    plain = replace(scene, figure=world.BASE_SHAPES[0])
                if category == "background":
                    plain = replace(scene, background=next(iter(world.BASE_BACKGROUNDS)))
                pairs.append((scene, plain))
    return pairs


def concept_captions(kit: Kit, name: str) -> list[list[str]]:
    """The training captions of one concept's LoRA (what its ``ss_tag_frequency`` counts)."""
    return [kit.world.caption(scene) for scene, _ in concept_scenes(kit, name)]


def concept_dataset(kit: Kit, name: str) -> tuple[Tensor, Tensor, Tensor]:
    """Every scene of one concept: images, caption ids and (M, 1, h, w) latent-resolution
    masks of the pixels the concept changes (against the same scene without it)."""
    world = kit.world
    images, ids, masks = [], [], []
    for scene, plain in concept_scenes(kit, name):
        image = world.render(scene)
        changed = (image - world.render(plain)).abs().amax(0, keepdim=True) > 0.02
        images.append(image)
        ids.append(world.tokenize(world.caption(scene)))
        masks.append(F.max_pool2d(changed.float()[None], kit.latent_factor)[0])
    return torch.stack(images), torch.stack(ids), torch.stack(masks)


def noisy(
    latents: Tensor, alphas: Tensor, gen: torch.Generator, prediction: str = "epsilon"
) -> tuple[Tensor, Tensor, Tensor]:
    """(x_t, t, target) for uniformly drawn timesteps; the target is the noise (epsilon models)
    or v = sqrt(a) eps - sqrt(1 - a) x0 (v models)."""
    t = torch.randint(0, len(alphas), (latents.shape[0],), generator=gen)
    eps = torch.randn(latents.shape, generator=gen)
    a = alphas[t].view(-1, 1, 1, 1)
    target = eps if prediction == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * latents
    return a.sqrt() * latents + (1 - a).sqrt() * eps, t, target


def _ema_update(ema: nn.Module, live: nn.Module, decay: float) -> None:
    with torch.no_grad():
        for p_ema, p in zip(ema.parameters(), live.parameters(), strict=True):
            p_ema.lerp_(p, 1 - decay)


def train_base(
    kit: Kit, steps: int, batch: int, seed: int, out: Path, resume: bool = False, peak_lr: float = 2e-3
) -> None:
    """``resume``: continue from the base model in ``out`` (the first benchmark's shipped one is
    2000 steps at peak_lr 2e-3, seed 0, then 2000 resumed steps at peak_lr 1e-3, seed 1)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    if resume:
        previous = kit.model.load_model(out, loras=[])
        unet = previous.unet.requires_grad_(True).train()
        text = previous.text_encoder.requires_grad_(True).train()
    else:
        unet, text = kit.model.new_unet(), kit.model.TextEncoder()
    ema_unet, ema_text = copy.deepcopy(unet), copy.deepcopy(text)
    images, ids = base_dataset(kit)
    latents = kit.model.encode_images(images)
    alphas = kit.model.schedule()
    opt = torch.optim.AdamW([*unet.parameters(), *text.parameters()], lr=peak_lr, weight_decay=0.0)
    started = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = peak_lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        pick = torch.randint(0, len(latents), (batch,), generator=gen)
        caption_ids = ids[pick].clone()
        caption_ids[torch.rand(batch, generator=gen) < 0.1] = 0  # the empty prompt, for CFG
        x_t, t, target = noisy(latents[pick], alphas, gen, kit.model.PREDICTION)
        loss = F.mse_loss(unet(x_t, t, text(caption_ids)), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        decay = 0.999 if resume else min(0.999, (1 + step) / (10 + step))
        _ema_update(ema_unet, unet, decay)
        _ema_update(ema_text, text, decay)
        if step % 50 == 0 or step == steps - 1:
            print(f"base step {step} loss {loss.item():.4f} ({time.time() - started:.0f} s)", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    save_base(out / kit.model.BASE_FILE, ema_unet, ema_text)
    print(f"wrote {out / kit.model.BASE_FILE} in {time.time() - started:.0f} s")


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


def lora_metadata(kit: Kit, name: str) -> dict[str, str]:
    """What a real kohya LoRA carries (its output name, the tag counts of its training captions,
    so its trigger and the captions' other words) plus the benchmark's own keys."""
    concept = kit.world.CONCEPT[name]
    return {
        "ss_output_name": name,
        "ss_tag_frequency": tag_frequency(concept_captions(kit, name), dataset_name(name)),
        "loratorio_trigger": name,
        "loratorio_category": concept.category,
        "loratorio_description": concept.description,
    }


def train_lora(
    kit: Kit,
    name: str,
    steps: int,
    batch: int,
    rank: int,
    seed: int,
    weights: Path,
    concept_weight: float = 4.0,
    peak_lr: float = 4e-3,
) -> None:
    gen = torch.Generator().manual_seed(seed + sum(map(ord, name)))
    model = kit.model.load_model(weights, loras=[])
    unet, text = model.unet, model.text_encoder
    images, ids, masks = concept_dataset(kit, name)
    latents = kit.model.encode_images(images)
    with torch.no_grad():
        contexts = text(ids)
    # Loss weight: 1 everywhere, 1 + concept_weight on the latent pixels the concept changes.
    weight = 1.0 + concept_weight * masks
    lora = TrainableLoRA(unet, lora_targets(unet), rank, kit.model.LORA_SCALE, gen)
    opt = torch.optim.AdamW(lora.parameters(), lr=peak_lr, weight_decay=0.0)
    started = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = peak_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        pick = torch.randint(0, len(latents), (batch,), generator=gen)
        x_t, t, target = noisy(latents[pick], model.alphas_cumprod, gen, kit.model.PREDICTION)
        error = (unet(x_t, t, contexts[pick]) - target) ** 2
        loss = (error * weight[pick]).sum() / (weight[pick].sum() * error.shape[1])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"{name} step {step} loss {loss.item():.4f} ({time.time() - started:.0f} s)", flush=True)
    path = kit.model.lora_path(name, weights)
    save_lora(path, lora.layers(), lora_metadata(kit, name))
    print(f"wrote {path} in {time.time() - started:.0f} s", flush=True)


def rewrite_metadata(kit: Kit, name: str, weights: Path) -> None:
    """Give a shipped LoRA file the metadata ``lora_metadata`` writes now; its tensors are written
    back unchanged (``save_file`` of the loaded tensors: same dtypes, shapes and bytes)."""
    from safetensors.torch import load_file, save_file

    path = kit.model.lora_path(name, weights)
    tensors = load_file(str(path))
    save_file(tensors, str(path), metadata=lora_metadata(kit, name))
    again = load_file(str(path))
    if sorted(again) != sorted(tensors) or not all(torch.equal(again[k], tensors[k]) for k in tensors):
        raise RuntimeError(f"{path}: tensors changed while rewriting its metadata")
    print(f"rewrote the metadata of {path}", flush=True)


def alone_rates(
    kit: Kit, names: list[str], seeds: int, weights: Path, background: str | None = None
) -> dict[str, float]:
    """Each LoRA alone (LoRAtorio with one LoRA is that LoRA under CFG), prompt = its training
    caption form on the plain ``background`` (default: the world's first): the rate its detector
    finds its concept. This bounds any composition."""
    model = kit.model.load_model(weights, loras=names)
    rng = random.Random(0)
    background = background or next(iter(kit.world.BASE_BACKGROUNDS))
    jobs = []
    for name in names:
        scene = kit.world.scene_for((name,), rng, background=background)
        jobs.append(Job((name,), tuple(kit.world.caption(scene)), tuple(range(seeds))))
    out = sample(
        model,
        jobs,
        LoRAtorioConfig(mode="merge"),
        steps=kit.benchmark.STEPS,
        guidance=kit.benchmark.GUIDANCE,
        scale=kit.benchmark.LORA_SCALE,
    )
    return {
        name: float(kit.detectors.detect(name, images).float().mean())
        for name, images in zip(names, out.images, strict=True)
    }


def print_alone_rates_per_background(kit: Kit, names: list[str], weights: Path) -> None:
    """``check --every-background``: each LoRA alone on each plain background in turn (the
    composition prompts use all of them; a background LoRA replaces it)."""
    backgrounds = list(kit.world.BASE_BACKGROUNDS)
    columns = [alone_rates(kit, names, 16, weights, b) for b in backgrounds]
    for name in names:
        rates = "  ".join(f"{b}: {c[name]:4.0%}" for b, c in zip(backgrounds, columns, strict=True))
        print(f"{name:8s} alone, detected in 16 images on {rates}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=("base", "lora", "check", "metadata"))
    parser.add_argument("names", nargs="*", help="LoRA concepts (default: all 11)")
    parser.add_argument("--benchmark", choices=BENCHMARKS, default="synthetic")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--weights", type=Path, default=None, help="default: the benchmark's weights/")
    parser.add_argument(
        "--concept-weight", type=float, default=4.0, help="LoRA: extra loss weight on its pixels"
    )
    parser.add_argument("--resume", action="store_true", help="base: continue from the weights' base model")
    parser.add_argument(
        "--every-background", action="store_true", help="check: each plain background, not only the first"
    )
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (base 2e-3, LoRA 4e-3)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kit = kit_for(args.benchmark)
    weights = args.weights or kit.model.WEIGHTS
    names = args.names or [c.name for c in kit.world.CONCEPTS]
    if args.what == "base":
        train_base(kit, args.steps or 2000, args.batch, args.seed, weights, args.resume, args.lr or 2e-3)
    elif args.what == "lora":
        for name in names:
            train_lora(
                kit,
                name,
                args.steps or 500,
                args.batch,
                args.rank,
                args.seed,
                weights,
                args.concept_weight,
                args.lr or 4e-3,
            )
    elif args.what == "metadata":
        for name in names:
            rewrite_metadata(kit, name, weights)
    elif args.every_background:
        print_alone_rates_per_background(kit, names, weights)
    else:
        for name, rate in alone_rates(kit, names, 16, weights).items():
            print(f"{name:8s} alone: detected in {rate:.0%} of 16 images")


if __name__ == "__main__":
    main()
