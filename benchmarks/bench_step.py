"""One denoising step with N LoRAs, measured side by side in one run.

For N = 1..5 rank-16 LoRAs on every attention and conv layer a kohya trainer targets, per step:
  merge       one CFG pass (2 rows a sample) of the UNet with every LoRA merged in: what users pay today
  ours l=0.5  LoRAtorio: all 2N + 2 rows in one batched forward through the per-row runtime, plan+combine
  ours l=1    the same with lam = 1: N + 2 rows
  sequential  a naive port: one forward per row set, switching adapters between passes by merging
              each LoRA's (precomputed) delta into the weights and taking it out again
  floor       the same UNet without any LoRA on the same 2N + 2 rows
and the ratios ours/floor (what the runtime's hooks cost) and sequential/ours (what batching saves).
A tiny LDM-layout UNet on the CPU always; SD1.5- and SDXL-shaped UNets (random fp16 weights) on a
CUDA GPU when one is available, with peak memory. Targets: ours within 1.25x of the floor at N = 3
on the GPU; ours at least 2x faster than sequential switching at N = 3.

    python benchmarks/bench_step.py [--device cuda] [--repeats 5] [--loras 1 2 3 4 5]
"""

from __future__ import annotations

import argparse
import warnings
from dataclasses import replace

import torch
from timing import timed  # benchmarks/ is on sys.path when a benchmark runs
from torch import nn

from loratorio_core import Adapter, LoRAtorioConfig, StepComposer
from loratorio_core.lora import LayerUpdate, LoRARuntime, evaluate_entries
from loratorio_core.models import UNetModel, sd15_config, sdxl_config, tiny_config

RANK = 16
SCALE = 0.8


def kohya_targets(unet: nn.Module) -> list[str]:
    """Every Linear/Conv2d a kohya LoRA + LoCon trainer targets (transformers, ResBlocks, samplers)."""
    out = []
    for name, module in unet.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        if name.startswith(("input_blocks.", "middle_block.", "output_blocks.")) and not name.startswith(
            "input_blocks.0"
        ):
            out.append(name)
    return out


def random_adapter(unet: nn.Module, names: list[str], seed: int, device, dtype) -> dict[str, LayerUpdate]:
    g = torch.Generator().manual_seed(seed)
    modules = dict(unet.named_modules())
    layers = {}
    for name in names:
        w = modules[name].weight
        kernel = tuple(w.shape[2:])
        down = (
            torch.randn(RANK, w.shape[1], *kernel, generator=g)
            / (w.shape[1] * max(1, len(kernel) and kernel[0] * kernel[1])) ** 0.5
        )
        up = torch.randn(w.shape[0], RANK, *(1,) * len(kernel), generator=g) * 0.01
        layers[name] = LayerUpdate(down=down.to(device, dtype), up=up.to(device, dtype), alpha=float(RANK))
    return layers


def peak(fn, device) -> float:
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**30


def inputs(unet: UNetModel, rows: int, latent: int, device, dtype):
    config = unet.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, config.in_channels, latent, latent, generator=g).to(device, dtype)
    t = torch.full((rows,), 500, device=device)
    context = torch.randn(rows, 77, config.context_dim, generator=g).to(device, dtype)
    y = (
        torch.randn(rows, config.adm_in_channels, generator=g).to(device, dtype)
        if config.adm_in_channels
        else None
    )
    return x, t, context, y


def run_unet(unet, batch, latent, device, dtype, n_loras, repeats):
    names = kohya_targets(unet)
    adapters = [random_adapter(unet, names, i, device, dtype) for i in range(n_loras)]
    specs = [Adapter(f"lora{i}", SCALE) for i in range(n_loras)]
    modules = dict(unet.named_modules())
    deltas = [
        {
            name: update.delta_weight(modules[name].weight.shape).to(device, dtype) * SCALE
            for name, update in a.items()
        }
        for a in adapters
    ]
    results = {}

    def unet_call(x, t, context, y):
        return unet(x, t, context, y)

    # floor: the plain model on the rows LoRAtorio (lam 0.5) evaluates
    rows_full = (2 * n_loras + 2) * batch
    x, t, c, y = inputs(unet, rows_full, latent, device, dtype)
    results["floor"] = timed(lambda: unet(x, t, c, y), device, repeats)

    # merge: every LoRA merged into the weights, one CFG pass
    x2, t2, c2, y2 = inputs(unet, 2 * batch, latent, device, dtype)
    with torch.no_grad():
        for d in deltas:
            for name, delta in d.items():
                modules[name].weight += delta
    results["merge"] = timed(lambda: unet(x2, t2, c2, y2), device, repeats)
    with torch.no_grad():
        for d in deltas:
            for name, delta in d.items():
                modules[name].weight -= delta

    # ours: plan -> one batched forward through the runtime -> combine
    runtime = LoRARuntime(unet, adapters)
    memory = {}
    for lam in (0.5, 1.0):
        composer = StepComposer(LoRAtorioConfig(recenter=lam))
        x_b, t_b, c_b, y_b = inputs(unet, batch, latent, device, dtype)
        uncond = torch.zeros_like(c_b)

        def step():
            plan = composer.plan(0, specs, batch_size=batch)  # noqa: B023
            index = plan.sample_index.to(device)
            cond_index = plan.conditioning_index.to(device)
            batched = {
                "x": x_b[index],  # noqa: B023
                "t": t_b[index],  # noqa: B023
                "context": torch.cat([c_b, uncond])[cond_index],  # noqa: B023
                "y": None if y_b is None else y_b[index],  # noqa: B023
            }
            eps = evaluate_entries(unet_call, runtime, plan.entry_adapters, batched)
            return composer.combine(plan, eps, 7.5).eps  # noqa: B023

        with runtime:
            results[f"ours {lam:g}"] = timed(step, device, repeats)
            memory[f"ours {lam:g}"] = peak(step, device)

    # sequential: one pass per row set, switching adapters by merging and unmerging
    x1, t1, c1, y1 = inputs(unet, batch, latent, device, dtype)

    def sequential():
        outs = [unet(x1, t1, c1, y1), unet(x1, t1, c1, y1)]  # base cond, base uncond
        for d in deltas:
            for name, delta in d.items():
                modules[name].weight.add_(delta)
            outs += [unet(x1, t1, c1, y1), unet(x1, t1, c1, y1)]
            for name, delta in d.items():
                modules[name].weight.sub_(delta)
        return outs

    with torch.no_grad():
        results["sequential"] = timed(sequential, device, repeats)
    memory["floor"] = peak(lambda: unet(x, t, c, y), device)
    return results, memory


DIFFUSERS_UNETS = {
    "tiny": dict(
        block_out_channels=(64, 128),
        layers_per_block=1,
        cross_attention_dim=64,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=32,
        sample_size=32,
    ),
    "sd15": dict(
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        sample_size=64,
    ),
}


def run_diffusers_host(kind, batch, latent, device, dtype, n_loras, repeats):
    """The naive port on diffusers: peft adapters, ``set_adapters`` before each pass (N + 1 passes of
    cond + uncond), against ours on the same diffusers UNet without peft (one batched forward)."""
    import copy

    import diffusers

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**DIFFUSERS_UNETS[kind])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "modules that should be kept in float32: []"
        unet = unet.to(device, dtype).eval()
    names = [
        n
        for n, m in unet.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d)) and ("attentions" in n or "resnets" in n or "samplers" in n)
    ]
    adapters = [random_adapter(unet, names, i, device, dtype) for i in range(n_loras)]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, latent, latent, generator=g).to(device, dtype)
    context = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g).to(device, dtype)
    results = {}

    peft_unet = copy.deepcopy(unet)
    for i, layers in enumerate(adapters):
        state = {}
        for name, update in layers.items():
            state[f"{name}.lora_A.weight"] = update.down
            state[f"{name}.lora_B.weight"] = update.up
        peft_unet.load_lora_adapter(state, adapter_name=f"l{i}", prefix=None)
    x2, c2 = torch.cat([x, x]), torch.cat([context, torch.zeros_like(context)])

    def sequential():
        peft_unet.disable_lora()
        outs = [peft_unet(x2, 500, c2).sample]
        peft_unet.enable_lora()
        for i in range(n_loras):
            peft_unet.set_adapters([f"l{i}"], [SCALE])
            outs.append(peft_unet(x2, 500, c2).sample)
        return outs

    results["sequential"] = timed(sequential, device, repeats)

    runtime = LoRARuntime(unet, adapters)
    specs = [Adapter(f"l{i}", SCALE) for i in range(n_loras)]
    composer = StepComposer(LoRAtorioConfig(recenter=0.5))
    uncond = torch.zeros_like(context)

    def step():
        plan = composer.plan(0, specs, batch_size=batch)
        batched = {
            "x": x[plan.sample_index.to(device)],
            "context": torch.cat([context, uncond])[plan.conditioning_index.to(device)],
        }
        eps = evaluate_entries(
            lambda x, context: unet(x, 500, context).sample, runtime, plan.entry_adapters, batched
        )
        return composer.combine(plan, eps, 7.5).eps

    with runtime:
        results["ours"] = timed(step, device, repeats)
    rows = (2 * n_loras + 2) * batch
    xf, cf = x.repeat(rows // batch, 1, 1, 1), context.repeat(rows // batch, 1, 1)
    results["floor"] = timed(lambda: unet(xf, 500, cf).sample, device, repeats)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--loras", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument(
        "--unets", nargs="+", help="tiny, sd15, sdxl (default: tiny on CPU, sd15 and sdxl on CUDA)"
    )
    parser.add_argument("--latent", type=int, help="latent side (default 32 tiny, 64 SD1.5, 128 SDXL)")
    parser.add_argument("--skip-diffusers", action="store_true", help="skip the diffusers + peft host")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    unets = args.unets or (["sd15", "sdxl"] if device.type == "cuda" else ["tiny"])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {device} ({name}), {dtype}, torch {torch.__version__}")
    print(f"LoRA rank {RANK} on every layer kohya targets, batch {args.batch}")
    columns = ["floor ms", "merge ms", "ours.5 ms", "ours1 ms", "seq ms", "ours/floor", "seq/ours"]
    columns += ["ours1/merge", "GiB ours", "GiB floor"]
    header = f"{'unet':<5} {'N':>2} " + " ".join(f"{c:>11}" for c in columns)
    print(header)
    print("-" * len(header))
    summary = []
    for kind in unets:
        config = {
            "tiny": replace(tiny_config(), context_dim=64),
            "sd15": sd15_config(),
            "sdxl": sdxl_config(),
        }[kind]
        latent = args.latent or {"tiny": 32, "sd15": 64, "sdxl": 128}[kind]
        torch.manual_seed(0)
        unet = UNetModel(config).to(device, dtype).eval()
        with torch.inference_mode():
            for n in args.loras:
                r, m = run_unet(unet, args.batch, latent, device, dtype, n, args.repeats)
                ours, ours1 = r["ours 0.5"], r["ours 1"]
                times = [r["floor"], r["merge"], ours, ours1, r["sequential"]]
                print(
                    f"{kind:<5} {n:>2} "
                    + " ".join(f"{v * 1e3:>11.1f}" for v in times)
                    + " "
                    + " ".join(
                        f"{v:>11.2f}"
                        for v in (
                            ours / r["floor"],
                            r["sequential"] / ours,
                            ours1 / r["merge"],
                            m["ours 0.5"],
                            m["floor"],
                        )
                    )
                )
                if n == 3:
                    summary.append((kind, ours / r["floor"], r["sequential"] / ours))
        del unet
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if not args.skip_diffusers:
        try:
            import diffusers  # noqa: F401
            import peft  # noqa: F401
        except ImportError:
            print("\n(diffusers host skipped: pip install diffusers peft)")
        else:
            print("\ndiffusers host: sequential = peft adapters switched with set_adapters before each pass")
            columns = ["floor ms", "ours ms", "seq ms", "ours/floor", "seq/ours"]
            print(f"{'unet':<5} {'N':>2} " + " ".join(f"{c:>11}" for c in columns))
            for kind in ["sd15"] if device.type == "cuda" else ["tiny"]:
                latent = args.latent or (64 if kind == "sd15" else 32)
                with torch.inference_mode():
                    for n in args.loras:
                        r = run_diffusers_host(kind, args.batch, latent, device, dtype, n, args.repeats)
                        print(
                            f"{kind:<5} {n:>2} {r['floor'] * 1e3:>11.1f} {r['ours'] * 1e3:>11.1f} "
                            f"{r['sequential'] * 1e3:>11.1f} {r['ours'] / r['floor']:>11.2f} "
                            f"{r['sequential'] / r['ours']:>11.2f}"
                        )
                        if n == 3:
                            summary.append(
                                (f"{kind} (diffusers)", r["ours"] / r["floor"], r["sequential"] / r["ours"])
                            )
    for kind, overhead, speedup in summary:
        print(f"{kind} N=3: ours/floor {overhead:.2f} (target <= 1.25 on a GPU), ", end="")
        print(f"sequential/ours {speedup:.2f} (target >= 2)")


if __name__ == "__main__":
    main()
