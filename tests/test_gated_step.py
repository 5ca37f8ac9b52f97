"""LoRAtorio's gated single pass as plan -> rows -> combine (``exact_every`` > 1).

Exact steps are the method as written; the steps between evaluate one gated cond row (every LoRA,
each gated by its weight map) and one uncond row, and add the residual that the exact step before
them measured between its composed prediction and its own gated rows.
"""

from __future__ import annotations

import pytest
import torch

from loratorio_core import Adapter, LoRAtorioConfig, StepComposer
from loratorio_core.lora import Gate

ADAPTERS = [Adapter("a", 0.8), Adapter("b", 1.0), Adapter("c", 0.6)]
SIZE = (6, 5)


def rows_of(plan):
    return [(row.branch, tuple(i for i, _ in row.adapters), row.gate_factor) for row in plan.rows]


def run(composer, steps, *, batch=2, cfg=True, adapters=ADAPTERS, seed=0):
    """Plans and combines ``steps`` steps on random predictions; returns (plans, results)."""
    gen = torch.Generator().manual_seed(seed)
    plans, results, state = [], [], None
    for step in range(steps):
        plan = composer.plan(step, adapters, batch_size=batch, cfg=cfg, gates=state)
        predictions = torch.randn(plan.num_entries, 4, *SIZE, generator=gen)
        result = composer.combine(plan, predictions, 5.0 if cfg else None)
        plans.append((plan, predictions))
        results.append(result)
        state = result.gates
    return plans, results


def test_exact_every_one_is_the_exact_method_with_no_gate_state():
    composer = StepComposer(LoRAtorioConfig())
    plans, results = run(composer, 4)
    for plan, _ in plans:
        assert not plan.gated and plan.gates is None
        assert len(plan.rows) == 2 * len(ADAPTERS) + 2
    assert all(r.gates is None for r in results)


def test_the_schedule_is_the_first_steps_and_every_kth():
    config = LoRAtorioConfig(exact_every=4, exact_first=2)
    assert [s for s in range(12) if config.is_exact_step(s)] == [0, 1, 4, 8]
    assert all(LoRAtorioConfig(exact_every=1).is_exact_step(s) for s in range(5))
    assert all(LoRAtorioConfig(mode="merge", exact_every=4).is_exact_step(s) for s in range(5))


@pytest.mark.parametrize("lam", [0.5, 0.0])
def test_gated_steps_evaluate_two_rows_and_the_exact_step_before_them_measures_the_residual(lam):
    composer = StepComposer(LoRAtorioConfig(exact_every=3, exact_first=1, recenter=lam))
    plans, _ = run(composer, 4)
    everyone = (0, 1, 2)
    # step 0: the method's rows, then the gated rows (uniform gates: no maps yet)
    assert rows_of(plans[0][0]) == [
        ("cond", (), None),
        *[("cond", (i,), None) for i in range(3)],
        ("cond", everyone, 1.0),
        ("uncond", (), None),
        *[("uncond", (i,), None) for i in range(3)],
        ("uncond", everyone, 1.0 - lam),
    ]
    assert plans[0][0].gates.shape == (3, 2, 1, 1, 1)
    torch.testing.assert_close(plans[0][0].gates, torch.full((3, 2, 1, 1, 1), 1 / 3))
    for step in (1, 2):
        assert plans[step][0].gated
        assert rows_of(plans[step][0]) == [("cond", everyone, 1.0), ("uncond", everyone, 1.0 - lam)]
    # step 3 is exact again, and measures the residual of steps 4 and 5 with step 0's maps
    assert not plans[3][0].gated and len(plans[3][0].rows) == 10


def test_at_lam_one_the_gated_uncond_row_is_the_base_model():
    composer = StepComposer(LoRAtorioConfig(exact_every=3, exact_first=1, recenter=1.0))
    plans, _ = run(composer, 2)
    assert rows_of(plans[0][0])[-2:] == [("cond", (0, 1, 2), 1.0), ("uncond", (), None)]
    assert rows_of(plans[1][0]) == [("cond", (0, 1, 2), 1.0), ("uncond", (), None)]
    _, results = run(StepComposer(LoRAtorioConfig(exact_every=3, exact_first=1)), 1, cfg=False)
    assert results[0].gates.residual_uncond is None


def test_gated_entries_carry_each_loras_scale_and_its_gate_from_the_exact_step_before():
    composer = StepComposer(LoRAtorioConfig(exact_every=4, exact_first=2, recenter=0.5))
    plans, results = run(composer, 3)
    exact_maps = results[0].gates.latest  # step 0's weights: the gates of step 1's residual
    plan = plans[2][0]
    assert plan.gated
    torch.testing.assert_close(plan.gates, exact_maps)
    entries = plan.entry_adapters
    assert len(entries) == 4  # cond and uncond, 2 samples
    for e, (branch_factor, sample) in enumerate([(1.0, 0), (1.0, 1), (0.5, 0), (0.5, 1)]):
        for (index, gate), adapter in zip(entries[e], ADAPTERS, strict=True):
            assert isinstance(gate, Gate)
            assert gate.scale == pytest.approx(adapter.scale * branch_factor)
            assert gate.context_scale == pytest.approx(adapter.scale * branch_factor)  # "full"
            torch.testing.assert_close(gate.map, exact_maps[index, sample, 0])


def test_the_mean_context_rule_scales_keys_and_values_by_the_mean_gate():
    composer = StepComposer(LoRAtorioConfig(exact_every=4, exact_first=2, gate_context="mean"))
    plans, _ = run(composer, 3)
    plan = plans[2][0]
    (index, gate) = plan.entry_adapters[0][1]
    assert gate.context_scale == pytest.approx(ADAPTERS[index].scale * float(plan.gates[index, 0].mean()))


def test_a_gated_step_on_the_predictions_of_the_exact_steps_gated_rows_gives_the_exact_result():
    # The residual is exact minus gated at the measuring step: a gated step that sees the same
    # gated predictions again reproduces that step's composed result, cond and uncond.
    composer = StepComposer(LoRAtorioConfig(exact_every=4, exact_first=1, recenter=0.5))
    plan0 = composer.plan(0, ADAPTERS, batch_size=2)
    predictions = torch.randn(plan0.num_entries, 4, *SIZE)
    exact = composer.combine(plan0, predictions, 5.0)
    plan1 = composer.plan(1, ADAPTERS, batch_size=2, gates=exact.gates)
    assert plan1.gated
    gated_rows = [plan0.row_slice(r) for r, row in enumerate(plan0.rows) if row.gate_factor is not None]
    again = torch.cat([predictions[s] for s in gated_rows])
    result = composer.combine(plan1, again, 5.0)
    torch.testing.assert_close(result.eps, exact.eps)
    torch.testing.assert_close(result.cond, exact.cond)
    torch.testing.assert_close(result.uncond, exact.uncond)
    assert result.weights is None and result.divergence is None  # the maps users see are exact steps'
    assert result.gates is exact.gates


def test_exact_steps_compose_as_without_gating():
    # The gated rows an exact step adds change nothing in its own result.
    gen = torch.Generator().manual_seed(1)
    gated = StepComposer(LoRAtorioConfig(exact_every=4, exact_first=1))
    exact = StepComposer(LoRAtorioConfig())
    plan_g = gated.plan(0, ADAPTERS, batch_size=2)
    plan_e = exact.plan(0, ADAPTERS, batch_size=2)
    predictions = torch.randn(plan_g.num_entries, 4, *SIZE, generator=gen)
    keep = [
        e for r, row in enumerate(plan_g.rows) if row.gate_factor is None for e in range(*_bounds(plan_g, r))
    ]
    ours = gated.combine(plan_g, predictions, 5.0)
    theirs = exact.combine(plan_e, predictions[keep], 5.0)
    torch.testing.assert_close(ours.eps, theirs.eps)
    torch.testing.assert_close(ours.weights, theirs.weights)


def _bounds(plan, row):
    part = plan.row_slice(row)
    return part.start, part.stop


def test_separate_cond_and_uncond_calls_carry_the_same_state_as_one_combine():
    composer = StepComposer(LoRAtorioConfig(exact_every=3, exact_first=1))
    plan = composer.plan(0, ADAPTERS, batch_size=2)
    predictions = torch.randn(plan.num_entries, 4, *SIZE)
    whole = composer.combine(plan, predictions, 5.0)
    split = plan.num_cond_entries
    cond = composer.combine_cond(plan, predictions[:split])
    uncond = composer.combine_uncond(plan, predictions[split:], cond)
    state = composer.uncond_residual(plan, predictions[split:], uncond, cond.gates)
    torch.testing.assert_close(state.residual_cond, whole.gates.residual_cond)
    torch.testing.assert_close(state.residual_uncond, whole.gates.residual_uncond)


def test_bad_gated_settings_and_states_are_refused_by_name():
    with pytest.raises(ValueError, match="exact_every"):
        LoRAtorioConfig(exact_every=0)
    with pytest.raises(ValueError, match="exact_first"):
        LoRAtorioConfig(exact_first=0)
    with pytest.raises(ValueError, match="gate_context"):
        LoRAtorioConfig(gate_context="split")
    composer = StepComposer(LoRAtorioConfig(exact_every=3, exact_first=1))
    _, results = run(composer, 1)
    with pytest.raises(ValueError, match="gates=None"):
        composer.plan(1, ADAPTERS[:2], batch_size=2, gates=results[0].gates)
