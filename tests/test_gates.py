"""The gated rows of LoRAtorio's gated steps, layer by layer, against the same layers written out.

A gated row carries every LoRA at once; each LoRA's change of a layer's output is multiplied per
position by its gate, read at that layer's resolution (the mean of the latent positions a cell
covers). Layers without position (cross-attention keys and values, time-embedding projections)
take one number per row, ``Gate.context_scale``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from loratorio_core.lora import Gate, LayerUpdate, LoRARuntime
from loratorio_core.lora.gates import resize_maps, token_grid
from loratorio_core.models import UNetModel, tiny_config

g = torch.Generator().manual_seed(3)


def rnd(*shape, scale=0.3):
    return torch.randn(*shape, generator=g) * scale


def lowrank(module: nn.Module) -> LayerUpdate:
    w = module.weight
    if isinstance(module, nn.Linear):
        return LayerUpdate(down=rnd(3, w.shape[1]), up=rnd(w.shape[0], 3), alpha=1.5)
    return LayerUpdate(down=rnd(3, w.shape[1], *w.shape[2:]), up=rnd(w.shape[0], 3, 1, 1), alpha=6.0)


def delta_by_hand(module: nn.Module, update: LayerUpdate, x: torch.Tensor) -> torch.Tensor:
    """The layer's change for input x: a forward of the layer with only the LoRA's weight."""
    changed = copy.deepcopy(module)
    with torch.no_grad():
        changed.weight.copy_(update.delta_weight(module.weight.shape))
        if changed.bias is not None:
            changed.bias.zero_()
    return changed(x)


def block_mean(maps: torch.Tensor, factor: int) -> torch.Tensor:
    """(R, H, W) -> (R, H / factor, W / factor): each cell the mean of the factor x factor block."""
    r, h, w = maps.shape
    return maps.reshape(r, h // factor, factor, w // factor, factor).mean(dim=(2, 4))


class Holder(nn.Module):
    """One layer under a module path, so its name says what it is (``blk.attn2.to_k`` ...)."""

    def __init__(self, path: str, layer: nn.Module):
        super().__init__()
        self.path = path
        parent = self
        parts = path.split(".")
        for part in parts[:-1]:
            child = nn.Module()
            parent.add_module(part, child)
            parent = child
        parent.add_module(parts[-1], layer)
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def one_lora_on_a_linear(path: str) -> tuple[nn.Linear, Holder, LayerUpdate, LoRARuntime]:
    """A Linear(6, 7) under ``path`` with one random low-rank LoRA, and the runtime holding it."""
    layer = nn.Linear(6, 7).eval()
    model = Holder(path, layer)
    update = lowrank(layer)
    return layer, model, update, LoRARuntime(model, [{path: update}])


# name, layer, input, the factor the layer's grid is below the 8x6 latent (None: no position)
CASES = {
    "conv3x3-latent": ("in_layers.2", lambda: nn.Conv2d(4, 5, 3, padding=1), (4, 8, 6), 1),
    "conv3x3-stride2": ("op", lambda: nn.Conv2d(4, 5, 3, stride=2, padding=1), (4, 8, 6), 2),
    "self-attn-q-tokens": ("attn1.to_q", lambda: nn.Linear(6, 7), (48, 6), 1),
    "ff-tokens-half": ("ff.net.2", lambda: nn.Linear(6, 7), (12, 6), 2),
    "cross-attn-k": ("attn2.to_k", lambda: nn.Linear(6, 7), (77, 6), None),
    "cross-attn-v": ("attn2.to_v", lambda: nn.Linear(6, 7), (77, 6), None),
    "time-embedding": ("emb_layers.1", lambda: nn.Linear(6, 7), (6,), None),
}


def gated_by_hand(layer: nn.Module, updates: list, x: torch.Tensor, rows: list, factor: int | None):
    """The layer's output with each row's gated LoRAs written out: base plus each LoRA's change
    times its gate's map averaged over factor x factor blocks (the layer's grid) and its scale, or
    times its context scale where the layer has no position (factor None)."""
    with torch.no_grad():
        hand = layer(x)
        for i, update in enumerate(updates):
            change = delta_by_hand(layer, update, x)
            for r, active in enumerate(rows):
                gate = dict(active).get(i)
                if gate is None:
                    continue
                if factor is None:
                    hand[r] += gate.context_scale * change[r]
                    continue
                cells = block_mean(gate.map[None], factor)[0] * gate.scale
                if change.dim() == 4:  # conv: (C, h, w)
                    hand[r] += change[r] * cells
                else:  # tokens: (h * w, C), row-major like a transformer's flatten
                    hand[r] += change[r] * cells.flatten()[:, None]
    return hand


@pytest.mark.parametrize("case", list(CASES))
def test_each_gated_layer_equals_base_plus_each_loras_delta_times_its_gate_at_its_resolution(case):
    path, make, in_shape, factor = CASES[case]
    layer = make().eval()
    model = Holder(path, layer)
    updates = [lowrank(layer), lowrank(layer)]
    runtime = LoRARuntime(model, [{path: updates[0]}, {path: updates[1]}])
    maps = torch.rand(2, 3, 8, 6, generator=g)  # (LoRA, row, H, W) at the latent's resolution
    scales, context = (0.8, 1.1), (0.5, 0.9)
    rows = [
        tuple((i, Gate(scales[i] * (r + 1), maps[i, r], context[i] * (r + 1))) for i in range(2))
        for r in range(3)
    ]
    x = rnd(3, *in_shape, scale=1)
    with torch.no_grad(), runtime, runtime.rows(rows):
        ours = model(x)
    hand = gated_by_hand(layer, updates, x, rows, factor)
    torch.testing.assert_close(ours, hand, atol=1e-5, rtol=1e-5)


def lowrank_of_rank(module: nn.Module, rank: int) -> LayerUpdate:
    w = module.weight
    if isinstance(module, nn.Linear):
        return LayerUpdate(down=rnd(rank, w.shape[1]), up=rnd(w.shape[0], rank), alpha=rank / 2)
    return LayerUpdate(down=rnd(rank, *w.shape[1:]), up=rnd(w.shape[0], rank, 1, 1), alpha=2.0 * rank)


def other_form(module: nn.Module) -> LayerUpdate:
    """A change that cannot stack with low-rank ones along the rank: Tucker (conv) or dense (linear)."""
    w = module.weight
    if isinstance(module, nn.Linear):
        return LayerUpdate(dense=rnd(*w.shape))
    return LayerUpdate(
        down=rnd(2, w.shape[1], 1, 1), mid=rnd(2, 2, *w.shape[2:]), up=rnd(w.shape[0], 2, 1, 1)
    )


@pytest.mark.parametrize("rows_apart", [False, True], ids=["rows-together", "rows-apart"])
@pytest.mark.parametrize("case", ["conv3x3-stride2", "self-attn-q-tokens", "cross-attn-k"])
def test_loras_of_other_ranks_and_forms_in_one_gated_block_each_take_their_own_gate(case, rows_apart):
    # A gated step's LoRAs are stacked along the rank at each layer, each gate multiplying its own
    # part; ranks differ between LoRAs, and Tucker or dense changes keep their own path beside them.
    path, make, in_shape, factor = CASES[case]
    layer = make().eval()
    model = Holder(path, layer)
    updates = [lowrank_of_rank(layer, 2), lowrank_of_rank(layer, 5), other_form(layer)]
    runtime = LoRARuntime(model, [{path: u} for u in updates])
    maps = torch.rand(3, 8, 6, generator=g)
    maps = maps / maps.sum(0)
    scales, context = (0.8, 1.1, 0.6), (0.5, 0.9, 0.7)
    gated = tuple((i, Gate(scales[i], maps[i], context[i])) for i in range(3))
    rows = [gated, (), gated] if rows_apart else [gated, gated, ()]
    x = rnd(3, *in_shape, scale=1)
    with torch.no_grad(), runtime, runtime.rows(rows):
        ours = model(x)
    hand = gated_by_hand(layer, updates, x, rows, factor)
    torch.testing.assert_close(ours, hand, atol=1e-5, rtol=1e-5)


def test_a_row_between_gated_rows_without_a_lora_is_untouched_even_where_a_lora_would_overflow():
    # The gated rows' LoRAs are stacked over their rows; a row between them that carries none is
    # not given up(0 * down(x)), which is NaN where down(x) overflows (half precision).
    layer = nn.Linear(2, 2, bias=False).eval()
    with torch.no_grad():
        layer.weight.copy_(torch.eye(2) * 1e-3)
    layer.half()
    model = Holder("attn1.to_q", layer)
    update = LayerUpdate(down=torch.full((1, 2), 100.0), up=torch.full((2, 1), 1e-4), alpha=1.0)
    runtime = LoRARuntime(model, [{"attn1.to_q": update}])
    gate = Gate(1.0, torch.full((2, 2), 0.5), 1.0)
    x = torch.full((3, 4, 2), 100.0)
    x[1] = 60000.0  # this row's down(x) is 1.2e7: past float16's range
    with torch.no_grad(), runtime, runtime.rows([((0, gate),), (), ((0, gate),)]):
        ours = model(x.half())
    with torch.no_grad():
        base = model(x.half())
    assert torch.equal(ours[1], base[1]) and torch.isfinite(ours).all()


def test_an_adapter_named_twice_on_a_row_adds_both():
    layer, model, update, runtime = one_lora_on_a_linear("attn1.to_q")
    gate_map = torch.rand(8, 6, generator=g)
    x = rnd(1, 48, 6, scale=1)
    with torch.no_grad(), runtime, runtime.rows([((0, Gate(1.0, gate_map, 0.5)), (0, 0.5))]):
        ours = model(x)
    with torch.no_grad():
        hand = layer(x) + delta_by_hand(layer, update, x) * (gate_map.flatten()[:, None] + 0.5)
    torch.testing.assert_close(ours, hand, atol=1e-5, rtol=1e-5)


def test_under_autocast_the_loras_change_is_added_in_the_layers_output_dtype():
    # Under autocast a layer's input, its LoRA's factors and its output can have three dtypes
    # (A1111 on a GPU): the change is then computed and cast, never accumulated across dtypes.
    layer, model, update, runtime = one_lora_on_a_linear("attn1.to_q")
    gate_map = torch.rand(8, 6, generator=g)
    x = rnd(2, 48, 6, scale=1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), runtime:
        with runtime.rows([((0, Gate(1.0, gate_map, 1.0)),), ((0, 0.7),)]):
            ours = model(x)
    with torch.no_grad():
        change = delta_by_hand(layer, update, x)
        hand = layer(x)
        hand[0] += change[0] * gate_map.flatten()[:, None]
        hand[1] += 0.7 * change[1]
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), hand, atol=0.05, rtol=0.05)


def test_layers_of_one_resolution_in_other_dtypes_each_get_gates_in_their_own():
    # A model may keep some layers in float32 and others in half precision: the gates stacked for
    # one resolution are made per dtype, not shared between the two.
    model = nn.Module()
    model.a, model.b = Holder("attn1.to_q", nn.Linear(6, 7)), Holder("attn1.to_q", nn.Linear(6, 7))
    model.b.to(torch.bfloat16)
    names = ("a.attn1.to_q", "b.attn1.to_q")
    updates = [{n: lowrank(model.a.layer) for n in names} for _ in range(2)]
    runtime = LoRARuntime(model, updates)
    maps = torch.rand(2, 8, 6, generator=g)
    rows = [tuple((i, Gate(1.0, maps[i], 0.5)) for i in range(2))]
    x = rnd(1, 48, 6, scale=1)
    with torch.no_grad(), runtime, runtime.rows(rows):
        outs = model.a(x), model.b(x.to(torch.bfloat16))
    with torch.no_grad():
        for out, holder, name, tol in zip(outs, (model.a, model.b), names, (1e-5, 0.05), strict=True):
            hand = holder(x.to(out.dtype)).float()
            for i in range(2):
                change = delta_by_hand(model.a.layer, updates[i][name], x)
                hand += change * maps[i].flatten()[:, None]
            assert out.dtype == holder.layer.weight.dtype
            torch.testing.assert_close(out.float(), hand, atol=tol, rtol=tol)


def test_rows_without_gates_in_a_gated_block_take_their_scale_everywhere():
    layer = nn.Conv2d(4, 5, 3, padding=1).eval()
    model = Holder("conv", layer)
    update = lowrank(layer)
    runtime = LoRARuntime(model, [{"conv": update}])
    gate_map = torch.rand(8, 6, generator=g)
    rows = [((0, Gate(1.0, gate_map, 1.0)),), (), ((0, 0.7),)]
    x = rnd(3, 4, 8, 6, scale=1)
    with torch.no_grad(), runtime, runtime.rows(rows):
        ours = model(x)
    with torch.no_grad():
        change = delta_by_hand(layer, update, x)
        hand = layer(x)
        hand[0] += change[0] * gate_map
        hand[2] += 0.7 * change[2]
    torch.testing.assert_close(ours, hand, atol=1e-5, rtol=1e-5)


def test_a_one_by_one_gate_is_one_weight_over_the_whole_image():
    layer, model, update, runtime = one_lora_on_a_linear("attn1.to_out.0")
    x = rnd(2, 48, 6, scale=1)
    uniform = [((0, Gate(0.8, torch.full((1, 1), 0.25), 0.8)),)] * 2
    with torch.no_grad(), runtime:
        with runtime.rows(uniform):
            ours = model(x)
        with runtime.rows([((0, 0.2),)] * 2):
            plain = model(x)
    torch.testing.assert_close(ours, plain, atol=1e-6, rtol=1e-6)


def test_the_whole_unet_with_all_ones_gates_for_one_lora_equals_that_lora_merged():
    torch.manual_seed(0)
    unet = UNetModel(tiny_config()).eval()
    names = [n for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and "blocks" in n]
    assert any(n.endswith("attn2.to_k") for n in names) and any("emb_layers" in n for n in names)
    modules = dict(unet.named_modules())
    update = {n: lowrank(modules[n]) for n in names}
    merged = copy.deepcopy(unet)
    merged_modules = dict(merged.named_modules())
    with torch.no_grad():
        for n, u in update.items():
            merged_modules[n].weight += 0.8 * u.delta_weight(modules[n].weight.shape)
    x = torch.randn(2, unet.config.in_channels, 16, 12)
    t = torch.tensor([10, 500])
    context = torch.randn(2, 5, unet.config.context_dim)
    rows = [((0, Gate(0.8, torch.ones(16, 12), 0.8)),)] * 2
    runtime = LoRARuntime(unet, [update])
    with torch.no_grad(), runtime, runtime.rows(rows):
        ours = unet(x, t, context)
    with torch.no_grad():
        expected = merged(x, t, context)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


def test_token_grids_follow_the_unets_stride_two_downsampling():
    assert token_grid(64 * 48, (64, 48)) == (64, 48)
    assert token_grid(32 * 24, (64, 48)) == (32, 24)
    assert token_grid(5 * 4, (9, 7)) == (5, 4)  # ceil(9 / 2), ceil(7 / 2)
    assert token_grid(77, (64, 48)) is None


def test_resized_maps_keep_weights_that_sum_to_one():
    weights = torch.softmax(torch.randn(3, 9, 7, generator=g), dim=0)  # 3 LoRAs
    small = resize_maps(weights, (5, 4))
    torch.testing.assert_close(small.sum(0), torch.ones(5, 4))


def test_a_layer_whose_tokens_fit_no_resolution_is_a_clear_error():
    layer = nn.Linear(6, 7)
    model = Holder("attn1.to_q", layer)
    runtime = LoRARuntime(model, [{"attn1.to_q": lowrank(layer)}])
    rows = [((0, Gate(1.0, torch.ones(8, 6), 1.0)),)]
    with torch.no_grad(), runtime, runtime.rows(rows), pytest.raises(RuntimeError, match="exact_every=1"):
        model(rnd(1, 50, 6))


def test_bad_gates_are_refused_with_their_setting_named():
    with pytest.raises(ValueError, match="Gate.map"):
        Gate(1.0, torch.ones(3), 1.0)
    with pytest.raises(ValueError, match="Gate.scale"):
        Gate(float("nan"), torch.ones(2, 2), 1.0)
