"""RowComposer: a host's labelled cond/uncond rows, in every calling pattern WebUIs use."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from loratorio_core import LoRAtorioConfig
from loratorio_core.lora import LayerUpdate, LoRARuntime
from loratorio_core.models import UNetModel, tiny_config
from loratorio_core.rows import RowComposer, RowLabel

import reference as ref

ADAPTERS = [("a", 0.8), ("b", 1.0), ("c", 0.7)]


def build(seed=0):
    torch.manual_seed(seed)
    unet = UNetModel(tiny_config(context_dim=16)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    adapters = []
    for _ in ADAPTERS:
        layers = {}
        for name, module in unet.named_modules():
            if isinstance(module, nn.Linear) and "transformer_blocks" in name:
                w = module.weight
                layers[name] = LayerUpdate(
                    down=torch.randn(4, w.shape[1], generator=g) * 0.3,
                    up=torch.randn(w.shape[0], 4, generator=g) * 0.3,
                )
        adapters.append(layers)
    return unet, adapters


def merged(unet, layers, scale):
    copy_ = copy.deepcopy(unet)
    modules = dict(copy_.named_modules())
    with torch.no_grad():
        for name, update in layers.items():
            modules[name].weight += scale * update.delta_weight(modules[name].weight.shape)
    return copy_


def host_batch(b=2, extra_cond=()):
    """A1111's CFG layout: the cond rows (AND sub-prompts as extra rows), then one uncond row per image."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(b, 4, 8, 8, generator=g)
    conds = [torch.randn(3, 16, generator=g) for _ in range(b + len(extra_cond))]
    cond_samples = list(range(b)) + list(extra_cond)
    order = sorted(range(len(cond_samples)), key=lambda k: cond_samples[k])
    labels = [RowLabel("cond", cond_samples[k]) for k in order] + [RowLabel("uncond", s) for s in range(b)]
    contexts = [conds[k] for k in order] + [torch.zeros(3, 16)] * b
    rows_x = torch.stack([x[label.sample] for label in labels])
    inputs = {"x": rows_x, "t": torch.full((len(labels),), 400), "context": torch.stack(contexts)}
    return inputs, labels


def expected(unet, adapters, inputs, labels, config, contexts=None):
    """Each row's e_c / e_u from merged copies and the reference formulas. contexts: the context
    each model sees (key None: the base, i: LoRA i), else the inputs' own."""
    bases = unet
    singles = [merged(unet, layers, s) for layers, (_, s) in zip(adapters, ADAPTERS, strict=True)]
    models = {id(bases): None, **{id(m): i for i, m in enumerate(singles)}}

    def run(model, r):
        context = (contexts or {}).get(models[id(model)], inputs["context"])
        return model(inputs["x"][r : r + 1], inputs["t"][r : r + 1], context[r : r + 1])

    out = torch.zeros(len(labels), 4, 8, 8, dtype=torch.float64)
    weights_of, changes_of = {}, {}
    with torch.no_grad():
        for r, label in enumerate(labels):
            if label.branch != "cond":
                continue
            base = run(bases, r)
            loras = torch.stack([run(m, r) for m in singles])
            w = ref.upsample_nearest(
                ref.weights(
                    ref.similarity(loras, base, config.patch_size), config.temperature, rule=config.weighting
                ),
                8,
                8,
                config.patch_size,
            )
            out[r] = ref.compose(loras, w)[0]
            weights_of.setdefault(label.sample, []).append(w)
            changes_of.setdefault(label.sample, []).append(out[r] - base[0].double())
        for r, label in enumerate(labels):
            if label.branch != "uncond":
                continue
            base = run(bases, r).double()
            if config.uncond_loras == "reuse":  # the base uncond plus the cond rows' mean LoRA change
                change = torch.stack(changes_of[label.sample]).mean(0)
                out[r] = (base + (1 - config.recenter) * change)[0]
                continue
            w = torch.stack(weights_of[label.sample]).mean(0)  # AND rows: their mean weights
            loras = torch.stack([run(m, r) for m in singles])
            out[r] = (config.recenter * base + (1 - config.recenter) * ref.compose(loras, w))[0]
    return out


def composer_for(unet, adapters, config, **kw):
    runtime = LoRARuntime(unet, adapters).attach()
    return RowComposer(config, ADAPTERS, runtime, **kw), runtime


def forward(unet):
    return lambda x, t, context: unet(x, t, context)


CONFIG = LoRAtorioConfig(patch_size=2, temperature=1.0, recenter=0.5)
REUSE = CONFIG.replace(uncond_loras="reuse")


def test_one_cfg_call_gives_each_row_its_composed_branch():
    unet, adapters = build()
    inputs, labels = host_batch()
    rows, runtime = composer_for(unet, adapters, CONFIG)
    with torch.no_grad():
        got = rows(forward(unet), inputs, labels, step=0)
    runtime.detach()
    torch.testing.assert_close(
        got.double(), expected(unet, adapters, inputs, labels, CONFIG), atol=2e-4, rtol=1e-4
    )


def test_each_adapters_rows_can_see_their_own_inputs():
    """Per-LoRA text-encoder parts: LoRA i's rows get the prompt as LoRA i's text encoder encodes
    it, the base rows the plain encoding; the rest of the inputs is shared."""
    unet, adapters = build()
    inputs, labels = host_batch()
    g = torch.Generator().manual_seed(9)
    contexts = {key: torch.randn(inputs["context"].shape, generator=g) for key in (None, 0, 1, 2)}
    rows, runtime = composer_for(unet, adapters, CONFIG)
    with torch.no_grad():
        got = rows(
            forward(unet),
            inputs,
            labels,
            step=0,
            adapter_inputs={k: {"context": c} for k, c in contexts.items()},
        )
    runtime.detach()
    want = expected(unet, adapters, inputs, labels, CONFIG, contexts)
    torch.testing.assert_close(got.double(), want, atol=2e-4, rtol=1e-4)
    assert not torch.allclose(want, expected(unet, adapters, inputs, labels, CONFIG), atol=1e-3)


@pytest.mark.parametrize("config", [CONFIG, REUSE], ids=["evaluate", "reuse"])
@pytest.mark.parametrize("pattern", ["cond-then-uncond", "uncond-first-same-call", "row-by-row"])
def test_separate_calls_and_any_order_give_the_same_rows(pattern, config):
    unet, adapters = build()
    inputs, labels = host_batch()
    rows, runtime = composer_for(unet, adapters, config)
    with torch.no_grad():
        whole = rows(forward(unet), inputs, labels, step=0)
        rows.reset()
        if pattern == "uncond-first-same-call":  # Forge's cond_or_uncond = [1, 0]
            order = [2, 3, 0, 1]
            got = rows(
                forward(unet), {k: v[order] for k, v in inputs.items()}, [labels[i] for i in order], step=0
            )
            got = got[torch.argsort(torch.tensor(order))]
        else:
            chunks = [[0, 1], [2, 3]] if pattern == "cond-then-uncond" else [[0], [1], [2], [3]]
            got = torch.cat(
                [
                    rows(forward(unet), {k: v[c] for k, v in inputs.items()}, [labels[i] for i in c], step=0)
                    for c in chunks
                ]
            )
    runtime.detach()
    torch.testing.assert_close(got, whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config", [CONFIG, REUSE], ids=["evaluate", "reuse"])
def test_and_prompts_compose_each_cond_row_and_the_uncond_takes_their_mean_weights(config):
    # reuse: the uncond takes the mean of the sub-prompts' LoRA changes instead
    unet, adapters = build()
    inputs, labels = host_batch(b=2, extra_cond=(0,))  # image 0 has two AND sub-prompts
    assert [label.sample for label in labels if label.branch == "cond"] == [0, 0, 1]
    rows, runtime = composer_for(unet, adapters, config)
    with torch.no_grad():
        got = rows(forward(unet), inputs, labels, step=0)
    runtime.detach()
    torch.testing.assert_close(
        got.double(), expected(unet, adapters, inputs, labels, config), atol=2e-4, rtol=1e-4
    )


def test_reused_uncond_runs_no_lora_on_the_negative_and_is_not_the_evaluated_one():
    unet, adapters = build()
    inputs, labels = host_batch()
    calls = []
    rows, runtime = composer_for(unet, adapters, REUSE)
    with torch.no_grad():
        got = rows(lambda x, t, context: calls.append(len(x)) or unet(x, t, context), inputs, labels, step=0)
    runtime.detach()
    assert calls == [2 * (1 + 3) + 2]  # cond: base + 3 LoRAs per image; uncond: base only, as at lam 1
    torch.testing.assert_close(
        got.double(), expected(unet, adapters, inputs, labels, REUSE), atol=2e-4, rtol=1e-4
    )
    assert not torch.allclose(
        got[2:].double(), expected(unet, adapters, inputs, labels, CONFIG)[2:], atol=1e-3
    )


def test_lam_one_needs_no_lora_uncond_rows_and_gives_the_base_uncond():
    unet, adapters = build()
    inputs, labels = host_batch()
    config = LoRAtorioConfig(patch_size=2, temperature=1.0, recenter=1.0)
    calls = []
    rows, runtime = composer_for(unet, adapters, config)
    with torch.no_grad():
        got = rows(lambda x, t, context: calls.append(len(x)) or unet(x, t, context), inputs, labels, step=0)
        base_uncond = unet(inputs["x"][2:], inputs["t"][2:], inputs["context"][2:])
    runtime.detach()
    assert calls == [2 * (1 + 3) + 2]  # cond: base + 3 LoRAs per image; uncond: base only
    torch.testing.assert_close(got[2:], base_uncond)


@pytest.mark.parametrize("uncond_loras", ["evaluate", "reuse"])
def test_top_k_keeps_its_set_across_steps_and_calls_and_names_the_kept(uncond_loras):
    unet, adapters = build()
    inputs, labels = host_batch()
    config = LoRAtorioConfig(
        patch_size=2, temperature=1.0, recenter=0.5, top_k=2, reselect_every=2, uncond_loras=uncond_loras
    )
    rows, runtime = composer_for(unet, adapters, config)
    sizes = []

    def counted(x, t, context):
        sizes.append(len(x))
        return unet(x, t, context)

    with torch.no_grad():
        for step in range(3):
            rows(counted, {k: v[:2] for k, v in inputs.items()}, labels[:2], step=step)  # cond call
            rows(counted, {k: v[2:] for k, v in inputs.items()}, labels[2:], step=step)  # uncond call
    runtime.detach()
    # each cond call: base + (3 on selection steps, 2 between) per image; uncond: base + the kept 2,
    # or the base alone when it reuses the cond's change
    uncond = 6 if uncond_loras == "evaluate" else 2
    assert sizes == [8, uncond, 6, uncond, 8, uncond]
    assert all(len(names) == 2 for names in rows.kept.values())


def test_an_uncond_row_before_its_cond_rows_is_refused_and_known_rows_are_not_evaluated_again():
    """The uncond branch is re-centred with its image's COND weights: a host that may send uncond
    rows first asks missing_cond, has the cond rows composed first, and hands their outputs back
    as known when the call holding them comes; nothing is guessed, nothing evaluated twice."""
    unet, adapters = build()
    inputs, labels = host_batch()
    rows, runtime = composer_for(unet, adapters, CONFIG)
    sizes = []

    def counted(x, t, context):
        sizes.append(len(x))
        return unet(x, t, context)

    with torch.no_grad():
        whole = rows(forward(unet), inputs, labels, step=0)
        rows.reset()
        assert rows.missing_cond(labels[2:], step=0) and not rows.missing_cond(labels, step=0)
        with pytest.raises(RuntimeError, match="uncond row came before its image's cond rows"):
            rows(forward(unet), {k: v[2:] for k, v in inputs.items()}, labels[2:], step=0)
        cond = rows(forward(unet), {k: v[:2] for k, v in inputs.items()}, labels[:2], step=0)
        assert not rows.missing_cond(labels[2:], step=0)
        got = rows(counted, inputs, labels, step=0, known={0: cond[0], 1: cond[1]})
        rows.forget_cond()  # a second evaluation of the same step (second-order sampler)
        assert rows.missing_cond(labels[2:], step=0)
    runtime.detach()
    assert sizes == [2 * (1 + 3)]  # the uncond rows only: base + 3 LoRAs each
    torch.testing.assert_close(got, whole, atol=1e-5, rtol=1e-5)


def test_conversions_wrap_the_forward_output_space():
    unet, adapters = build()
    inputs, labels = host_batch()
    rows, runtime = composer_for(unet, adapters, CONFIG)
    with torch.no_grad():
        plain = rows(forward(unet), inputs, labels, step=0)
        rows.reset()
        # a host whose forward returns x0 = x - eps (a sigma of 1), converted both ways
        got = rows(
            lambda x, t, context: x - unet(x, t, context),
            inputs,
            labels,
            step=0,
            to_eps=lambda out, i: i["x"] - out,
            from_eps=lambda eps, i: i["x"] - eps,
        )
    runtime.detach()
    torch.testing.assert_close(got, inputs["x"] - plain, atol=1e-5, rtol=1e-5)


def test_recorded_weights_and_bad_labels():
    unet, adapters = build()
    inputs, labels = host_batch()
    rows, runtime = composer_for(unet, adapters, CONFIG, record_weights=True)
    with torch.no_grad():
        rows(forward(unet), inputs, labels, step=0)
        with pytest.raises(ValueError, match="labels has 3 entries for 4 rows"):
            rows(forward(unet), inputs, labels[:3], step=1)
    runtime.detach()
    assert set(rows.weights[0]) == {0, 1} and rows.weights[0][0].shape == (3, 4, 4)
    torch.testing.assert_close(rows.weights[0][0].sum(0), torch.ones(4, 4))


GATED = LoRAtorioConfig(patch_size=2, temperature=1.0, recenter=0.5, exact_every=3, exact_first=1)


def steps_through_the_core(unet, runtime, inputs, labels, config, steps):
    """Each step's composed cond and uncond rows by StepComposer directly (one image per row pair)."""
    from loratorio_core import StepComposer
    from loratorio_core.lora import evaluate_entries

    composer = StepComposer(config)
    b = len(labels) // 2
    x, cond, uncond = inputs["x"][:b], inputs["context"][:b], inputs["context"][b:]
    state, out = None, []
    for step in range(steps):
        plan = composer.plan(step, ADAPTERS, batch_size=b, gates=state)
        batched = {
            "x": x[plan.sample_index],
            "t": torch.full((plan.num_entries,), 400),
            "context": torch.cat([cond, uncond])[plan.conditioning_index],
        }
        eps = evaluate_entries(forward(unet), runtime, plan.entry_adapters, batched)
        result = composer.combine(plan, eps, 5.0)
        state = result.gates
        out.append(torch.cat([result.cond, result.uncond]))
    return out


@pytest.mark.parametrize("config", [GATED, GATED.replace(uncond_loras="reuse")], ids=["evaluate", "reuse"])
@pytest.mark.parametrize("pattern", ["one-call", "cond-then-uncond", "uncond-first", "row-by-row"])
def test_gated_steps_through_host_rows_equal_the_core_in_every_calling_pattern(pattern, config):
    unet, adapters = build()
    inputs, labels = host_batch()
    rows, runtime = composer_for(unet, adapters, config, record_weights=True)
    chunks = {
        "one-call": [[0, 1, 2, 3]],
        "cond-then-uncond": [[0, 1], [2, 3]],
        "uncond-first": [[2, 3, 0, 1]],
        "row-by-row": [[0], [1], [2], [3]],
    }[pattern]
    with torch.no_grad():
        want = steps_through_the_core(unet, runtime, inputs, labels, config, 5)
        for step in range(5):
            got = torch.zeros(4, 4, 8, 8)
            for c in chunks:
                got[c] = rows(
                    forward(unet), {k: v[c] for k, v in inputs.items()}, [labels[i] for i in c], step
                )
            torch.testing.assert_close(got, want[step], atol=1e-5, rtol=1e-5)
    assert set(rows.weights) == {0, 3}  # the maps users see are those of the exact steps
    runtime.detach()
