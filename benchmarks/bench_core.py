"""What the core's math costs next to the model, measured side by side in one run.

For N = 2, 3, 5, 8 LoRAs, SD1.5 and SDXL latent sizes (64x64, 128x128) and batch 1 and 4, it
times ``plan`` + ``combine`` of one step (LoRAtorio, lam = 0.5: 2N + 2 rows) and one UNet forward
of B rows, and prints their ratio, per forward and per step (the step's model cost is its rows
times that forward). On a CUDA GPU the UNets are SD1.5- and SDXL-shaped (random fp16 weights);
on the CPU a tiny LDM-layout UNet stands in. Target: the core under 1% of the model's step.

    python benchmarks/bench_core.py [--device cuda] [--repeats 5]
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from functools import partial

import torch
from timing import timed  # benchmarks/ is on sys.path when a benchmark runs

from loratorio_core import Adapter, LoRAtorioConfig, StepComposer
from loratorio_core.models import UNetModel, sd15_config, sdxl_config, tiny_config


def build_unet(latent: int, device: torch.device, dtype: torch.dtype) -> tuple[str, UNetModel]:
    if device.type == "cuda":
        name, config = ("SD1.5", sd15_config()) if latent == 64 else ("SDXL", sdxl_config())
    else:
        # No full-resolution attention: at 128x128 it would be 16k tokens per row on 2 cores.
        name, config = "tiny", replace(tiny_config(), transformer_depth=(0, 1))
    torch.manual_seed(0)
    return name, UNetModel(config).to(device=device, dtype=dtype).eval()


def unet_forward(unet: UNetModel, batch: int, latent: int, device, dtype):
    config = unet.config
    x = torch.randn(batch, config.in_channels, latent, latent, device=device, dtype=dtype)
    t = torch.full((batch,), 500, device=device)
    context = torch.randn(batch, 77, config.context_dim, device=device, dtype=dtype)
    y = None
    if config.adm_in_channels:
        y = torch.randn(batch, config.adm_in_channels, device=device, dtype=dtype)
    return lambda: unet(x, t, context, y)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--latents", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--loras", type=int, nargs="+", default=[2, 3, 5, 8])
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    composer = StepComposer(LoRAtorioConfig(recenter=0.5))
    print(f"device {device}, {dtype}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    header = (
        f"{'unet':<6} {'latent':>7} {'B':>2} {'N':>2} {'rows':>5} {'plan ms':>8} {'combine ms':>10} "
        f"{'forward ms':>10} {'core/fwd':>9} {'core/step':>9}"
    )
    print(header)
    print("-" * len(header))
    worst = 0.0
    with torch.inference_mode():
        for latent in args.latents:
            name, unet = build_unet(latent, device, dtype)
            for batch in args.batches:
                forward = timed(unet_forward(unet, batch, latent, device, dtype), device, args.repeats)
                for n in args.loras:
                    adapters = [Adapter(f"lora{i}", 0.8) for i in range(n)]
                    plan = composer.plan(0, adapters, batch_size=batch)
                    preds = torch.randn(plan.num_entries, 4, latent, latent, device=device, dtype=dtype)
                    plan_s = timed(
                        partial(composer.plan, 0, adapters, batch_size=batch), device, args.repeats
                    )
                    combine_s = timed(partial(composer.combine, plan, preds, 7.5), device, args.repeats)
                    rows = len(plan.rows)
                    core = plan_s + combine_s
                    step_share = core / (forward * rows)
                    worst = max(worst, step_share)
                    print(
                        f"{name:<6} {latent:>4}x{latent:<2} {batch:>2} {n:>2} {rows:>5} {plan_s * 1e3:>8.3f} "
                        f"{combine_s * 1e3:>10.3f} {forward * 1e3:>10.2f} {core / forward:>9.2%} "
                        f"{step_share:>9.2%}"
                    )
            del unet
    print(f"\nworst core/step: {worst:.2%} (target < 1%)")


if __name__ == "__main__":
    main()
