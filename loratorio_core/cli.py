"""The ``loratorio`` command."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import torch

from .config import LoRAtorioConfig
from .generate import add_arguments, run_generate
from .step import Adapter, StepComposer


def regional_predictions(
    names: Sequence[str], size: int = 32, channels: int = 4, seed: int = 0
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Noise predictions shaped like the paper's observation 2: each LoRA departs from the
    base only inside its own region (a vertical band each) and behaves like the base elsewhere.

    -> base (1, C, S, S), each LoRA's prediction, each LoRA's region mask (1, 1, S, S).
    """
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, channels, size, size, generator=g)
    loras, regions = {}, {}
    bands = torch.arange(size) * len(names) // size
    for i, name in enumerate(names):
        region = (bands == i).float().expand(size, size).reshape(1, 1, size, size)
        concept = torch.randn(1, channels, size, size, generator=g)
        noise = 0.05 * torch.randn(1, channels, size, size, generator=g)
        loras[name] = base + region * concept + noise
        regions[name] = region
    return base, loras, regions


def run_demo(patch_size: int = 4, temperature: float = 0.01) -> str:
    """Compose three region-specific LoRAs; report the rows each mode costs and which LoRA
    LoRAtorio's weights give each patch."""
    names = ["left", "middle", "right"]
    adapters = [Adapter(name, 1.0) for name in names]
    base, loras, regions = regional_predictions(names)
    lines = [
        "LoRAtorio core demo: three LoRAs, each departing from the base model only in its own",
        "vertical band of a 32x32 latent (synthetic noise predictions, no model weights).",
        "",
        "model rows per sample and step, with CFG:",
    ]
    for mode, lam in (
        ("loratorio", 0.5),
        ("loratorio", 1.0),
        ("composite", 0.5),
        ("switch", 0.5),
        ("merge", 0.5),
    ):
        plan = StepComposer(LoRAtorioConfig(mode=mode, recenter=lam)).plan(0, adapters)
        label = f"{mode} (lam={lam:g})" if mode == "loratorio" else mode
        lines.append(f"  {label:<20} {len(plan.rows)}")

    composer = StepComposer(LoRAtorioConfig(patch_size=patch_size, temperature=temperature))
    plan = composer.plan(0, adapters, cfg=False)
    predictions = torch.cat([_evaluate(row.adapters, names, base, loras) for row in plan.rows])
    started = time.perf_counter()
    result = composer.combine(plan, predictions)
    elapsed = (time.perf_counter() - started) * 1e3
    owner = result.weights[:, 0].argmax(0)
    truth = torch.stack([_patch_share(regions[n], patch_size) for n in names]).argmax(0)
    agreement = float((owner == truth).float().mean())
    lines += [
        "",
        f"LoRAtorio's owner of each {patch_size}x{patch_size} patch (l/m/r), temperature {temperature:g}:",
        *("  " + " ".join(names[i][0] for i in row) for row in owner.tolist()),
        "",
        f"patches given to the LoRA whose band covers most of them: {agreement:.0%}",
        f"combine took {elapsed:.1f} ms on {predictions.shape[0]} rows of {tuple(predictions.shape[1:])}",
    ]
    return "\n".join(lines)


def _evaluate(row_adapters, names, base, loras) -> torch.Tensor:
    """The prediction of one row: active adapters add their departures from the base."""
    out = base.clone()
    for index, scale in row_adapters:
        out = out + scale * (loras[names[index]] - base)
    return out


def _patch_share(region: torch.Tensor, patch_size: int) -> torch.Tensor:
    return torch.nn.functional.avg_pool2d(region, patch_size, ceil_mode=True)[0, 0]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loratorio", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="compose three synthetic LoRAs with every mode and print the result")
    demo.add_argument("--patch-size", type=int, default=4)
    demo.add_argument("--temperature", type=float, default=0.01)
    generate = sub.add_parser("generate", help="compose LoRAs on a diffusers SD/SDXL model and write a PNG")
    add_arguments(generate)
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            print(run_demo(args.patch_size, args.temperature))
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
