"""Several LoRAs on one model, each active on its own batch rows, in one forward pass.

``LoRARuntime`` puts one forward hook on every layer an adapter touches. For the rows where
adapters are active, the hook adds ``scale * alpha / rank * up(down(x))`` of each of them to the
layer's output (a dense delta for LoHa/LoKr/full-diff layers and grouped convs); rows without an
adapter see the untouched base model. Each adapter's matmuls run once per layer, on its rows
only: a slice when its rows are contiguous (what a plan produces), a gather otherwise; on gated
rows (a ``Gate`` for a scale) the adapters' low-rank factors run stacked along the rank. The
model's weights are never modified; ``detach`` (or leaving the ``with`` block, also on an
exception) removes every hook.

    runtime = LoRARuntime(unet, [bound_a.layers, bound_b.layers])
    with runtime:
        with runtime.rows(plan.entry_adapters):
            eps = unet(x_in, t_in, context_in)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .files import LayerUpdate
from .gates import Gate, RowGates, is_context_layer
from .keymap import is_linear

# Per batch row, the (adapter index, scale) pairs active on it; a scale may be a ``Gate`` (a
# scale per spatial position, on the gated rows of LoRAtorio's gated steps).
RowAdapters = Sequence[Sequence[tuple[int, "float | Gate"]]]


class LoRARuntime:
    """Adapters (numbered in the order given, as in a plan) applied per batch row."""

    def __init__(self, model: nn.Module, adapters: Sequence[Mapping[str, LayerUpdate]]):
        self.model = model
        self.num_adapters = len(adapters)
        modules = dict(model.named_modules())
        self._layers: dict[str, list[tuple[int, _Delta]]] = {}
        for index, layers in enumerate(adapters):
            for name, update in layers.items():
                if name not in modules:
                    raise ValueError(
                        f"adapters[{index}] names module {name!r}, which the model does not have"
                    )
                self._layers.setdefault(name, []).append((index, _Delta(modules[name], update)))
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._assignment: _Assignment | None = None
        # What outlives a rows() block for the gated adapters stacked in it (``_Stacked``): each
        # layer's split of its deltas and their factors stacked along the rank.
        self._stack_cache: dict[object, object] = {}
        self.attached = False

    def attach(self) -> LoRARuntime:
        """Put the hooks on (once); without ``rows`` they change nothing."""
        if self.attached:
            return self
        modules = dict(self.model.named_modules())
        try:
            for name, deltas in self._layers.items():
                self._handles.append(modules[name].register_forward_hook(self._hook(name, deltas)))
        except BaseException:
            self.detach()
            raise
        self.attached = True
        return self

    def detach(self) -> None:
        """Remove every hook; the model is exactly as before ``attach``."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._assignment = None
        self.attached = False

    def __enter__(self) -> LoRARuntime:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    @contextmanager
    def rows(self, row_adapters: RowAdapters):
        """Within the block, forward passes apply ``row_adapters[r]`` (adapter index, scale)
        pairs to batch row r. Every forward must have ``len(row_adapters)`` rows."""
        if not self.attached:
            raise RuntimeError("LoRARuntime.rows() needs the hooks attached: use `with runtime:` first")
        previous = self._assignment
        self._assignment = _Assignment(row_adapters, self.num_adapters, stack_cache=self._stack_cache)
        try:
            yield self
        finally:
            self._assignment = previous

    @contextmanager
    def everywhere(self, active: Sequence[tuple[int, float]]):
        """Within the block, forward passes apply ``active`` (adapter index, scale) pairs to
        every batch row, whatever the batch size (for a text encoder encoding a prompt)."""
        if not self.attached:
            raise RuntimeError("LoRARuntime.everywhere() needs the hooks attached: use `with runtime:` first")
        previous = self._assignment
        self._assignment = _Assignment([active], self.num_adapters, every_row=True)
        try:
            yield self
        finally:
            self._assignment = previous

    def _hook(self, name: str, layer_deltas: list[tuple[int, _Delta]]) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
            assignment = self._assignment
            if assignment is None or not (assignment.groups or assignment.gated):
                return None
            x = args[0]
            if assignment.num_rows is not None and x.shape[0] != assignment.num_rows:
                raise RuntimeError(
                    f"LoRAtorio: layer {name} received {x.shape[0]} batch rows, but adapters were "
                    f"assigned for {assignment.num_rows}: evaluate the plan's entries in one call per "
                    f"rows() block"
                )
            if torch.is_grad_enabled() and output.requires_grad:
                output = output.clone()  # the in-place adds below then stay visible to autograd
            for index, delta in layer_deltas:  # float scales: one slice (or gather) per adapter
                group = assignment.groups.get(index)
                if group is not None:
                    group.apply(delta, x, output, name)
            stacked = assignment.stacked
            left = layer_deltas if stacked is None else stacked.apply(name, layer_deltas, x, output)
            for index, delta in left:  # gated rows the stack did not take
                group = assignment.gated.get(index)
                if group is not None:
                    group.apply(delta, x, output, name)
            return output

        return hook


def evaluate_entries(
    forward: Callable[..., Tensor],
    runtime: LoRARuntime | None,
    row_adapters: RowAdapters,
    batched: Mapping[str, object],
    *,
    max_rows: int | None = None,
    **shared,
) -> Tensor:
    """``forward(**batched, **shared)`` over all entries, ``max_rows`` at a time.

    batched: tensors (or dicts/lists of tensors, like SDXL conditioning) whose first dimension is
    the entries; each chunk gets its slice, and the runtime (if any) that chunk's adapters.
    With a runtime the entries are evaluated grouped by their adapters (a plan lists cond rows
    before uncond rows, so one LoRA's cond and uncond rows lie apart): every adapter's rows are
    then one slice of the batch, and its matmuls need no gather. The result comes back in entry
    order, identical to one call over every entry.
    """
    total = len(row_adapters)
    if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1):
        raise ValueError(f"max_rows must be an integer >= 1 or None; got {max_rows!r}")
    order = adapter_major_order(row_adapters) if runtime is not None else None
    if order is not None:
        index = torch.tensor(order)
        row_adapters = [row_adapters[i] for i in order]
        batched = {key: take_rows(value, index) for key, value in batched.items()}
    step = total if max_rows is None else max_rows
    outputs = []
    for start in range(0, total, step):
        stop = min(start + step, total)
        chunk = {key: _slice(value, start, stop) for key, value in batched.items()}
        if runtime is None:
            outputs.append(forward(**chunk, **shared))
        else:
            with runtime.rows(row_adapters[start:stop]):
                outputs.append(forward(**chunk, **shared))
    output = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
    if order is None:
        return output
    inverse = torch.empty(total, dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(total)
    return output.index_select(0, inverse.to(output.device))


def adapter_major_order(row_adapters: RowAdapters) -> list[int] | None:
    """Entry order grouped by the adapters active on each entry (stable: base entries first, then
    by adapter index), or None when the entries are already in that order."""
    keys = [tuple(index for index, _ in active) for active in row_adapters]
    order = sorted(range(len(keys)), key=keys.__getitem__)
    return None if order == list(range(len(keys))) else order


def take_rows(value, index: Tensor):
    """``value`` (a tensor, or dicts/lists of tensors, rows on dimension 0) at rows ``index``."""
    if isinstance(value, Tensor):
        return value.index_select(0, index.to(value.device))
    if isinstance(value, Mapping):
        return {key: take_rows(item, index) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(take_rows(item, index) for item in value)
    return value


def _slice(value, start: int, stop: int):
    if isinstance(value, Tensor):
        return value[start:stop]
    if isinstance(value, Mapping):
        return {key: _slice(item, start, stop) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_slice(item, start, stop) for item in value)
    return value


# An adapter whose rows form at most this many contiguous runs (of one scale) gets one delta call
# per run; otherwise one gather of its rows, with index and scale tensors built once per block.
# 1: rows that ``evaluate_entries`` groups by adapter are one slice, and rows a host lays out
# otherwise take the gather they always took (the same arithmetic, bit for bit, as before).
MAX_RUNS = 1


class _Group:
    """The rows of one adapter in a ``rows()`` block and what multiplies its delta on each: a
    float scale per row, or a gate (a scale per position) on gated rows. Contiguous runs of rows
    with one scale are slices (no copy); index and scale tensors of the other cases are built
    once per block and device, not at every layer."""

    def __init__(self, rows: list[int], scales: list, every_row: bool = False):
        self.gates = RowGates(scales) if any(isinstance(s, Gate) for s in scales) else None
        if every_row:
            self.runs: list[tuple[slice, float]] | None = [(slice(None), scales[0])]
        elif self.gates is not None:
            contiguous = rows == list(range(rows[0], rows[0] + len(rows)))
            self.runs = [(slice(rows[0], rows[-1] + 1), 1.0)] if contiguous else None
        else:
            runs = _runs(rows, scales)
            self.runs = runs if len(runs) <= MAX_RUNS else None
        self.indices = rows
        self.scales = scales
        self._tensors: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor | None]] = {}

    def apply(self, delta: _Delta, x: Tensor, output: Tensor, name: str) -> None:
        """output[rows] += multiplier * delta(x[rows]), in place."""
        if self.gates is not None:
            if self.runs is not None:
                rows = self.runs[0][0]
                change = delta(x[rows]).to(output.dtype)
                output[rows].add_(change * self.gates.multiplier(name, change.shape, x.device, output.dtype))
                return
            index, _ = self._index(x.device, output.dtype)
            change = delta(x.index_select(0, index)).to(output.dtype)
            gate = self.gates.multiplier(name, change.shape, x.device, output.dtype)
            output.index_add_(0, index, change * gate)
            return
        if self.runs is not None:
            for rows, scale in self.runs:
                delta.add_into(x[rows], output[rows], scale)
            return
        index, scales = self._index(x.device, output.dtype)
        change = delta(x.index_select(0, index)).to(output.dtype)
        output.index_add_(0, index, change * scales.view(-1, *[1] * (x.dim() - 1)))

    def _index(self, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
        key = (device, dtype)
        if key not in self._tensors:
            index = torch.tensor(self.indices, dtype=torch.long, device=device)
            scales = None
            if self.gates is None:
                scales = torch.tensor(self.scales, dtype=dtype, device=device)
            self._tensors[key] = (index, scales)
        return self._tensors[key]


def _runs(rows: list[int], scales: list[float]) -> list[tuple[slice, float]]:
    """Rows (ascending) with their scales -> maximal runs of consecutive rows with one scale."""
    runs: list[tuple[slice, float]] = []
    start = 0
    for k in range(1, len(rows) + 1):
        if k == len(rows) or rows[k] != rows[k - 1] + 1 or scales[k] != scales[start]:
            runs.append((slice(rows[start], rows[k - 1] + 1), scales[start]))
            start = k
    return runs


class _Assignment:
    def __init__(
        self,
        row_adapters: RowAdapters,
        num_adapters: int,
        every_row: bool = False,
        stack_cache: dict | None = None,
    ):
        self.num_rows = None if every_row else len(row_adapters)
        plain: dict[int, tuple[list[int], list]] = {}
        gated: dict[int, tuple[list[int], list]] = {}
        for row, active in enumerate(row_adapters):
            for index, scale in active:
                if not (isinstance(index, int) and 0 <= index < num_adapters):
                    raise ValueError(f"row {row} names adapter {index!r}; the runtime has {num_adapters}")
                if isinstance(scale, Gate):
                    if every_row:
                        raise ValueError("everywhere() takes float scales, not gates: gates belong to rows")
                elif not math.isfinite(scale):
                    raise ValueError(f"row {row} gives adapter {index} a scale that is not finite: {scale!r}")
                else:
                    scale = float(scale)
                rows, scales = (gated if isinstance(scale, Gate) else plain).setdefault(index, ([], []))
                rows.append(row)
                scales.append(scale)
        self.groups: dict[int, _Group] = {
            index: _Group(rows, scales, every_row) for index, (rows, scales) in plain.items()
        }
        self.gated: dict[int, _Group] = {index: _Group(rows, gates) for index, (rows, gates) in gated.items()}
        # A gated step's rows carry every LoRA: stacked along the rank over the gated rows, a layer
        # takes two matmuls for all of them. (Rows with float scales keep one slice per adapter:
        # stacked, each row's matmuls would cover every adapter's rank. An adapter named twice on
        # one row keeps its own path, which adds both.)
        stackable = {i: g for i, g in self.gated.items() if len(set(g.indices)) == len(g.indices)}
        self.stacked = _Stacked(stackable, {} if stack_cache is None else stack_cache) if stackable else None


class _Delta:
    """Computes one adapter's change of one layer's output, for the rows it is given."""

    def __init__(self, module: nn.Module, update: LayerUpdate):
        self.module = module
        self.update = update
        self.grouped = isinstance(module, nn.Conv2d) and module.groups > 1
        self.linear = is_linear(module)
        # Low rank with a 1 x 1 up (not dense, not Tucker, not a grouped conv): its up matmul can
        # add into the layer's output, and stack with other adapters' along the rank.
        self.fusable = not (update.is_dense or self.grouped or update.mid is not None)
        self._cache: dict[tuple[torch.device, torch.dtype], tuple[Tensor, ...]] = {}

    def _weights(self, device: torch.device, dtype: torch.dtype) -> tuple[Tensor | None, ...]:
        key = (device, dtype)
        if key not in self._cache:
            update, module = self.update, self.module
            if update.is_dense or self.grouped:
                dense = update.delta_weight(module.weight.shape)
                bias = update.dense_bias.float().reshape(-1) if update.dense_bias is not None else None
                weights = (dense, bias)
            else:
                # alpha / rank folded into up once, here, not at every forward.
                up = update.up.float() * update.multiplier
                down = update.down.float()
                if is_linear(module):
                    weights = (down.flatten(1), up.flatten(1), None)
                else:
                    if down.dim() == 2:
                        down = down[:, :, None, None]
                    up = up.reshape(up.shape[0], up.shape[1], 1, 1)
                    mid = update.mid.float() if update.mid is not None else None
                    weights = (down, up, mid)
            self._cache[key] = tuple(None if w is None else w.to(device=device, dtype=dtype) for w in weights)
        return self._cache[key]

    def low_rank(self, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(down, up_t) of a fusable delta: down (r, in[, kh, kw]), up_t (r, out) with alpha / rank
        folded in (a transposed view, as addmm takes it)."""
        key = ("low rank", device, dtype)
        if key not in self._cache:
            down, up, _ = self._weights(device, dtype)
            self._cache[key] = (down, up.flatten(1).t())
        return self._cache[key]

    def add_into(self, x: Tensor, out: Tensor, alpha: float = 1.0) -> None:
        """out += alpha * delta(x), in place; out: the layer's output on x's rows."""
        if self.fusable:
            down, up_t = self.low_rank(x.device, x.dtype)
            add_low_rank(self, x, down, up_t, out, alpha)
        else:
            out.add_(self(x).to(out.dtype), alpha=alpha)

    def __call__(self, x: Tensor) -> Tensor:
        module = self.module
        if self.update.is_dense or self.grouped:
            dense, bias = self._weights(x.device, x.dtype)
            if is_linear(module):
                return F.linear(x, dense, bias)
            return self._conv(x, dense, bias, groups=module.groups)
        down, up, mid = self._weights(x.device, x.dtype)
        if is_linear(module):
            return F.linear(F.linear(x, down), up)
        if mid is None:
            hidden = self._conv(x, down, None)
        else:
            hidden = self._conv(F.conv2d(x, down), mid, None)
        return F.conv2d(hidden, up)

    def _conv(self, x: Tensor, weight: Tensor, bias: Tensor | None, groups: int = 1) -> Tensor:
        """A conv with the layer's own stride, padding (and padding mode) and dilation."""
        module = self.module
        if module.padding_mode != "zeros":
            x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
            padding = 0
        else:
            padding = module.padding
        return F.conv2d(x, weight, bias, module.stride, padding, module.dilation, groups)


def add_low_rank(
    delta: _Delta, x: Tensor, down: Tensor, up_t: Tensor, out: Tensor, alpha: float = 1.0, hidden_scale=None
) -> None:
    """out += alpha * up(hidden_scale * down(x)), in place, for a low-rank change with a 1 x 1 up.

    down: (r, in) or a conv's (r, in, kh, kw) with the layer's stride and padding; up_t: (r, out);
    hidden_scale: what multiplies the rank-space hidden (broadcast to it), or None. The up matmul
    accumulates straight into ``out`` (one kernel, no temporary of the output's size) when the
    dtypes agree and ``out`` is contiguous; otherwise (autocast) the change is computed and cast.
    """
    hidden = F.linear(x, down) if delta.linear else delta._conv(x, down, None)
    if hidden_scale is not None:
        hidden = hidden * hidden_scale
    same_dtype = out.dtype == hidden.dtype == up_t.dtype
    if same_dtype and delta.linear and out.is_contiguous():
        out.view(-1, out.shape[-1]).addmm_(hidden.reshape(-1, hidden.shape[-1]), up_t, alpha=alpha)
    elif same_dtype and not delta.linear and out.is_contiguous():
        # out[n] (C, h w) += up (C, r) @ hidden[n] (r, h w)
        rows = out.shape[0]
        out.view(rows, out.shape[1], -1).baddbmm_(
            up_t.t().expand(rows, -1, -1), hidden.reshape(rows, hidden.shape[1], -1), alpha=alpha
        )
    elif same_dtype and not delta.linear and out.is_contiguous(memory_format=torch.channels_last):
        # channels last (what a transformer's tokens reshaped to a grid give): (n h w, C) rows
        pixels = out.permute(0, 2, 3, 1)
        pixels.view(-1, pixels.shape[-1]).addmm_(
            hidden.permute(0, 2, 3, 1).reshape(-1, hidden.shape[1]), up_t, alpha=alpha
        )
    else:  # autocast's mixed dtypes, or an output laid out otherwise: compute the change, cast, add
        change = hidden @ up_t if delta.linear else (hidden.movedim(1, -1) @ up_t).movedim(-1, 1)
        out.add_(change.to(out.dtype), alpha=alpha)


class _Stacked:
    """Gated adapters whose low-rank changes run stacked along the rank at each layer, over the
    runs of rows that carry any of them.

    Their factors are concatenated (cached while the set of adapters stays), and each adapter's
    multiplier on each row (its gate, or 0 where it is off) multiplies its own part of the rank-space
    hidden: sum_i m_i * up_i(down_i(x)) = up_cat(m * down_cat(x)), since a multiplier is one
    number per row and position and up is 1 x 1. So a layer takes two matmuls for all of them
    instead of two per adapter, plus a multiply and an add of the output's size each.
    """

    def __init__(self, groups: dict[int, _Group], cache: dict):
        self.groups = groups
        self.indices = tuple(sorted(groups))
        # The runtime's cache: layer splits and stacked factors outlive the block, for one set of
        # stacked adapters at a time (a pool's top-k changes it; old sets are not kept), so its
        # keys need not name the set.
        if cache.get("stacked adapters") != self.indices:
            cache.clear()
            cache["stacked adapters"] = self.indices
        self._cache = cache
        self._scales: dict[tuple, Tensor] = {}  # this block's, per layer kind and resolution
        rows = sorted({row for group in groups.values() for row in group.indices})
        start, stop = rows[0], rows[-1] + 1
        self.rows = slice(start, stop)
        # Runs of consecutive rows that carry a stacked adapter (offsets into rows): a row between
        # them that carries none is left untouched, not given up(0 * down(x)).
        self.runs = [(run.start - start, run.stop - start) for run, _ in _runs(rows, [0.0] * len(rows))]
        self.multipliers: dict[int, RowGates] = {}
        for index, group in groups.items():
            per_row: list = [0.0] * (stop - start)
            for row, scale in zip(group.indices, group.scales, strict=True):
                per_row[row - start] = scale
            self.multipliers[index] = RowGates(per_row)

    def apply(self, name: str, deltas: list[tuple[int, _Delta]], x: Tensor, output: Tensor) -> list:
        """Adds the stacked adapters' changes to ``output``; returns the (index, delta) pairs of this
        layer left for their own groups."""
        taken, rest, context = self._split(name, deltas)
        if not taken:
            return rest
        rows = self.rows
        if rows.start == 0 and rows.stop == x.shape[0]:  # a gated step's rows: the whole batch
            xs, out = x, output
        else:
            xs, out = x[rows], output[rows]
        down, up_t, stacking = self._factors(name, taken, x.device, x.dtype)
        linear = taken[0][1].linear
        scale = self._hidden_scale(name, stacking, out.shape, context, linear, x.device, x.dtype)
        if len(self.runs) == 1:
            add_low_rank(taken[0][1], xs, down, up_t, out, hidden_scale=scale)
            return rest
        for a, b in self.runs:
            add_low_rank(taken[0][1], xs[a:b], down, up_t, out[a:b], hidden_scale=scale[a:b])
        return rest

    def _split(self, name: str, deltas: list[tuple[int, _Delta]]) -> tuple[list, list, bool]:
        """This layer's fusable deltas of the stacked adapters (sharing one down shape), the rest,
        and whether the layer's input has no position."""
        key = ("split", name)
        if key not in self._cache:
            fusable = [(i, d) for i, d in deltas if i in self.groups and d.fusable]
            shape = fusable[0][1].update.down.shape[1:] if fusable else None
            taken = [(i, d) for i, d in fusable if d.update.down.shape[1:] == shape]
            rest = [(i, d) for i, d in deltas if all(d is not t for _, t in taken)]
            self._cache[key] = (taken, rest, is_context_layer(name))
        return self._cache[key]

    def _factors(self, name: str, taken: list, device, dtype) -> tuple[Tensor, Tensor, tuple[int, ...]]:
        key = ("factors", name, device, dtype)
        if key not in self._cache:
            factors = [d.low_rank(device, dtype) for _, d in taken]
            down = torch.cat([f[0] for f in factors])
            up_t = torch.cat([f[1] for f in factors])
            # the adapters and their ranks: what a gate expanded over the rank depends on
            stacking = (tuple(i for i, _ in taken), tuple(f[0].shape[0] for f in factors))
            self._cache[key] = (down, up_t, stacking)
        return self._cache[key]

    def _hidden_scale(self, name, stacking, shape, context: bool, linear: bool, device, dtype) -> Tensor:
        """Each adapter's multiplier at this layer, repeated over its rank: (R, sum r, h, w) for a conv,
        (R, T, sum r) for tokens, broadcastable ones for layers without position. Computed once
        per block for each kind of layer and resolution."""
        if context or len(shape) < 3:
            key = (stacking, linear, device, dtype, "context", len(shape))
        else:
            key = (stacking, linear, device, dtype, *shape[1 if linear else 2 : -1 if linear else None])
        if key not in self._scales:
            axis = -1 if linear else 1
            gates = [self.multipliers[i].multiplier(name, shape, device, dtype) for i in stacking[0]]
            common = list(torch.broadcast_shapes(*(g.shape for g in gates)))
            expanded = []
            for gate, rank in zip(gates, stacking[1], strict=True):
                common[axis] = rank
                expanded.append(gate.expand(common))
            self._scales[key] = torch.cat(expanded, dim=axis)
        return self._scales[key]
