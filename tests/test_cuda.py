"""On a GPU: a whole sampling through plan -> rows -> combine gives the CPU's image in every
precision, the hooked UNet adds no host synchronisation per layer, and the model is left as it was.

Skipped where no CUDA device is present (CI has none); run them when one is at hand:

    python -m pytest tests/test_cuda.py

``LORATORIO_TEST_DEVICE=cpu`` runs the device-independent ones on the CPU (to check the tests).
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch import nn

from loratorio_core import Adapter, LoRAtorioConfig, StepComposer
from loratorio_core.lora import LayerUpdate, LoRARuntime, evaluate_entries
from loratorio_core.models import UNetModel, tiny_config

DEVICE = os.environ.get("LORATORIO_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(
    DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"
)
needs_cuda = pytest.mark.skipif(DEVICE != "cuda", reason="synchronisation is a CUDA matter")

NAMES = ["a", "b", "c"]
CONFIGS = {
    "exact lam 0.5": LoRAtorioConfig(),
    "exact lam 1": LoRAtorioConfig(recenter=1.0),
    "gated K=3": LoRAtorioConfig(exact_every=3, exact_first=2),
    "pool top-k 2": LoRAtorioConfig(top_k=2, reselect_every=2),
    "merge": LoRAtorioConfig(mode="merge"),
}
# Normwise relative difference from the CPU's float32 image that each precision may leave after
# six steps of a random-weight UNet (float32: the GPU's other summation order only).
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@pytest.fixture(autouse=True)
def no_tf32():
    # cuDNN convolutions default to TF32 on Ampere and later: 10-bit mantissas, not float32.
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def build(seed: int = 0) -> tuple[UNetModel, list[dict[str, LayerUpdate]]]:
    """A tiny SD1.5-layout UNet and three rank-4 LoRAs on every conv and linear of its blocks."""
    torch.manual_seed(seed)
    unet = UNetModel(tiny_config()).eval()
    g = torch.Generator().manual_seed(seed + 1)
    layers = [
        (n, m) for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and "blocks" in n
    ]
    adapters = []
    for _ in NAMES:
        updates = {}
        for name, module in layers:
            w = module.weight
            down = torch.randn(4, *w.shape[1:], generator=g) * 0.2
            up = torch.randn(w.shape[0], 4, *[1] * (w.dim() - 2), generator=g) * 0.2
            updates[name] = LayerUpdate(down=down, up=up, alpha=4.0)
        adapters.append(updates)
    return unet, adapters


def sample(unet, adapters, config, device, dtype, steps: int = 6, guidance: float = 6.0) -> torch.Tensor:
    """Euler-like steps of the tiny UNet with the three LoRAs composed by ``config``: (2, 4, 16, 16)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 4, 16, 16, generator=g).to(device, dtype)
    cond = torch.randn(2, 5, 32, generator=g).to(device, dtype)
    context = torch.cat([cond, torch.zeros_like(cond)])
    runtime = LoRARuntime(unet, adapters)
    composer = StepComposer(config)
    kept = gates = None
    with runtime, torch.no_grad():
        for step in range(steps):
            t = 999 - 150 * step
            plan = composer.plan(
                step, [Adapter(n, 0.8) for n in NAMES[: len(adapters)]], batch_size=2, kept=kept, gates=gates
            )
            rows = {
                "x": x[plan.sample_index.to(device)],
                "timesteps": torch.full((plan.num_entries,), t, device=device),
                "context": context[plan.conditioning_index.to(device)],
            }
            eps = evaluate_entries(unet, runtime, plan.entry_adapters, rows)
            result = composer.combine(plan, eps, guidance)
            kept, gates = result.kept, result.gates
            x = x - 0.1 * result.eps
    return x


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_a_sampling_on_the_device_gives_the_cpus_image_in_every_precision(config, dtype):
    unet, adapters = build()
    on_cpu = sample(unet, adapters, config, "cpu", torch.float32)
    on_device = sample(unet.to(DEVICE, dtype), adapters, config, DEVICE, dtype)
    assert on_device.device.type == torch.device(DEVICE).type and on_device.dtype == dtype
    assert torch.isfinite(on_device).all()
    assert relative_difference(on_device, on_cpu) < TOLERANCE[dtype]
    # and the composition acts: three LoRAs composed are not the base model's image
    base = sample(unet.float().cpu(), [], LoRAtorioConfig(), "cpu", torch.float32)
    assert relative_difference(on_cpu, base) > 100 * TOLERANCE[torch.float32]


@needs_cuda
@pytest.mark.parametrize("config", [CONFIGS["exact lam 0.5"], CONFIGS["gated K=3"]], ids=["exact", "gated"])
def test_under_autocast_as_a1111_runs_a_float32_model_the_image_is_the_cpus(config):
    # Under autocast a layer's input, the LoRA's factors and the layer's output can differ in
    # dtype (float32 norms feeding float16 matmuls): the change is cast, never accumulated across.
    unet, adapters = build()
    on_cpu = sample(unet, adapters, config, "cpu", torch.float32)
    with torch.autocast("cuda", dtype=torch.float16):
        on_device = sample(unet.to(DEVICE), adapters, config, DEVICE, torch.float32)
    assert torch.isfinite(on_device).all()
    assert relative_difference(on_device, on_cpu) < TOLERANCE[torch.float16]


@pytest.mark.parametrize("config", [CONFIGS["exact lam 0.5"], CONFIGS["gated K=3"]], ids=["exact", "gated"])
def test_the_model_is_left_bit_for_bit_as_it_was_after_a_sampling_and_after_an_error(config):
    unet, adapters = build()
    unet = unet.to(DEVICE, torch.float16)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    sample(unet, adapters, config, DEVICE, torch.float16)

    calls = []

    def fail_on_the_fifth_call(module, args, output):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("interrupted")

    handle = unet.middle_block.register_forward_hook(fail_on_the_fifth_call)
    with pytest.raises(RuntimeError, match="interrupted"):
        sample(unet, adapters, config, DEVICE, torch.float16)
    handle.remove()
    after = unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in unet.modules())


def synchronisations(fn) -> int:
    """How many times ``fn`` made the host wait for the GPU (CUDA's sync debug mode counts them)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@needs_cuda
@pytest.mark.parametrize("gated", [False, True], ids=["exact rows", "gated rows"])
def test_a_forward_under_the_runtime_makes_the_host_wait_no_more_than_the_bare_model(gated):
    # A wait per hooked layer would stall the GPU's queue hundreds of times a step; the runtime
    # builds what it needs on the device once per rows() block, and slices need nothing at all.
    from loratorio_core.lora import Gate

    unet, adapters = build()
    unet = unet.to(DEVICE, torch.float16)
    x = torch.randn(6, 4, 16, 16, device=DEVICE, dtype=torch.float16)
    t = torch.full((6,), 500, device=DEVICE)
    context = torch.randn(6, 5, 32, device=DEVICE, dtype=torch.float16)
    if gated:
        maps = torch.rand(3, 16, 16, device=DEVICE)
        maps = maps / maps.sum(0)
        rows = [tuple((i, Gate(0.8, maps[i], 0.8)) for i in range(3))] * 6
    else:  # one base row pair, then each LoRA's cond and uncond side by side, as evaluate_entries lays them
        rows = [(), (), ((0, 0.8),), ((0, 0.8),), ((1, 0.8),), ((1, 0.8),)]
    runtime = LoRARuntime(unet, adapters)
    with torch.no_grad():
        bare = synchronisations(lambda: unet(x, t, context))
        with runtime:
            with runtime.rows(rows):
                unet(x, t, context)  # the first call also moves the LoRAs' weights to the device
            with runtime.rows(rows):
                hooked = synchronisations(lambda: unet(x, t, context))
    assert hooked <= bare
