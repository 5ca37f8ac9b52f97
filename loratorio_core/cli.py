"""The ``loratorio`` command."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import torch

from .config import WEIGHTINGS, LoRAtorioConfig, format_patch, parse_patch
from .generate import add_arguments, run_generate

DEMO_LORAS = ("kiro", "checka", "pipa")  # a character, a background, an object


def run_demo(
    out: str = "loratorio_demo.png",
    patch: str = "1/16",
    temperature: float | None = None,
    seeds: int = 4,
    weighting: str | None = None,
) -> str:
    """Compose three of the shipped synthetic LoRAs (a character, a background, an object) with
    base, merge, composite and LoRAtorio; write one picture (the first seed's images, then
    LoRAtorio's weight map of each LoRA over its image) and report what the detectors found."""
    from .synthetic import detectors, world
    from .synthetic.model import Job, load_model, sample

    defaults = LoRAtorioConfig()
    config = LoRAtorioConfig(
        **parse_patch(patch),
        weighting=weighting or defaults.weighting,
        temperature=defaults.temperature if temperature is None else temperature,
    )
    world_latent = (world.SIZE // 2, world.SIZE // 2)  # the model's latent: 2x2 pixel blocks
    started = time.perf_counter()
    model = load_model(loras=DEMO_LORAS)
    prompt = tuple(world.prompt_for(DEMO_LORAS))
    job = Job(DEMO_LORAS, prompt, tuple(range(seeds)))
    runs = {
        "base": (Job((), prompt, job.seeds), LoRAtorioConfig(mode="merge")),
        "merge": (job, LoRAtorioConfig(mode="merge")),
        "composite": (job, LoRAtorioConfig(mode="composite")),
        "LoRAtorio": (job, config),
    }
    images, weights, lines = {}, None, []
    for label, (run, cfg) in runs.items():
        result = sample(model, [run], cfg, record_weights=label == "LoRAtorio")
        images[label] = result.images[0]
        if label == "LoRAtorio":
            weights = torch.stack(result.weights[0]).mean(0)  # (N, S, h, w), averaged over steps
        found = [
            f"{name} {int(detectors.detect(name, result.images[0]).sum())}/{seeds}" for name in DEMO_LORAS
        ]
        every = int(torch.stack([detectors.detect(n, result.images[0]) for n in DEMO_LORAS]).all(0).sum())
        lines.append(f"  {label:<10} all three {every}/{seeds}   " + ", ".join(found))
    _demo_picture(out, images, weights)
    elapsed = time.perf_counter() - started
    return "\n".join(
        [
            f"LoRAtorio demo: the synthetic model composing {', '.join(DEMO_LORAS)} "
            f"({', '.join(world.CONCEPT[n].description for n in DEMO_LORAS)}),",
            f"prompt {' '.join(prompt)!r}, {seeds} seeds, patch {patch} "
            f"({config.patch_size_for(world_latent)} of the {world_latent[0]}x{world_latent[1]} latent), "
            f"weighting {config.weighting}, temperature {config.temperature:g}.",
            "what the detectors found per method (images with the concept / images):",
            *lines,
            f"wrote {out} (top: the first seed per method; bottom: LoRAtorio's weight of each LoRA) "
            f"in {elapsed:.1f} s",
        ]
    )


def _demo_picture(out: str, images: dict[str, torch.Tensor], weights: torch.Tensor, cell: int = 128) -> None:
    """Top row: each method's first image; bottom row: each LoRA's mean weight over LoRAtorio's."""
    from PIL import Image, ImageDraw

    from .maps import PALETTE, weight_overlay

    def tile(image: torch.Tensor) -> Image.Image:
        pixels = (image.permute(1, 2, 0) * 255).round().to(torch.uint8).contiguous()
        return Image.frombytes("RGB", image.shape[-2:][::-1], bytes(pixels.flatten().tolist())).resize(
            (cell, cell), Image.NEAREST
        )

    label = 16
    sheet = Image.new("RGB", (len(images) * cell, 2 * (cell + label)), "white")
    draw = ImageDraw.Draw(sheet)
    for column, (name, batch) in enumerate(images.items()):
        draw.text((column * cell + 2, 2), name, fill="black")
        sheet.paste(tile(batch[0]), (column * cell, label))
    lora_image = images["LoRAtorio"][0]
    for row, name in enumerate(DEMO_LORAS):
        overlay = weight_overlay(lora_image, weights[row, 0], PALETTE[row % len(PALETTE)])
        draw.text((row * cell + 2, cell + label + 2), f"weight of {name}", fill="black")
        sheet.paste(tile(overlay), (row * cell, cell + 2 * label))
    sheet.save(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loratorio", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="compose three shipped synthetic LoRAs with each method (CPU, no download); write a PNG"
    )
    demo.add_argument("--out", default="loratorio_demo.png", help="where to write the picture")
    demo.add_argument("--seeds", type=int, default=4, help="images per method")
    demo.add_argument(
        "--patch-size",
        default=format_patch(LoRAtorioConfig()),
        help="a fraction of the latent's side (1/16: 1 pixel of the demo's 16x16 latent) or latent pixels",
    )
    demo.add_argument("--weighting", choices=WEIGHTINGS, default=LoRAtorioConfig().weighting)
    demo.add_argument("--temperature", type=float, default=LoRAtorioConfig().temperature)
    generate = sub.add_parser("generate", help="compose LoRAs on a diffusers SD/SDXL model and write a PNG")
    add_arguments(generate)
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            # The demo's model is tiny: one thread is fastest, and several thrash on a busy CPU.
            torch.set_num_threads(1)
            print(run_demo(args.out, args.patch_size, args.temperature, args.seeds, args.weighting))
        elif args.command == "generate":
            for path in run_generate(args):
                print(path)
    except (ValueError, OSError) as error:  # UsageError, LoRAFileError, bad settings, unwritable output
        print(f"loratorio: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("loratorio: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
