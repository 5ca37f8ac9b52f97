"""One step as plan -> rows -> combine: which rows each mode asks for, and what it makes of them."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from loratorio_core import Adapter, LoRAtorioConfig, StepComposer

import reference as ref

ADAPTERS = [Adapter("a", 0.8), Adapter("b", 1.0), Adapter("c", 0.6), Adapter("d", 1.2), Adapter("e", 0.9)]


def rows_of(plan):
    return [(row.branch, tuple(i for i, _ in row.adapters)) for row in plan.rows]


# --- plan: the rows each mode evaluates -------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_loratorio_evaluates_base_and_each_lora_cond_and_uncond(n):
    plan = StepComposer(LoRAtorioConfig(recenter=0.5)).plan(0, ADAPTERS[:n], batch_size=2)
    loras = [("cond", (i,)) for i in range(n)]
    assert rows_of(plan) == [("cond", ())] + loras + [("uncond", ())] + [("uncond", (i,)) for i in range(n)]
    assert len(plan.rows) == 2 * (n + 1)
    assert plan.num_entries == 2 * len(plan.rows)


@pytest.mark.parametrize("n", [1, 3, 5])
def test_loratorio_with_lam_one_needs_no_lora_uncond_rows(n):
    plan = StepComposer(LoRAtorioConfig(recenter=1.0)).plan(0, ADAPTERS[:n])
    assert rows_of(plan) == [("cond", ())] + [("cond", (i,)) for i in range(n)] + [("uncond", ())]
    assert len(plan.rows) == n + 2


@pytest.mark.parametrize("n", [1, 3, 5])
def test_reusing_the_cond_change_needs_no_lora_uncond_rows_at_any_lam(n):
    plan = StepComposer(LoRAtorioConfig(recenter=0.5, uncond_loras="reuse")).plan(0, ADAPTERS[:n])
    assert rows_of(plan) == [("cond", ())] + [("cond", (i,)) for i in range(n)] + [("uncond", ())]
    assert len(plan.rows) == n + 2


def test_reusing_the_cond_change_still_measures_the_gated_uncond_residual_before_gated_steps():
    config = LoRAtorioConfig(recenter=0.5, uncond_loras="reuse", exact_every=3, exact_first=1)
    plan = StepComposer(config).plan(0, ADAPTERS[:3])
    assert rows_of(plan) == [
        ("cond", ()),
        ("cond", (0,)),
        ("cond", (1,)),
        ("cond", (2,)),
        ("cond", (0, 1, 2)),
    ] + [
        ("uncond", ()),
        ("uncond", (0, 1, 2)),
    ]


@pytest.mark.parametrize("mode", ["loratorio", "composite", "switch", "merge"])
def test_without_cfg_there_are_no_uncond_rows(mode):
    plan = StepComposer(LoRAtorioConfig(mode=mode, recenter=0.5)).plan(0, ADAPTERS[:3], cfg=False)
    assert all(row.branch == "cond" for row in plan.rows)
    assert len(plan.rows) == {"loratorio": 4, "composite": 3, "switch": 1, "merge": 1}[mode]


def test_composite_evaluates_every_lora_and_no_base():
    plan = StepComposer(LoRAtorioConfig(mode="composite")).plan(0, ADAPTERS[:3])
    assert rows_of(plan) == [
        ("cond", (0,)),
        ("cond", (1,)),
        ("cond", (2,)),
        ("uncond", (0,)),
        ("uncond", (1,)),
        ("uncond", (2,)),
    ]


def test_merge_evaluates_one_row_set_holding_every_adapter_at_its_scale():
    plan = StepComposer(LoRAtorioConfig(mode="merge")).plan(0, ADAPTERS[:3])
    assert [row.adapters for row in plan.rows] == [((0, 0.8), (1, 1.0), (2, 0.6))] * 2
    assert [row.branch for row in plan.rows] == ["cond", "uncond"]


def test_switch_cycles_one_lora_every_switch_every_steps_in_prompt_order():
    composer = StepComposer(LoRAtorioConfig(mode="switch", switch_every=5))
    active = [composer.plan(step, ADAPTERS[:3]).evaluated for step in range(32)]
    assert active == [(0,)] * 5 + [(1,)] * 5 + [(2,)] * 5 + [(0,)] * 5 + [(1,)] * 5 + [(2,)] * 5 + [(0,)] * 2
    plan = composer.plan(7, ADAPTERS[:3])
    assert rows_of(plan) == [("cond", (1,)), ("uncond", (1,))]


@pytest.mark.parametrize("mode", ["loratorio", "composite", "switch", "merge"])
def test_no_adapters_is_the_base_model_in_every_mode(mode):
    plan = StepComposer(LoRAtorioConfig(mode=mode)).plan(0, [])
    assert rows_of(plan) == [("cond", ()), ("uncond", ())]


def test_entries_index_latents_conditionings_and_adapters_in_row_order():
    plan = StepComposer(LoRAtorioConfig(recenter=1.0)).plan(0, ADAPTERS[:2], batch_size=3)
    assert plan.sample_index.tolist() == [0, 1, 2] * 4
    assert plan.conditioning_index.tolist() == [0, 1, 2] * 3 + [3, 4, 5]
    assert plan.entry_adapters == ((),) * 3 + (((0, 0.8),),) * 3 + (((1, 1.0),),) * 3 + ((),) * 3


def test_plan_is_deterministic():
    composer = StepComposer(LoRAtorioConfig(top_k=2, reselect_every=3))
    kept = torch.tensor([[True, False], [False, True], [True, True]])
    one = composer.plan(4, ADAPTERS[:3], batch_size=2, kept=kept)
    two = composer.plan(4, ADAPTERS[:3], batch_size=2, kept=kept.clone())
    assert one.rows == two.rows and torch.equal(one.sample_index, two.sample_index)


# --- plan: top-k from a pool -----------------------------------------------------------------


def test_top_k_evaluates_the_whole_pool_on_selection_steps_and_only_the_kept_between():
    composer = StepComposer(LoRAtorioConfig(top_k=2, reselect_every=3, recenter=0.5))
    kept = torch.tensor([[True, False], [False, False], [True, True], [False, True], [False, False]])
    schedule = []
    for step in range(7):
        plan = composer.plan(step, ADAPTERS, batch_size=2, kept=kept)
        schedule.append(plan.selecting)
        if plan.selecting:
            assert plan.evaluated == (0, 1, 2, 3, 4)
            assert all(row.samples == (0, 1) for row in plan.rows)
        else:
            assert plan.evaluated == (0, 2, 3)
            samples = {
                (row.branch, row.adapters[0][0] if row.adapters else None): row.samples for row in plan.rows
            }
            assert samples[("cond", 0)] == (0,) and samples[("uncond", 0)] == (0,)
            assert samples[("cond", 2)] == (0, 1)
            assert samples[("cond", 3)] == (1,)
            assert samples[("cond", None)] == (0, 1)
            assert plan.num_entries == 2 * (2 + 2 + 2)  # base + the 2 kept of each sample, cond and uncond
    assert schedule == [True, False, False, True, False, False, True]


def test_top_k_without_a_previous_selection_selects():
    plan = StepComposer(LoRAtorioConfig(top_k=2, reselect_every=10)).plan(5, ADAPTERS, batch_size=1)
    assert plan.selecting and plan.evaluated == (0, 1, 2, 3, 4)


def test_top_k_equal_to_the_pool_never_selects():
    plan = StepComposer(LoRAtorioConfig(top_k=3)).plan(0, ADAPTERS[:3])
    assert not plan.selecting and plan.evaluated == (0, 1, 2)


def test_plan_rejects_bad_input_with_named_errors():
    composer = StepComposer(LoRAtorioConfig(top_k=3, reselect_every=2))
    with pytest.raises(ValueError, match="top_k"):
        composer.plan(0, ADAPTERS[:2])
    with pytest.raises(ValueError, match="kept"):
        composer.plan(1, ADAPTERS, batch_size=2, kept=torch.ones(5, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="kept"):
        composer.plan(1, ADAPTERS, batch_size=1, kept=torch.zeros(5, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="step"):
        composer.plan(-1, ADAPTERS)
    with pytest.raises(ValueError, match="batch_size"):
        composer.plan(0, ADAPTERS, batch_size=0)
    with pytest.raises(ValueError, match=r"adapters\[1\]"):
        composer.plan(0, [("a", 1.0), ("b", math.nan)])
    with pytest.raises(ValueError, match=r"adapters\[0\]"):
        composer.plan(0, ["a"])


# --- combine ---------------------------------------------------------------------------------


def fake_predictions(plan, c=4, h=10, w=7, seed=0):
    """A prediction per entry; LoRA rows are the base plus a perturbation, like real eps."""
    g = torch.Generator().manual_seed(seed)
    base = {
        "cond": torch.randn(plan.batch_size, c, h, w, generator=g),
        "uncond": torch.randn(plan.batch_size, c, h, w, generator=g),
    }
    per_row = []
    for row in plan.rows:
        delta = torch.randn(plan.batch_size, c, h, w, generator=g) * (0.0 if not row.adapters else 0.5)
        per_row.append((base[row.branch] + delta)[list(row.samples)])
    return torch.cat(per_row)


def by_row(plan, predictions):
    return {(row.branch, row.adapters): predictions[plan.row_slice(r)] for r, row in enumerate(plan.rows)}


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_loratorio_combine_matches_the_reference(lam):
    config = LoRAtorioConfig(patch_size=3, temperature=1.0, recenter=lam)
    composer = StepComposer(config)
    plan = composer.plan(0, ADAPTERS[:3], batch_size=2)
    preds = fake_predictions(plan)
    rows = by_row(plan, preds)
    lora = lambda branch, i: rows[(branch, ((i, ADAPTERS[i].scale),))]  # noqa: E731
    loras_c = torch.stack([lora("cond", i) for i in range(3)])
    loras_u = torch.stack([lora("uncond", i) for i in range(3)]) if lam < 1 else None
    expected = ref.loratorio_step(
        rows[("cond", ())], rows[("uncond", ())], loras_c, loras_u, d=3, tau=1.0, lam=lam, scale=7.5
    )
    # float64 in, float64 throughout: the formulas exactly; float32: within its round-off,
    # which a small temperature and the CFG scale amplify.
    torch.testing.assert_close(
        composer.combine(plan, preds.double(), 7.5).eps, expected, atol=1e-10, rtol=1e-10
    )
    result = composer.combine(plan, preds, 7.5)
    torch.testing.assert_close(result.eps.double(), expected, atol=1e-3, rtol=1e-4)
    assert result.weights.shape == (3, 2, 4, 3)
    torch.testing.assert_close(result.weights.sum(0), torch.ones(2, 4, 3, dtype=result.weights.dtype))
    expected_div = (1 - ref.similarity(loras_c, rows[("cond", ())], 3)).mean((2, 3))
    torch.testing.assert_close(result.divergence.double(), expected_div, atol=1e-6, rtol=1e-6)
    assert result.kept is None


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_reused_uncond_is_the_base_uncond_plus_the_cond_branchs_lora_change(lam):
    config = LoRAtorioConfig(patch_size=3, temperature=1.0, recenter=lam, uncond_loras="reuse")
    composer = StepComposer(config)
    plan = composer.plan(0, ADAPTERS[:3], batch_size=2)
    preds = fake_predictions(plan)
    rows = by_row(plan, preds)
    loras_c = torch.stack([rows[("cond", ((i, ADAPTERS[i].scale),))] for i in range(3)])
    base_c, base_u = rows[("cond", ())], rows[("uncond", ())]
    expected = ref.loratorio_step(base_c, base_u, loras_c, None, d=3, tau=1.0, lam=lam, scale=7.5, reuse=True)
    result = composer.combine(plan, preds.double(), 7.5)
    torch.testing.assert_close(result.eps, expected, atol=1e-10, rtol=1e-10)
    # written out: lam * base_u + (1 - lam) * (base_u + cond - base_c)
    torch.testing.assert_close(result.uncond, base_u.double() + (1 - lam) * (result.cond - base_c.double()))
    torch.testing.assert_close(
        composer.combine(plan, preds, 7.5).eps.double(), expected, atol=1e-3, rtol=1e-4
    )


def test_reused_uncond_without_the_cond_change_is_refused_with_a_clear_error():
    composer = StepComposer(LoRAtorioConfig(uncond_loras="reuse"))
    plan = composer.plan(0, ADAPTERS[:2], batch_size=1)
    preds = fake_predictions(plan)
    split = plan.num_cond_entries
    cond = composer.combine_cond(plan, preds[:split])
    with pytest.raises(ValueError, match="uncond_loras='reuse' needs the cond branch's LoRA change"):
        composer.combine_uncond(plan, preds[split:], dataclasses.replace(cond, change=None))


def test_one_lora_with_lam_zero_is_that_loras_plain_cfg():
    composer = StepComposer(LoRAtorioConfig(recenter=0.0))
    plan = composer.plan(0, ADAPTERS[:1], batch_size=2)
    preds = fake_predictions(plan)
    rows = by_row(plan, preds)
    cond, uncond = rows[("cond", ((0, 0.8),))], rows[("uncond", ((0, 0.8),))]
    torch.testing.assert_close(composer.combine(plan, preds, 6.0).eps, uncond + 6.0 * (cond - uncond))


def test_large_temperature_with_lam_zero_is_composite():
    adapters = ADAPTERS[:4]
    ours = StepComposer(LoRAtorioConfig(temperature=1e7, recenter=0.0))
    composite = StepComposer(LoRAtorioConfig(mode="composite"))
    plan = ours.plan(0, adapters, batch_size=2)
    preds = fake_predictions(plan)
    composite_plan = composite.plan(0, adapters, batch_size=2)
    keep_rows = [r for r, row in enumerate(plan.rows) if row.adapters]  # composite has no base rows
    composite_preds = torch.cat([preds[plan.row_slice(r)] for r in keep_rows])
    torch.testing.assert_close(
        ours.combine(plan, preds, 7.0).eps,
        composite.combine(composite_plan, composite_preds, 7.0).eps,
        atol=1e-5,
        rtol=1e-5,
    )


def test_composite_switch_and_merge_are_cfg_over_their_rows():
    for mode in ("composite", "switch", "merge"):
        composer = StepComposer(LoRAtorioConfig(mode=mode))
        plan = composer.plan(6, ADAPTERS[:3], batch_size=2)
        preds = fake_predictions(plan)
        rows = [preds[plan.row_slice(r)] for r in range(len(plan.rows))]
        half = len(rows) // 2
        cond, uncond = torch.stack(rows[:half]).mean(0), torch.stack(rows[half:]).mean(0)
        result = composer.combine(plan, preds, 5.0)
        torch.testing.assert_close(result.eps, uncond + 5.0 * (cond - uncond))
        if mode == "switch":
            assert result.weights[:, :, 0, 0].tolist() == [[0, 0], [1, 1], [0, 0]]  # step 6: the second
        if mode == "merge":
            assert result.weights is None


def test_without_cfg_the_result_is_the_composed_cond():
    composer = StepComposer(LoRAtorioConfig(recenter=0.5))
    plan = composer.plan(0, ADAPTERS[:2], cfg=False)
    preds = fake_predictions(plan)
    result = composer.combine(plan, preds)
    assert result.uncond is None
    torch.testing.assert_close(result.eps, result.cond)
    with pytest.raises(ValueError, match="guidance_scale"):
        composer.combine(plan, preds, 7.0)


def test_no_adapters_gives_plain_cfg_of_the_base():
    composer = StepComposer()
    plan = composer.plan(0, [], batch_size=2)
    preds = fake_predictions(plan)
    result = composer.combine(plan, preds, 3.0)
    torch.testing.assert_close(result.eps, preds[2:] + 3.0 * (preds[:2] - preds[2:]))
    assert result.weights.shape[0] == 0


def test_top_k_combine_keeps_the_most_divergent_and_reuses_them_between_selections():
    composer = StepComposer(
        LoRAtorioConfig(top_k=2, reselect_every=2, recenter=1.0, patch_size=2, temperature=0.01)
    )
    plan = composer.plan(0, ADAPTERS, batch_size=2)
    preds = fake_predictions(plan, seed=3)
    rows = by_row(plan, preds)
    loras_c = torch.stack([rows[("cond", ((i, a.scale),))] for i, a in enumerate(ADAPTERS)])
    base_c = rows[("cond", ())]
    keep = ref.top_k(ref.similarity(loras_c, base_c, 2), 2)
    result = composer.combine(plan, preds, 7.0)
    assert torch.equal(result.kept, keep)
    assert torch.all(result.weights[~keep] == 0)
    expected = ref.loratorio_step(
        base_c, rows[("uncond", ())], loras_c, None, d=2, tau=0.01, lam=1.0, scale=7.0, keep=keep
    )
    torch.testing.assert_close(
        composer.combine(plan, preds.double(), 7.0).eps, expected, atol=1e-10, rtol=1e-10
    )
    torch.testing.assert_close(result.eps.double(), expected, atol=1e-3, rtol=1e-4)

    between = composer.plan(1, ADAPTERS, batch_size=2, kept=result.kept)
    assert not between.selecting
    preds = fake_predictions(between, seed=4)
    nxt = composer.combine(between, preds, 7.0)
    assert torch.equal(nxt.kept, keep)
    assert torch.isnan(nxt.divergence[~keep]).all() and torch.isfinite(nxt.divergence[keep]).all()
    assert torch.all(nxt.weights[~keep] == 0)
    torch.testing.assert_close(nxt.weights.sum(0), torch.ones_like(nxt.weights[0]))


def test_combine_rejects_mismatched_predictions_and_missing_scale():
    composer = StepComposer()
    plan = composer.plan(0, ADAPTERS[:2])
    preds = fake_predictions(plan)
    with pytest.raises(ValueError, match="predictions"):
        composer.combine(plan, preds[:-1], 7.0)
    with pytest.raises(ValueError, match="guidance_scale"):
        composer.combine(plan, preds)
    with pytest.raises(ValueError, match="config"):
        StepComposer(LoRAtorioConfig(temperature=0.5)).combine(plan, preds, 7.0)


def test_half_precision_predictions_compose_to_the_same_dtype():
    composer = StepComposer(LoRAtorioConfig(recenter=0.5))
    plan = composer.plan(0, ADAPTERS[:3], batch_size=2)
    preds = fake_predictions(plan)
    full = composer.combine(plan, preds, 7.0).eps
    for dtype in (torch.float16, torch.bfloat16):
        half = composer.combine(plan, preds.to(dtype), 7.0).eps
        assert half.dtype == dtype and torch.isfinite(half).all()
        torch.testing.assert_close(half.float(), full, atol=0.3, rtol=0.05)


# --- end to end: a tiny model denoised through plan -> rows -> combine ------------------------


class TinyNoiseModel(nn.Module):
    """A small conditional eps model with per-row low-rank adapters on its first conv."""

    def __init__(self, n_adapters: int, channels: int = 4, width: int = 16, context: int = 8):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv_in = nn.Conv2d(channels, width, 3, padding=1)
        self.context = nn.Linear(context, width)
        self.conv_out = nn.Conv2d(width, channels, 3, padding=1)
        self.down = nn.Parameter(torch.randn(n_adapters, 2, channels, 3, 3, generator=g) * 0.5)
        self.up = nn.Parameter(torch.randn(n_adapters, width, 2, 1, 1, generator=g) * 0.5)

    def forward(self, x, t, context, entry_adapters):
        h = self.conv_in(x)
        deltas = []
        for e, adapters in enumerate(entry_adapters):
            delta = torch.zeros_like(h[e])
            for i, scale in adapters:
                low = nn.functional.conv2d(x[e : e + 1], self.down[i], padding=1)
                delta = delta + scale * nn.functional.conv2d(low, self.up[i])[0]
            deltas.append(delta)
        h = h + torch.stack(deltas)
        h = nn.functional.silu(h + self.context(context)[:, :, None, None] + t)
        return self.conv_out(h)


def denoise_with_core(model, composer, adapters, x, cond, uncond, steps, scale):
    kept = None
    for step in range(steps):
        t = 1.0 - step / steps
        plan = composer.plan(step, adapters, batch_size=x.shape[0], cfg=scale != 1.0, kept=kept)
        context = torch.cat([cond, uncond])[plan.conditioning_index]
        eps = model(x[plan.sample_index], t, context, plan.entry_adapters)
        result = composer.combine(plan, eps, scale if plan.cfg else None)
        kept = result.kept
        x = x - 0.2 * result.eps
    return x


def denoise_by_hand(model, config, adapters, x, cond, uncond, steps, scale):
    """The same steps with every formula written out, evaluating every row for every sample."""
    b, n = x.shape[0], len(adapters)

    def eps(context, active):
        return model(x, t, context, [active] * b)

    keep = None
    for step in range(steps):
        t = 1.0 - step / steps
        lora = lambda context, i: eps(context, ((i, adapters[i][1]),))  # noqa: B023, E731
        if config.mode == "loratorio":
            base_c, base_u = eps(cond, ()), eps(uncond, ())
            loras_c = torch.stack([lora(cond, i) for i in range(n)])
            loras_u = torch.stack([lora(uncond, i) for i in range(n)])
            if config.top_k is not None and step % config.reselect_every == 0:
                keep = ref.top_k(ref.similarity(loras_c, base_c, config.patch_size), config.top_k)
            guided = ref.loratorio_step(
                base_c,
                base_u if scale != 1.0 else None,
                loras_c,
                loras_u,
                d=config.patch_size,
                tau=config.temperature,
                lam=config.recenter,
                scale=scale,
                keep=keep,
                reuse=config.uncond_loras == "reuse",
            )
        else:
            if config.mode == "merge":
                active_sets = [tuple((i, s) for i, (_, s) in enumerate(adapters))]
            elif config.mode == "switch":
                i = (step // config.switch_every) % n
                active_sets = [((i, adapters[i][1]),)]
            else:
                active_sets = [((i, adapters[i][1]),) for i in range(n)]
            e_c = torch.stack([eps(cond, a) for a in active_sets]).double().mean(0)
            e_u = torch.stack([eps(uncond, a) for a in active_sets]).double().mean(0)
            guided = e_u + scale * (e_c - e_u)
        x = x - 0.2 * guided.float()
    return x


@pytest.mark.parametrize(
    "config, scale",
    [
        (LoRAtorioConfig(patch_size=2, temperature=1.0, recenter=0.5), 7.0),
        (LoRAtorioConfig(patch_size=3, temperature=0.02, recenter=1.0), 5.0),
        (LoRAtorioConfig(patch_size=2, temperature=1.0, recenter=0.5), 1.0),
        (LoRAtorioConfig(patch_size=2, temperature=1.0, recenter=0.5, top_k=2, reselect_every=2), 7.0),
        (LoRAtorioConfig(patch_size=2, temperature=1.0, recenter=0.5, uncond_loras="reuse"), 7.0),
        (
            LoRAtorioConfig(patch_size=2, temperature=1.0, top_k=2, reselect_every=2, uncond_loras="reuse"),
            7.0,
        ),
        (LoRAtorioConfig(mode="composite"), 7.0),
        (LoRAtorioConfig(mode="switch", switch_every=2), 7.0),
        (LoRAtorioConfig(mode="merge"), 7.0),
    ],
    ids=["loratorio", "lam1", "no-cfg", "top-k", "reuse", "top-k-reuse", "composite", "switch", "merge"],
)
def test_denoising_through_plan_rows_combine_matches_the_steps_written_by_hand(config, scale):
    torch.manual_seed(0)
    adapters = [("a", 0.8), ("b", 1.0), ("c", 0.7), ("d", 1.1)]
    model = TinyNoiseModel(len(adapters)).eval()
    x = torch.randn(2, 4, 9, 10)
    cond, uncond = torch.randn(2, 8), torch.zeros(2, 8)
    with torch.no_grad():
        ours = denoise_with_core(model, StepComposer(config), adapters, x, cond, uncond, 5, scale)
        hand = denoise_by_hand(model, config, adapters, x, cond, uncond, 5, scale)
    torch.testing.assert_close(ours, hand, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(ours, x)


@pytest.mark.parametrize(
    "config",
    [
        LoRAtorioConfig(recenter=0.5),
        LoRAtorioConfig(recenter=1.0),
        LoRAtorioConfig(top_k=2, reselect_every=2),
        LoRAtorioConfig(uncond_loras="reuse"),
        LoRAtorioConfig(mode="composite"),
        LoRAtorioConfig(mode="switch"),
        LoRAtorioConfig(mode="merge"),
    ],
    ids=["lam0.5", "lam1", "top-k", "reuse", "composite", "switch", "merge"],
)
def test_cond_and_uncond_combined_in_separate_calls_equal_one_combine(config):
    # Hosts whose cond and uncond rows arrive in separate model calls (A1111 with
    # batch_cond_uncond off) combine the cond rows first; the uncond rows reuse their weights.
    composer = StepComposer(config)
    kept = None
    for step in range(3):
        plan = composer.plan(step, ADAPTERS[:4], batch_size=2, kept=kept)
        preds = fake_predictions(plan, seed=step)
        whole = composer.combine(plan, preds, 6.0)
        split = plan.num_cond_entries
        assert all(
            row.branch == "cond" for row in plan.rows[: len([r for r in plan.rows if r.branch == "cond"])]
        )
        cond = composer.combine_cond(plan, preds[:split])
        uncond = composer.combine_uncond(plan, preds[split:], cond)
        assert torch.equal(cond.cond, whole.cond) and torch.equal(uncond, whole.uncond)
        torch.testing.assert_close(uncond + 6.0 * (cond.cond - uncond), whole.eps)
        kept = whole.kept
    with pytest.raises(ValueError, match="E_c"):
        composer.combine_cond(plan, preds)
    with pytest.raises(ValueError, match="E_u"):
        composer.combine_uncond(plan, preds[split + 1 :], cond)


def test_reselect_false_keeps_the_given_set_on_a_selection_step_and_true_forces_one():
    composer = StepComposer(LoRAtorioConfig(top_k=2, reselect_every=4))
    kept = torch.tensor([[True], [False], [True], [False], [False]])
    assert composer.plan(4, ADAPTERS, kept=kept).selecting
    held = composer.plan(4, ADAPTERS, kept=kept, reselect=False)
    assert not held.selecting and held.evaluated == (0, 2)
    assert composer.plan(1, ADAPTERS, kept=kept, reselect=True).selecting
    with pytest.raises(ValueError, match="reselect=False needs kept"):
        composer.plan(1, ADAPTERS, reselect=False)
