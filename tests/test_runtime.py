"""The per-row LoRA runtime: exact per row, never touching the model, always leaving it as it was."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from loratorio_core.lora import LayerUpdate, LoRARuntime, evaluate_entries

g = torch.Generator().manual_seed(0)


def rnd(*shape, scale=0.3):
    return torch.randn(*shape, generator=g) * scale


def updates_for(module: nn.Module, kind: str) -> LayerUpdate:
    """A random update of the given kind that fits ``module``."""
    w = module.weight
    out = w.shape[0]
    if kind == "lowrank":
        if isinstance(module, nn.Linear):
            return LayerUpdate(down=rnd(3, w.shape[1]), up=rnd(out, 3), alpha=1.5)
        return LayerUpdate(down=rnd(3, w.shape[1], *w.shape[2:]), up=rnd(out, 3, 1, 1), alpha=6.0)
    if kind == "tucker":
        return LayerUpdate(
            down=rnd(2, w.shape[1], 1, 1), mid=rnd(2, 2, *w.shape[2:]), up=rnd(out, 2, 1, 1), alpha=1.0
        )
    if kind == "dense":
        bias = rnd(out) if module.bias is not None else None
        return LayerUpdate(dense=rnd(*w.shape), dense_bias=bias)
    if kind == "grouped":  # a low-rank update of a grouped conv's (out, in/groups, k, k) weight
        return LayerUpdate(down=rnd(2, w.shape[1:].numel()), up=rnd(out, 2), alpha=2.0)
    raise AssertionError(kind)


LAYERS = {
    "linear": lambda: nn.Linear(12, 10),
    "linear-3d-input": lambda: nn.Linear(12, 10),
    "conv1x1": lambda: nn.Conv2d(6, 8, 1),
    "conv3x3-stride2": lambda: nn.Conv2d(6, 8, 3, stride=2, padding=1),
    "conv3x3-dilated": lambda: nn.Conv2d(6, 8, 3, padding=2, dilation=2),
    "conv-circular": lambda: nn.Conv2d(6, 8, 3, padding=1, padding_mode="circular"),
    "conv-grouped": lambda: nn.Conv2d(6, 8, 3, padding=1, groups=2),
}
CASES = [
    ("linear", "lowrank"),
    ("linear-3d-input", "lowrank"),
    ("linear", "dense"),
    ("conv1x1", "lowrank"),
    ("conv3x3-stride2", "lowrank"),
    ("conv3x3-stride2", "tucker"),
    ("conv3x3-stride2", "dense"),
    ("conv3x3-dilated", "lowrank"),
    ("conv-circular", "lowrank"),
    ("conv-grouped", "grouped"),
    ("conv-grouped", "dense"),
]


def inputs_for(layer: str, rows: int) -> torch.Tensor:
    if layer.startswith("linear"):
        return rnd(rows, 5, 12, scale=1) if layer.endswith("3d-input") else rnd(rows, 12, scale=1)
    return rnd(rows, 6, 9, 7, scale=1)


def merged_copy(module: nn.Module, updates: list[tuple[LayerUpdate, float]]) -> nn.Module:
    merged = copy.deepcopy(module)
    with torch.no_grad():
        for update, scale in updates:
            merged.weight += scale * update.delta_weight(merged.weight.shape)
            if update.dense_bias is not None:
                merged.bias += scale * update.dense_bias
    return merged


@pytest.mark.parametrize("layer, kind", CASES, ids=[f"{a}-{b}" for a, b in CASES])
def test_active_rows_equal_a_forward_of_the_model_with_the_update_merged(layer, kind):
    module = LAYERS[layer]()
    first, second = updates_for(module, kind), updates_for(module, kind)
    x = inputs_for(layer, 6)
    # rows: base, first, first, second at 0.5, both (merge row), first at -1
    rows = [(), ((0, 1.0),), ((0, 1.0),), ((1, 0.5),), ((0, 0.8), (1, 1.2)), ((0, -1.0),)]
    with torch.no_grad():
        base = module(x)
        with LoRARuntime(module, [{"": first}, {"": second}]) as runtime, runtime.rows(rows):
            out = runtime.model(x)
        expected = [
            base[0],
            merged_copy(module, [(first, 1.0)])(x[1:2])[0],
            merged_copy(module, [(first, 1.0)])(x[2:3])[0],
            merged_copy(module, [(second, 0.5)])(x[3:4])[0],
            merged_copy(module, [(first, 0.8), (second, 1.2)])(x[4:5])[0],
            merged_copy(module, [(first, -1.0)])(x[5:6])[0],
        ]
    assert torch.equal(out[0], base[0])  # the base row is untouched, bit for bit
    torch.testing.assert_close(out, torch.stack(expected), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("memory", ["channels-last", "autocast"])
def test_convs_with_channels_last_outputs_or_under_autocast_get_the_same_change(memory):
    # The up matmul adds straight into the output when it can (NCHW or channels last, one dtype);
    # a transformer's tokens reshaped to a grid come channels last, and autocast mixes dtypes.
    module = nn.Conv2d(6, 8, 3, padding=1)
    first, second = updates_for(module, "lowrank"), updates_for(module, "lowrank")
    x = inputs_for("conv3x3", 4).contiguous(memory_format=torch.channels_last)
    rows = [(), ((0, 1.0),), ((0, 1.0),), ((1, 0.5),)]  # each adapter's rows one slice
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=memory == "autocast")
    with torch.no_grad():
        with autocast, LoRARuntime(module, [{"": first}, {"": second}]) as runtime, runtime.rows(rows):
            out = runtime.model(x)
        expected = torch.stack(
            [
                module(x[0:1])[0],
                merged_copy(module, [(first, 1.0)])(x[1:2])[0],
                merged_copy(module, [(first, 1.0)])(x[2:3])[0],
                merged_copy(module, [(second, 0.5)])(x[3:4])[0],
            ]
        )
    if memory == "channels-last":
        assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    else:
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.05)


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.proj = nn.Linear(8, 8)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        h = self.proj(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.out(torch.tanh(h))


def small_adapters(model, n=3):
    names = ["conv", "proj", "out"]
    return [
        {name: updates_for(dict(model.named_modules())[name], "lowrank") for name in names} for _ in range(n)
    ]


def test_mixed_row_batches_equal_the_rows_evaluated_one_by_one():
    model = Small().eval()
    runtime = LoRARuntime(model, small_adapters(model))
    rows = [((2, 0.7),), (), ((0, 1.0),), ((0, 1.0), (1, 0.5)), ((2, 0.7),), ((1, 1.0),), ((0, 0.2),)]
    x = rnd(len(rows), 4, 6, 5, scale=1)
    with torch.no_grad(), runtime:
        with runtime.rows(rows):
            together = model(x)
        alone = []
        for r, active in enumerate(rows):
            with runtime.rows([active]):
                alone.append(model(x[r : r + 1]))
    torch.testing.assert_close(together, torch.cat(alone), atol=1e-6, rtol=1e-6)


def snapshot(model: nn.Module):
    return (
        {name: (p, p.detach().clone()) for name, p in model.named_parameters()},
        {
            name: (dict(m._forward_hooks), dict(m._forward_pre_hooks), type(m.forward))
            for name, m in model.named_modules()
        },
    )


def assert_restored(model: nn.Module, before) -> None:
    params, hooks = snapshot(model)
    for name, (tensor, values) in before[0].items():
        assert params[name][0] is tensor and torch.equal(params[name][1], values), name
    assert hooks == before[1]


def test_detaching_restores_parameters_and_hooks_exactly():
    model = Small()
    model.proj.register_forward_hook(lambda m, a, o: None)  # a hook of someone else's stays
    before = snapshot(model)
    runtime = LoRARuntime(model, small_adapters(model))
    with runtime, runtime.rows([((0, 1.0),), ()]):
        model(rnd(2, 4, 5, 5))
    assert not runtime.attached
    assert_restored(model, before)


def test_an_exception_mid_forward_leaves_the_model_as_it_was():
    model = Small()
    before = snapshot(model)

    def boom(module, args, output):
        raise RuntimeError("boom mid-forward")

    runtime = LoRARuntime(model, small_adapters(model))
    with pytest.raises(RuntimeError, match="boom"), runtime, runtime.rows([((0, 1.0),)] * 2):
        handle = model.out.register_forward_hook(boom)
        try:
            model(rnd(2, 4, 5, 5))
        finally:
            handle.remove()
    assert_restored(model, before)
    # and a forward afterwards is the plain model's
    x = rnd(2, 4, 5, 5)
    torch.testing.assert_close(model(x), copy.deepcopy(model)(x))


def test_hooks_outside_a_rows_block_change_nothing():
    model = Small().eval()
    x = rnd(3, 4, 5, 5)
    with torch.no_grad():
        plain = model(x)
        with LoRARuntime(model, small_adapters(model)):
            assert torch.equal(model(x), plain)


def test_a_forward_with_another_row_count_is_a_clear_error():
    model = Small()
    with LoRARuntime(model, small_adapters(model)) as runtime, runtime.rows([((0, 1.0),)] * 3):
        with pytest.raises(RuntimeError, match="received 2 batch rows"):
            model(rnd(2, 4, 5, 5))


def test_bad_assignments_and_modules_are_refused():
    model = Small()
    with pytest.raises(ValueError, match="nope"):
        LoRARuntime(model, [{"nope": updates_for(model.proj, "lowrank")}])
    runtime = LoRARuntime(model, small_adapters(model, 2))
    with pytest.raises(RuntimeError, match="attached"), runtime.rows([()]):
        pass
    with runtime, pytest.raises(ValueError, match="adapter 5"), runtime.rows([((5, 1.0),)]):
        pass


def test_chunked_evaluation_equals_one_call():
    model = Small().eval()
    runtime = LoRARuntime(model, small_adapters(model))
    rows = [(), ((0, 1.0),), ((1, 0.9),), ((2, 1.1),), (), ((0, 1.0),), ((1, 0.9),)]
    x = rnd(len(rows), 4, 6, 6, scale=1)
    with torch.no_grad(), runtime:
        whole = evaluate_entries(lambda x: model(x), runtime, rows, {"x": x})
        for max_rows in (1, 2, 3, 5):
            chunked = evaluate_entries(lambda x: model(x), runtime, rows, {"x": x}, max_rows=max_rows)
            torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="max_rows"):
        evaluate_entries(lambda x: model(x), runtime, rows, {"x": x}, max_rows=0)


def test_half_precision_models_get_their_deltas_in_their_dtype():
    model = Small().to(torch.bfloat16)
    runtime = LoRARuntime(model, small_adapters(model))
    x = rnd(2, 4, 5, 5).to(torch.bfloat16)
    with torch.no_grad(), runtime, runtime.rows([(), ((0, 1.0),)]):
        out = model(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert not torch.equal(out[0], out[1])


def test_gradients_flow_through_the_deltas():
    model = Small()
    x = rnd(2, 4, 5, 5).requires_grad_()
    with LoRARuntime(model, small_adapters(model)) as runtime, runtime.rows([(), ((0, 1.0),)]):
        model(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_everywhere_applies_the_adapters_to_every_row_of_any_batch():
    model = Small().eval()
    runtime = LoRARuntime(model, small_adapters(model))
    with torch.no_grad(), runtime:
        for rows in (1, 3):
            x = rnd(rows, 4, 5, 5)
            with runtime.everywhere([(1, 0.5), (2, 1.0)]):
                together = model(x)
            with runtime.rows([((1, 0.5), (2, 1.0))] * rows):
                expected = model(x)
            torch.testing.assert_close(together, expected)
        assert not torch.equal(together, model(x))


class LinearLike(nn.Module):
    """Like Forge's ForgeOperations.Linear: not an nn.Linear subclass, same contract."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.randn(out_features, in_features, generator=g) * 0.2)
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x):
        return nn.functional.linear(x, self.weight, self.bias)


def test_linear_like_layers_that_are_not_nn_linear_take_loras_too():
    from loratorio_core.lora import layer_aliases

    model = nn.Sequential(LinearLike(12, 10))
    assert "0" in layer_aliases(model).values()
    update = LayerUpdate(down=rnd(3, 12), up=rnd(10, 3), alpha=3.0)
    x = rnd(2, 12, scale=1)
    with torch.no_grad(), LoRARuntime(model, [{"0": update}]) as runtime, runtime.rows([(), ((0, 1.0),)]):
        out = model(x)
    expected = nn.functional.linear(x[1], model[0].weight + update.delta_weight((10, 12)), model[0].bias)
    torch.testing.assert_close(out[1], expected)
    torch.testing.assert_close(out[0], model(x)[0])
