"""What LoRAtorio costs per image against merging, measured side by side in one run.

For N = 1..5 rank-16 LoRAs on every attention and conv layer a kohya trainer targets, the time of
one whole image (``--steps`` steps with CFG, a simple Euler-like update between them) with:
  merge       every LoRA merged into the weights, 2 rows a step: what users pay today
  exact .5    LoRAtorio as written, lam 0.5: 2N + 2 rows a step through the per-row runtime
  exact 1     the same at lam 1: N + 2 rows a step
  fast        the gated default (``GATED_DEFAULT``): exact steps only at the start and every K-th
              step, 2 rows (one gated cond row with every LoRA, one uncond row) between
``gstep/mg``: one gated step (2 rows, every LoRA active and gated) over one merge step (2 rows,
the LoRAs merged): the floor of any schedule of the gated pass. And, for one exact lam-0.5 step,
the per-row runtime with each adapter's rows scattered and
gathered (the plan's order, index tensors) against the adapter-major layout with one slice per
adapter that ``evaluate_entries`` now uses. The last two lines are the gated default's ratio to
merge at N = 3 and 5 (the target: at most 1.5 at N = 5).

CPU check (SD1.5-shaped UNet, 256 px): ``python benchmarks/bench_step.py --unets sd15 --latent 32
--steps 10``. ``--per-step`` adds the older per-step table (floor, sequential adapter switching,
and the diffusers + peft host), which holds every LoRA's dense delta in memory.

    python benchmarks/bench_step.py [--device cuda] [--steps 10] [--repeats 1] [--loras 1 2 3 4 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from dataclasses import replace

import torch
from timing import timed  # benchmarks/ is on sys.path when a benchmark runs
from torch import nn

from loratorio_core import Adapter, LoRAtorioConfig, StepComposer
from loratorio_core.lora import LayerUpdate, LoRARuntime, evaluate_entries
from loratorio_core.lora import runtime as runtime_module
from loratorio_core.models import UNetModel, sd15_config, sdxl_config, tiny_config

RANK = 16
SCALE = 0.8
GUIDANCE = 7.5
# The gated default the last lines report (the README's recommended fast setting).
GATED_DEFAULT = LoRAtorioConfig(exact_every=3, exact_first=3)
IMAGE_METHODS = {
    "exact .5": LoRAtorioConfig(recenter=0.5),
    "exact 1": LoRAtorioConfig(recenter=1.0),
    "fast": GATED_DEFAULT,
}


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


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(fn, device) -> float:
    """Seconds of one call of ``fn``: wall time on a GPU; on the CPU the process's CPU time (all its
    threads), which other work on a shared machine does not inflate as it does wall time."""
    now = time.perf_counter if device.type == "cuda" else time.process_time
    sync(device)
    start = now()
    fn()
    sync(device)
    return now() - start


def signature(plan) -> tuple:
    """What a step's cost depends on: its plan's rows (branch, adapters, gated or not)."""
    return tuple((row.branch, tuple(i for i, _ in row.adapters), row.gate_factor) for row in plan.rows)


class StepTimer:
    """Times each kind of step (``signature``) once per run, shared by every method with that kind
    (an exact lam-0.5 step costs the same in ``exact .5`` and in the gated default), so that one
    run can price whole images of every method at SD1.5's size on a CPU. ``repeats`` calls, median."""

    def __init__(self, device, repeats: int):
        self.device, self.repeats = device, repeats
        self.seconds: dict[tuple, float] = {}

    def time(self, key: tuple, step, rows: int) -> tuple[float, object]:
        """(seconds, result of one call) of ``step``; a known kind is not run again (result None).
        Steps of at most 4 rows (merge's and the gated ones, which the ratios hinge on and which
        cost little) are timed at least 3 times."""
        if key in self.seconds:
            return self.seconds[key], None
        result = None

        def call():
            nonlocal result
            result = step()

        repeats = max(self.repeats, 3) if rows <= 4 else self.repeats
        if self.device.type == "cuda":
            # untimed first: a GPU loads kernels and picks algorithms on a shape's first call
            call()
            repeats = max(repeats, 3)
        self.seconds[key] = statistics.median(clock(call, self.device) for _ in range(repeats))
        return self.seconds[key], result


def composed_image(unet, runtime, composer, specs, x0, context, y, steps, device, timer) -> float:
    """Seconds of one image through plan -> rows -> combine: ``steps`` steps from latent x0
    (B, C, H, W), each step priced by ``timer`` (its kind measured once); context (B, T, D) the
    prompt, y (B, A) SDXL's vector conditioning or None."""
    x, state, kept, total = x0, None, None, 0.0
    cond, uncond = context, torch.zeros_like(context)
    for step in range(steps):
        plan = composer.plan(step, specs, batch_size=x.shape[0], kept=kept, gates=state)
        batched = {
            "x": x[plan.sample_index.to(device)],
            "timesteps": torch.full((plan.num_entries,), 999 - 99 * step, device=device),
            "context": torch.cat([cond, uncond])[plan.conditioning_index.to(device)],
        }
        if y is not None:
            batched["y"] = y[plan.sample_index.to(device)]

        def run(plan=plan, batched=batched):
            eps = evaluate_entries(unet, runtime, plan.entry_adapters, batched)
            return composer.combine(plan, eps, GUIDANCE)

        seconds, result = timer.time(signature(plan), run, plan.num_entries)
        total += seconds
        if result is None and state is None and composer.config.gated:
            result = run()  # untimed: the gated steps need real weight maps, as in a real image
        if result is not None:  # else a kind timed before: the state carries on (cost is the same)
            state, kept = result.gates, result.kept
    return total


def merged_step(unet, x0, context, y, device):
    """One CFG step with the LoRAs merged into the weights: 2 rows (cond, uncond)."""
    both = torch.cat([context, torch.zeros_like(context)])
    b = x0.shape[0]
    t = torch.full((2 * b,), 500, device=device)
    out = unet(torch.cat([x0, x0]), t, both, None if y is None else torch.cat([y, y]))
    return out[b:] + GUIDANCE * (out[:b] - out[b:])


def merge_into(unet, adapters, sign: float) -> None:
    """Adds (sign 1) or takes out (-1) every LoRA's delta, one layer at a time (no dense copies)."""
    modules = dict(unet.named_modules())
    with torch.no_grad():
        for layers in adapters:
            for name, update in layers.items():
                weight = modules[name].weight
                weight.add_(update.delta_weight(weight.shape).to(weight) * (sign * SCALE))


def gathered_exact_step(unet, runtime, specs, x0, context, y, device, repeats) -> float:
    """Seconds of one exact lam-0.5 step with each adapter's rows where the plan puts them (cond and
    uncond apart) through the gather path (index and scale tensors), as before the adapter-major
    layout of ``evaluate_entries`` (whose time is the ``exact .5`` step's)."""
    composer = StepComposer(LoRAtorioConfig(recenter=0.5))
    plan = composer.plan(0, specs, batch_size=x0.shape[0])
    batched = {
        "x": x0[plan.sample_index.to(device)],
        "timesteps": torch.full((plan.num_entries,), 500, device=device),
        "context": torch.cat([context, torch.zeros_like(context)])[plan.conditioning_index.to(device)],
    }
    if y is not None:
        batched["y"] = y[plan.sample_index.to(device)]

    def gathered():
        saved, runtime_module.MAX_RUNS = runtime_module.MAX_RUNS, 0
        try:
            with runtime.rows(plan.entry_adapters):
                composer.combine(plan, unet(**batched), GUIDANCE)
        finally:
            runtime_module.MAX_RUNS = saved

    if device.type == "cuda":
        gathered()
    return statistics.median(clock(gathered, device) for _ in range(repeats))


def time_images(unet, batch, latent, device, dtype, n_loras, steps, repeats, memory) -> dict[str, float]:
    """Seconds per image of merge and each of IMAGE_METHODS, every kind of step measured once in
    this run and an image the sum of its steps. memory["peak"]: GiB, the GPU's peak allocation, or
    on the CPU the process's peak RSS."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    names = kohya_targets(unet)
    adapters = [random_adapter(unet, names, i, device, dtype) for i in range(n_loras)]
    specs = [Adapter(f"lora{i}", SCALE) for i in range(n_loras)]
    x0, _, context, y = inputs(unet, batch, latent, device, dtype)
    runtime = LoRARuntime(unet, adapters)
    timer = StepTimer(device, repeats)
    out: dict[str, float] = {}
    with runtime:
        # the gated default first: its first exact step then gives it real maps while being timed
        for label, config in sorted(IMAGE_METHODS.items(), key=lambda item: not item[1].gated):
            composer = StepComposer(config)
            out[label] = composed_image(unet, runtime, composer, specs, x0, context, y, steps, device, timer)
        exact_kind = signature(StepComposer(IMAGE_METHODS["exact .5"]).plan(0, specs, batch_size=batch))
        out["step slices"] = timer.seconds[exact_kind]
        # a gated step's rows all carry gates (lam < 1): what one step between exact ones costs
        gated = (s for k, s in timer.seconds.items() if all(factor is not None for _, _, factor in k))
        out["gated step"] = next(gated, float("nan"))
        out["step gather"] = gathered_exact_step(unet, runtime, specs, x0, context, y, device, repeats)
    merge_into(unet, adapters, 1.0)
    try:
        if device.type == "cuda":
            merged_step(unet, x0, context, y, device)  # untimed, as every kind of step above
        out["merge"] = steps * statistics.median(
            clock(lambda: merged_step(unet, x0, context, y, device), device) for _ in range(max(repeats, 3))
        )
    finally:
        merge_into(unet, adapters, -1.0)
    if device.type == "cuda":
        memory["peak"] = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        import resource

        memory["peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return out


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
    parser.add_argument("--repeats", type=int, default=1, help="images per method (median)")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps of an image")
    parser.add_argument("--loras", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument(
        "--unets", nargs="+", help="tiny, sd15, sdxl (default: tiny on CPU, sd15 and sdxl on CUDA)"
    )
    parser.add_argument("--latent", type=int, help="latent side (default 32 tiny, 64 SD1.5, 128 SDXL)")
    parser.add_argument("--per-step", action="store_true", help="also the older per-step table")
    parser.add_argument("--skip-diffusers", action="store_true", help="skip the diffusers + peft host")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    unets = args.unets or (["sd15", "sdxl"] if device.type == "cuda" else ["tiny"])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {device} ({name}), {dtype}, torch {torch.__version__}")
    print(f"LoRA rank {RANK} on every layer kohya targets, batch {args.batch}, {args.steps} steps, CFG")
    print(
        f"fast = {GATED_DEFAULT.exact_first} exact steps, then every {GATED_DEFAULT.exact_every}-th "
        "exact; gated between"
    )
    fast_ratio: dict[int, float] = {}
    for kind in unets:
        unet = build_unet(kind, device, dtype)
        latent = args.latent or {"tiny": 32, "sd15": 64, "sdxl": 128}[kind]
        what = "seconds" if device.type == "cuda" else "CPU seconds (process time)"
        print(f"\n{kind}, {latent}x{latent} latent: {what} per image; one exact lam-0.5 step in ms")
        columns = ["merge s", "exact.5 s", "exact1 s", "fast s", "exact.5/mg", "exact1/mg", "fast/mg"]
        columns += ["gstep/mg", "gather ms", "slices ms", "GiB"]
        header = f"{'N':>2} " + " ".join(f"{c:>10}" for c in columns)
        print(header)
        print("-" * len(header))
        with torch.inference_mode():
            for n in args.loras:
                memory = {}
                r = time_images(unet, args.batch, latent, device, dtype, n, args.steps, args.repeats, memory)
                merge = r["merge"]
                values = [merge, r["exact .5"], r["exact 1"], r["fast"]]
                ratios = [r["exact .5"] / merge, r["exact 1"] / merge, r["fast"] / merge]
                print(
                    f"{n:>2} "
                    + " ".join(f"{v:>10.2f}" for v in values + ratios)
                    + f" {r['gated step'] * args.steps / merge:>10.2f}"
                    + f" {r['step gather'] * 1e3:>10.0f} {r['step slices'] * 1e3:>10.0f}"
                    + f" {memory.get('peak', float('nan')):>10.2f}"
                )
                fast_ratio[n] = r["fast"] / merge
        if args.per_step:
            per_step_table(unet, kind, args, latent, device, dtype)
        del unet
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.per_step and not args.skip_diffusers:
        diffusers_table(args, device, dtype)
    print()
    for n in (3, 5):
        if n in fast_ratio:
            print(f"N={n} fast/merge {fast_ratio[n]:.2f}")


def build_unet(kind: str, device, dtype) -> UNetModel:
    config = {"tiny": replace(tiny_config(), context_dim=64), "sd15": sd15_config(), "sdxl": sdxl_config()}[
        kind
    ]
    torch.manual_seed(0)
    return UNetModel(config).to(device, dtype).eval()


def per_step_table(unet, kind, args, latent, device, dtype) -> None:
    """The older per-step table: floor, merge, ours, sequential switching (dense deltas held)."""
    columns = ["floor ms", "merge ms", "ours.5 ms", "ours1 ms", "seq ms", "ours/floor", "seq/ours"]
    columns += ["ours1/merge", "GiB ours", "GiB floor"]
    header = f"{'unet':<5} {'N':>2} " + " ".join(f"{c:>11}" for c in columns)
    print("\nper step (the older table)")
    print(header)
    print("-" * len(header))
    with torch.inference_mode():
        for n in args.loras:
            r, m = run_unet(unet, args.batch, latent, device, dtype, n, args.repeats)
            ours, ours1 = r["ours 0.5"], r["ours 1"]
            times = [r["floor"], r["merge"], ours, ours1, r["sequential"]]
            ratios = (
                ours / r["floor"],
                r["sequential"] / ours,
                ours1 / r["merge"],
                m["ours 0.5"],
                m["floor"],
            )
            print(
                f"{kind:<5} {n:>2} "
                + " ".join(f"{v * 1e3:>11.1f}" for v in times)
                + " "
                + " ".join(f"{v:>11.2f}" for v in ratios)
            )


def diffusers_table(args, device, dtype) -> None:
    try:
        import diffusers  # noqa: F401
        import peft  # noqa: F401
    except ImportError:
        print("\n(diffusers host skipped: pip install diffusers peft)")
        return
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


if __name__ == "__main__":
    main()
