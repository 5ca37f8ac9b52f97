"""One denoising step as plan -> the host evaluates rows -> combine.

A host (a WebUI, diffusers, any sampler) never re-implements the method. Each step it asks
``StepComposer.plan`` which model rows to evaluate, evaluates them (in one batch or in chunks:
its choice), and hands the predictions to ``StepComposer.combine``, which returns the guided noise
prediction and diagnostics.

A *row* is one model evaluation: a set of (adapter, scale) to activate (the empty set is the base
model) on the cond or the uncond branch, for some samples of the batch (all of them, except on
top-k steps between reselections, where a LoRA is evaluated only for the samples that keep it).
The host evaluates the plan's *entries*, the (row, sample) pairs in row order: entry e takes
sample ``plan.sample_index[e]``'s latent, the conditioning ``plan.conditioning_index[e]`` of
``cat([cond, uncond])`` and the adapters ``plan.entry_adapters[e]``, and the predictions come back
stacked as (E, C, H, W) in the same order. Cond rows always come before uncond rows.

The only thing that outlives a step is the top-k kept set: ``combine`` returns it
(``StepResult.kept``) and the host passes it to the next ``plan`` (``kept=``). Nothing is hidden
in the composer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch
from torch import Tensor

from .config import LoRAtorioConfig
from .gating import GateState
from .guidance import guided, recentered_uncond, reused_uncond
from .lora.gates import Gate
from .weighting import (
    compose,
    mean_divergence,
    patch_cosine_similarity,
    patch_grid,
    patch_weights,
    select_top_k,
    upsample_weights,
)

COND = "cond"
UNCOND = "uncond"
BASE = "base"
MERGED = "merged"
GATED = "gated"


class Adapter(NamedTuple):
    """A LoRA taking part in a step, at the scale (multiplier) the user gave it."""

    name: str
    scale: float = 1.0


@dataclass(frozen=True)
class Row:
    """One model evaluation for each of ``samples``.

    adapters: (adapter index, scale) pairs active on this row; () is the base model.
    branch: ``cond`` or ``uncond``.
    samples: the batch samples (ascending) this row is evaluated for.
    gate_factor: None for a plain row; on a gated step's gated row, what multiplies the plan's
        gates (1 on the cond row, 1 - lam on the uncond row): its entries carry ``Gate``s.
    """

    adapters: tuple[tuple[int, float], ...]
    branch: str
    samples: tuple[int, ...]
    gate_factor: float | None = None


@dataclass(frozen=True, eq=False)
class StepPlan:
    """What to evaluate this step, and what ``combine`` needs to read it back.

    rows: the rows, cond rows first. evaluated: adapters evaluated alone this step (loratorio,
    composite, switch), in adapter order. selecting: this step's ``combine`` makes a top-k
    selection. kept: bool (N, B) top-k set in force on a step between selections, else None.
    named: bool (N, B) the LoRAs the prompt names, which a top-k selection keeps first; or None.
    gates: float (N, B, 1, H, W) the gates of the plan's gated rows (which their entries carry
    as ``Gate``s), or None when it has none. gate_state: the ``GateState`` the plan was made
    with (``gates=``), or None. gated: a gated step (only gated rows, and the base uncond at
    lam = 1); an exact step may hold gated rows too, to measure the residual (``gating``).
    """

    config: LoRAtorioConfig
    step: int
    adapters: tuple[Adapter, ...]
    batch_size: int
    cfg: bool
    rows: tuple[Row, ...]
    evaluated: tuple[int, ...]
    selecting: bool
    kept: Tensor | None
    named: Tensor | None
    _row_of: dict[tuple[str, object], int] = field(repr=False)
    _offsets: tuple[int, ...] = field(repr=False)
    gates: Tensor | None = field(default=None, repr=False)
    gate_state: GateState | None = field(default=None, repr=False)
    gated: bool = False

    @property
    def num_entries(self) -> int:
        """E: how many (row, sample) evaluations the host makes this step."""
        return self._offsets[-1]

    @property
    def sample_index(self) -> Tensor:
        """(E,) long: the batch sample each entry evaluates (index into x of shape (B, ...))."""
        return torch.tensor([s for row in self.rows for s in row.samples], dtype=torch.long)

    @property
    def conditioning_index(self) -> Tensor:
        """(E,) long: each entry's row of ``cat([cond, uncond])`` (2B rows)."""
        b = self.batch_size
        return torch.tensor(
            [s + (b if row.branch == UNCOND else 0) for row in self.rows for s in row.samples],
            dtype=torch.long,
        )

    @property
    def entry_adapters(self) -> tuple[tuple[tuple[int, float | Gate], ...], ...]:
        """(adapter index, scale) pairs active on each entry; on a gated row the scale is a
        ``Gate`` (the scale times the entry's sample's weight map, per position)."""
        out = []
        for row in self.rows:
            if row.gate_factor is None:
                out += [row.adapters] * len(row.samples)
                continue
            for s in row.samples:
                out.append(tuple(self._gate(i, scale, row.gate_factor, s) for i, scale in row.adapters))
        return tuple(out)

    def _gate(self, adapter: int, scale: float, factor: float, sample: int) -> tuple[int, Gate]:
        gate_map = self.gates[adapter, sample, 0]
        context = scale * factor
        if self.config.gate_context == "mean":
            context *= float(gate_map.float().mean())
        return adapter, Gate(scale * factor, gate_map, context)

    @property
    def num_cond_entries(self) -> int:
        """The cond entries come first: entries [0, num_cond_entries) are cond, the rest uncond."""
        first_uncond = next((r for r, row in enumerate(self.rows) if row.branch == UNCOND), len(self.rows))
        return self._offsets[first_uncond]

    def row_slice(self, row: int) -> slice:
        """The entries of one row."""
        return slice(self._offsets[row], self._offsets[row + 1])


@dataclass(frozen=True, eq=False)
class StepResult:
    """The composed prediction of one step, and what it was made of.

    eps: (B, C, H, W) the guided noise prediction (cond alone without CFG).
    cond, uncond: the composed branches before guidance (uncond None without CFG).
    weights: float (N, B, h, w) each adapter's patch weights (0 where it took no part);
        None for merge, whose adapters act together on one model.
    kept: bool (N, B) the top-k set after this step (pass it to the next ``plan``); None
        without top-k.
    divergence: float (N, B) mean over patches of 1 - cosine similarity to the base; NaN where
        an adapter was not evaluated for a sample; None where the mode has no base row.
    gates: with gated steps on (``config.gated``), the ``GateState`` the next steps need (pass
        it to the next ``plan`` as ``gates=``); None otherwise. A gated step has no weights of its
        own (``weights`` None: the maps users see are the exact steps').
    """

    eps: Tensor
    cond: Tensor
    uncond: Tensor | None
    weights: Tensor | None
    kept: Tensor | None
    divergence: Tensor | None
    gates: GateState | None = None


@dataclass(frozen=True, eq=False)
class CondResult:
    """The cond branch of a step, which the uncond branch reuses (``combine_uncond``).

    cond: (B, C, H, W) the composed cond prediction. weights, kept, divergence: as in
    ``StepResult``. weights_up: (U, B, 1, H, W) the pixel weights of ``plan.evaluated``
    (LoRAtorio mode; None otherwise). gates: as in ``StepResult``. change: (B, C, H, W) the
    composed LoRAs' change of the prediction, cond - base cond, in float32 or wider, when the
    uncond branch reuses it (``uncond_loras="reuse"``, lam < 1); else None.
    """

    cond: Tensor
    weights: Tensor | None
    kept: Tensor | None
    divergence: Tensor | None
    weights_up: Tensor | None = None
    gates: GateState | None = None
    change: Tensor | None = None


class StepComposer:
    """Plans and combines the rows of a step for one ``LoRAtorioConfig``."""

    def __init__(self, config: LoRAtorioConfig | None = None) -> None:
        self.config = config if config is not None else LoRAtorioConfig()

    def plan(
        self,
        step: int,
        adapters: Sequence[Adapter | tuple[str, float]],
        *,
        batch_size: int = 1,
        cfg: bool = True,
        kept: Tensor | None = None,
        reselect: bool | None = None,
        named: Tensor | None = None,
        gates: GateState | None = None,
    ) -> StepPlan:
        """The rows to evaluate at ``step`` (0-based sampler step; second-order samplers
        plan the same step twice).

        adapters: the LoRAs, in prompt order, with their scales. cfg: False for guidance
        scale 1 or guidance-distilled models: no uncond rows at all. kept: the previous step's
        ``StepResult.kept`` when top-k is on (None starts a new selection). reselect: None lets
        the schedule decide; False keeps ``kept`` even on a selection step (the uncond rows of a
        step whose cond rows already selected, in another call). named: bool (N,) or (N, B), the
        LoRAs the prompt names (``relevance.tag_relevance`` > ``relevance.NAMED``): a top-k
        selection keeps them before any other, and ranks within both groups by divergence.
        gates: the previous step's ``StepResult.gates`` (with ``config.gated``): a step that the
        schedule does not make exact is then a gated step, once an exact step measured its
        residual (``gating``); None makes the step exact.
        """
        cfg_ = self.config
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an integer >= 0; got {step!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1; got {batch_size!r}")
        specs = tuple(_adapter(a, i) for i, a in enumerate(adapters))
        n = len(specs)
        named = _named_mask(named, n, batch_size)
        state = gates.check(n, batch_size) if (n and cfg_.gated and gates is not None) else None
        if state is not None and state.ready and not cfg_.is_exact_step(step):
            return _gated_plan(cfg_, step, specs, batch_size, cfg, state, kept)
        everyone = tuple(range(batch_size))
        recentred = cfg and cfg_.recenter < 1.0
        uncond_loras = recentred and not cfg_.reuses_cond_change
        selecting = False
        kept_now = None
        samples_of = {i: everyone for i in range(n)}

        if n == 0:
            cond_keys, uncond_keys = [BASE], [BASE] if cfg else []
        elif cfg_.mode == "merge":
            cond_keys, uncond_keys = [MERGED], [MERGED] if cfg else []
        elif cfg_.mode == "switch":
            active = (step // cfg_.switch_every) % n
            cond_keys, uncond_keys = [active], [active] if cfg else []
        elif cfg_.mode == "composite":
            cond_keys, uncond_keys = list(range(n)), list(range(n)) if cfg else []
        else:
            evaluated = list(range(n))
            if cfg_.top_k is not None:
                if cfg_.top_k > n:
                    raise ValueError(
                        f"top_k ({cfg_.top_k}) is larger than the number of adapters ({n}): "
                        f"lower top_k or add LoRAs to the pool"
                    )
                if named is not None and bool((named.sum(0) == cfg_.top_k).all()):
                    # The prompt names exactly k LoRAs for every sample: they are the selection,
                    # and the rest of the pool need never be evaluated.
                    kept_now, selecting = named, False
                else:
                    kept_now, selecting = _schedule_top_k(cfg_, step, n, batch_size, kept, reselect)
                if kept_now is not None:
                    evaluated = [i for i in range(n) if bool(kept_now[i].any())]
                    samples_of = {
                        i: tuple(int(s) for s in kept_now[i].nonzero().flatten()) for i in evaluated
                    }
            cond_keys = [BASE, *evaluated]
            uncond_keys = ([BASE] + (evaluated if uncond_loras else [])) if cfg else []
            if cfg_.gated and not cfg_.is_exact_step(step + 1):
                # The next step is gated: measure its residual with the gates it will use.
                cond_keys.append(GATED)
                uncond_keys += [GATED] if recentred else []

        rows: list[Row] = []
        row_of: dict[tuple[str, object], int] = {}
        for branch, keys in ((COND, cond_keys), (UNCOND, uncond_keys)):
            for key in keys:
                row_of[(branch, key)] = len(rows)
                if key == BASE:
                    rows.append(Row((), branch, everyone))
                elif key == MERGED:
                    rows.append(Row(tuple((i, a.scale) for i, a in enumerate(specs)), branch, everyone))
                elif key == GATED:
                    active = tuple((i, specs[i].scale) for i in evaluated)
                    factor = 1.0 if branch == COND else 1.0 - cfg_.recenter
                    rows.append(Row(active, branch, everyone, factor))
                else:
                    rows.append(Row(((key, specs[key].scale),), branch, samples_of[key]))
        offsets = [0]
        for row in rows:
            offsets.append(offsets[-1] + len(row.samples))
        evaluated_alone = tuple(k for k in cond_keys if isinstance(k, int))
        return StepPlan(
            config=cfg_,
            step=step,
            adapters=specs,
            batch_size=batch_size,
            cfg=cfg,
            rows=tuple(rows),
            evaluated=evaluated_alone,
            selecting=selecting,
            kept=kept_now,
            named=named,
            _row_of=row_of,
            _offsets=tuple(offsets),
            gates=_residual_gates(cfg_, state, n, batch_size) if GATED in cond_keys else None,
            gate_state=state,
        )

    def combine(self, plan: StepPlan, predictions: Tensor, guidance_scale: float | None = None) -> StepResult:
        """The guided noise prediction from the plan's evaluated entries.

        predictions: (E, C, H, W) noise predictions, one per entry in plan order.
        guidance_scale: the CFG scale; required when the plan has uncond rows, and must be
        None (or 1) when it has none.
        """
        self._check(plan, predictions, plan.num_entries, "E", "entries")
        if plan.cfg and guidance_scale is None:
            raise ValueError("guidance_scale is required: the plan has uncond rows (cfg=True)")
        if not plan.cfg and guidance_scale not in (None, 1, 1.0):
            raise ValueError(
                f"guidance_scale must be None or 1 for a plan without uncond rows (cfg=False); "
                f"got {guidance_scale!r}: plan with cfg=True to guide"
            )
        split = plan.num_cond_entries
        cond = self.combine_cond(plan, predictions[:split])
        if not plan.cfg:
            return StepResult(
                cond.cond, cond.cond, None, cond.weights, cond.kept, cond.divergence, cond.gates
            )
        uncond = self.combine_uncond(plan, predictions[split:], cond)
        eps = guided(cond.cond, uncond, float(guidance_scale))
        gates = self.uncond_residual(plan, predictions[split:], uncond, cond.gates)
        return StepResult(eps, cond.cond, uncond, cond.weights, cond.kept, cond.divergence, gates)

    def combine_cond(self, plan: StepPlan, predictions: Tensor) -> CondResult:
        """The cond branch alone, for hosts whose cond and uncond rows arrive in separate calls.

        predictions: (E_c, C, H, W), the plan's first ``num_cond_entries`` entries.
        """
        self._check(plan, predictions, plan.num_cond_entries, "E_c", "cond entries")
        read = _Reader(plan, predictions, 0)
        if not plan.adapters:
            return CondResult(read.one(COND, BASE), _empty_weights(plan, read), None, None)
        if plan.gated:
            state = plan.gate_state
            return CondResult(read.one(COND, GATED) + state.residual_cond, None, plan.kept, None, None, state)
        mode = plan.config.mode
        if mode == "merge":
            return CondResult(read.one(COND, MERGED), None, None, None)
        if mode == "switch":
            return CondResult(read.one(COND, plan.evaluated[0]), _one_hot(plan, read), None, None)
        if mode == "composite":
            n = len(plan.adapters)
            grid = patch_grid(read.size, plan.config.patch_size_for(read.size))
            uniform = torch.full((n, plan.batch_size, *grid), 1.0 / n, device=predictions.device)
            return CondResult(_mean(read.stack(COND, range(n))), uniform, None, None)
        return _loratorio_cond(plan, read)

    def combine_uncond(self, plan: StepPlan, predictions: Tensor, cond: CondResult) -> Tensor:
        """The uncond branch, with the weights the cond branch of the same step computed.

        predictions: (E - E_c, C, H, W), the plan's entries after its cond entries. -> (B, C, H, W).
        """
        if not plan.cfg:
            raise ValueError("the plan has no uncond rows (cfg=False)")
        self._check(plan, predictions, plan.num_entries - plan.num_cond_entries, "E_u", "uncond entries")
        read = _Reader(plan, predictions, plan.num_cond_entries)
        if not plan.adapters:
            return read.one(UNCOND, BASE)
        if plan.gated:
            if plan.config.recenter == 1.0:
                return read.one(UNCOND, BASE)
            residual = plan.gate_state.residual_uncond
            # None only where no exact step evaluated this image's uncond rows (a host skipping them)
            return read.one(UNCOND, GATED) + (residual if residual is not None else 0.0)
        mode = plan.config.mode
        if mode == "merge":
            return read.one(UNCOND, MERGED)
        if mode == "switch":
            return read.one(UNCOND, plan.evaluated[0])
        if mode == "composite":
            return _mean(read.stack(UNCOND, range(len(plan.adapters))))
        config = plan.config
        if config.reuses_cond_change:
            if cond.change is None:
                raise ValueError(
                    "uncond_loras='reuse' needs the cond branch's LoRA change (CondResult.change): "
                    "combine the cond rows of this step first"
                )
            return reused_uncond(read.one(UNCOND, BASE), cond.change, config.recenter)
        lora_uncond = read.stack(UNCOND, plan.evaluated) if config.recenter < 1.0 else None
        return recentered_uncond(read.one(UNCOND, BASE), lora_uncond, cond.weights_up, config.recenter)

    def uncond_residual(
        self, plan: StepPlan, predictions: Tensor, uncond: Tensor, state: GateState | None
    ) -> GateState | None:
        """``state`` (the cond branch's ``CondResult.gates``) with the uncond residual of an exact
        step that evaluated gated uncond rows: ``uncond`` (B, C, H, W), the composed uncond branch,
        minus their prediction. For hosts that call ``combine_uncond`` themselves.

        predictions: (E - E_c, C, H, W), the plan's uncond entries."""
        residual = self.residual_uncond(plan, predictions, uncond)
        if state is None or residual is None:
            return state
        return replace(state, residual_uncond=residual)

    def residual_uncond(self, plan: StepPlan, predictions: Tensor, uncond: Tensor) -> Tensor | None:
        """(B, C, H, W) the composed uncond branch minus the gated uncond rows' prediction, on an
        exact step that evaluated gated uncond rows; None on any other step.

        predictions: (E - E_c, C, H, W), the plan's uncond entries."""
        if plan.gated or (UNCOND, GATED) not in plan._row_of:
            return None
        return uncond - _Reader(plan, predictions, plan.num_cond_entries).one(UNCOND, GATED)

    def _check(self, plan: StepPlan, predictions: Tensor, count: int, symbol: str, what: str) -> None:
        if plan.config != self.config:
            raise ValueError("plan was made by a StepComposer with another config")
        if predictions.dim() != 4 or predictions.shape[0] != count:
            raise ValueError(
                f"predictions must be ({symbol}, C, H, W) with {symbol} = {count} {what} of the "
                f"plan; got shape {tuple(predictions.shape)}"
            )


def _adapter(spec: Adapter | tuple[str, float], index: int) -> Adapter:
    try:
        name, scale = spec
    except (TypeError, ValueError):
        raise ValueError(
            f"adapters[{index}] must be an Adapter(name, scale) or a (name, scale) pair; got {spec!r}"
        ) from None
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"adapters[{index}] ({name!r}) has a scale that is not a finite number: {scale!r}")
    return Adapter(str(name), float(scale))


def _named_mask(named: Tensor | None, n: int, batch_size: int) -> Tensor | None:
    """The prompt-named LoRAs as a bool (N, B) mask on the CPU, or None."""
    if named is None:
        return None
    named = torch.as_tensor(named).detach().to("cpu")
    if named.dtype != torch.bool or tuple(named.shape) not in ((n,), (n, batch_size)):
        raise ValueError(
            f"named must be a bool (N,) or (N, B) = {(n, batch_size)} mask of the adapters the prompt "
            f"names; got {named.dtype} of shape {tuple(named.shape)}"
        )
    return named.reshape(n, -1).expand(n, batch_size).clone()


def _schedule_top_k(
    config: LoRAtorioConfig, step: int, n: int, batch_size: int, kept: Tensor | None, reselect: bool | None
) -> tuple[Tensor | None, bool]:
    """(kept set in force, whether this step selects). A selection needs the whole pool."""
    if config.top_k == n:
        return torch.ones(n, batch_size, dtype=torch.bool), False
    if reselect is False and kept is None:
        raise ValueError("reselect=False needs kept: the set the cond rows of this step selected")
    if kept is None or (reselect is not False and (reselect or step % config.reselect_every == 0)):
        return None, True
    kept = kept.detach().to("cpu")
    if kept.dtype != torch.bool or tuple(kept.shape) != (n, batch_size):
        raise ValueError(
            f"kept must be the bool (N, B) = {(n, batch_size)} set of the previous step's "
            f"StepResult.kept; got {kept.dtype} of shape {tuple(kept.shape)} "
            f"(pass kept=None after the adapters or the batch changed)"
        )
    if not bool(kept.any(dim=0).all()):
        raise ValueError("kept must keep at least one LoRA for every sample")
    return kept, False


def _gated_plan(
    config: LoRAtorioConfig,
    step: int,
    specs: tuple[Adapter, ...],
    batch_size: int,
    cfg: bool,
    state: GateState,
    kept: Tensor | None,
) -> StepPlan:
    """A gated step: one cond row with every (kept) LoRA active and gated by ``state.gates``;
    with CFG one uncond row, the base's at lam = 1, else the gated row at gates x (1 - lam) (the
    linearised lam * base + (1 - lam) * LoRAs of the re-centred uncond, in one row). ``combine``
    adds the residuals the last exact step measured."""
    everyone = tuple(range(batch_size))
    if kept is not None:
        kept = kept.detach().to("cpu")
    active = tuple((i, a.scale) for i, a in enumerate(specs) if kept is None or bool(kept[i].any()))
    rows = [Row(active, COND, everyone, 1.0)]
    row_of: dict[tuple[str, object], int] = {(COND, GATED): 0}
    if cfg:
        if config.recenter == 1.0:
            rows.append(Row((), UNCOND, everyone))
            row_of[(UNCOND, BASE)] = 1
        else:
            rows.append(Row(active, UNCOND, everyone, 1.0 - config.recenter))
            row_of[(UNCOND, GATED)] = 1
    offsets = tuple(batch_size * r for r in range(len(rows) + 1))
    return StepPlan(
        config=config,
        step=step,
        adapters=specs,
        batch_size=batch_size,
        cfg=cfg,
        rows=tuple(rows),
        evaluated=(),
        selecting=False,
        kept=kept,
        named=None,
        _row_of=row_of,
        _offsets=offsets,
        gates=state.gates,
        gate_state=state,
        gated=True,
    )


class _Reader:
    """Reads the rows of a plan back out of the stacked (E, C, H, W) predictions."""

    def __init__(self, plan: StepPlan, predictions: Tensor, offset: int) -> None:
        self.plan = plan
        self.predictions = predictions
        self.offset = offset  # the plan entry that predictions[0] holds
        self.size = tuple(predictions.shape[2:])

    def entries(self, row: int) -> slice:
        whole = self.plan.row_slice(row)
        return slice(whole.start - self.offset, whole.stop - self.offset)

    def one(self, branch: str, key: object) -> Tensor:
        """(B, C, H, W) of a row that covers every sample."""
        return self.predictions[self.entries(self.plan._row_of[(branch, key)])]

    def stack(self, branch: str, adapters: Sequence[int]) -> Tensor:
        """(U, B, C, H, W) of the adapters' rows; zeros where a row skips a sample."""
        plan, b = self.plan, self.plan.batch_size
        rows = [plan._row_of[(branch, i)] for i in adapters]
        first, last = self.entries(rows[0]).start, self.entries(rows[-1]).stop
        if rows == list(range(rows[0], rows[0] + len(rows))) and last - first == len(rows) * b:
            # Consecutive full rows: a view, no copy.
            return self.predictions[first:last].unflatten(0, (len(rows), b))
        out = self.predictions.new_zeros((len(rows), b, *self.predictions.shape[1:]))
        for u, r in enumerate(rows):
            samples = torch.tensor(plan.rows[r].samples, device=out.device)
            out[u].index_copy_(0, samples, self.predictions[self.entries(r)])
        return out


def _loratorio_cond(plan: StepPlan, read: _Reader) -> CondResult:
    config, n, b = plan.config, len(plan.adapters), plan.batch_size
    used = list(plan.evaluated)
    base_cond = read.one(COND, BASE)
    lora_cond = read.stack(COND, used)
    patch_size = config.patch_size_for(read.size)
    similarity = patch_cosine_similarity(lora_cond, base_cond, patch_size)
    if plan.selecting:
        keep = select_top_k(similarity, config.top_k, None if plan.named is None else plan.named[used])
    elif plan.kept is not None and not bool(plan.kept[used].all()):
        keep = plan.kept[used]
    else:
        keep = None
    weights = patch_weights(similarity, config.weighting, config.temperature, keep)
    weights_up = upsample_weights(weights, read.size, patch_size, config.upsample)
    cond = compose(lora_cond, weights_up)

    device = similarity.device
    index = torch.tensor(used, device=device)
    all_weights = weights.new_zeros((n, b, *weights.shape[2:])).index_copy_(0, index, weights)
    divergence = mean_divergence(similarity)
    if plan.kept is not None and not plan.selecting:
        # Adapters skipped for a sample were not evaluated there: no divergence to report.
        divergence = divergence.masked_fill(~plan.kept[used].to(device), math.nan)
    all_divergence = divergence.new_full((n, b), math.nan).index_copy_(0, index, divergence)
    kept = None
    if config.top_k is not None:
        in_force = keep if keep is not None else torch.ones(len(used), b, dtype=torch.bool)
        kept = torch.zeros(n, b, dtype=torch.bool, device=device).index_copy_(0, index, in_force.to(device))
    change = None
    if config.reuses_cond_change:
        exact = torch.promote_types(cond.dtype, torch.float32)
        change = cond.to(exact) - base_cond.to(exact)
    gates = _next_gate_state(plan, read, cond, weights_up)
    return CondResult(cond, all_weights, kept, all_divergence, weights_up, gates, change)


def _residual_gates(config: LoRAtorioConfig, state: GateState | None, n: int, batch_size: int) -> Tensor:
    """The gates an exact step measures the residual with: the newest weight maps, or uniform
    (N, B, 1, 1, 1) ones at the first exact step."""
    if state is not None:
        return state.latest
    return torch.full((n, batch_size, 1, 1, 1), 0.0 if config.gate_maps == "zero" else 1.0 / n)


def _next_gate_state(plan: StepPlan, read: _Reader, cond: Tensor, weights_up: Tensor) -> GateState | None:
    """After an exact step: the newest weight maps, and the cond residual when the plan measured
    one (its gated cond row; the uncond residual follows in ``uncond_residual``)."""
    if not plan.config.gated:
        return None
    # weights_up: (U, B, 1, H, W) of plan.evaluated
    index = torch.tensor(plan.evaluated, device=weights_up.device)
    maps = weights_up
    if plan.config.gate_maps == "winner":
        maps = torch.zeros_like(weights_up).scatter_(0, weights_up.argmax(0, keepdim=True), 1.0)
    elif plan.config.gate_maps == "zero":
        maps = torch.zeros_like(weights_up)
    latest = maps.new_zeros((len(plan.adapters), *maps.shape[1:])).index_copy_(0, index, maps)
    if plan.gates is None:  # no gated rows: only the newest maps change
        if plan.gate_state is None:
            return GateState(latest)
        return plan.gate_state.with_latest(latest)
    residual = cond - read.one(COND, GATED)
    # The uncond residual is measured anew (uncond_residual), or None at lam = 1.
    return GateState(latest, plan.gates, residual, None)


def _mean(stack: Tensor) -> Tensor:
    return stack.to(torch.promote_types(stack.dtype, torch.float32)).mean(0).to(stack.dtype)


def _empty_weights(plan: StepPlan, read: _Reader) -> Tensor:
    grid = patch_grid(read.size, plan.config.patch_size_for(read.size))
    return torch.zeros((0, plan.batch_size, *grid), device=read.predictions.device)


def _one_hot(plan: StepPlan, read: _Reader) -> Tensor:
    grid = patch_grid(read.size, plan.config.patch_size_for(read.size))
    weights = torch.zeros((len(plan.adapters), plan.batch_size, *grid), device=read.predictions.device)
    weights[plan.evaluated[0]] = 1.0
    return weights
