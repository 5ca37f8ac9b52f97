"""LoRAtorio for hosts that hand over batches of labelled cond/uncond rows.

WebUIs call the model on CFG batches: A1111's CFG denoiser (cond rows first, AND sub-prompts as
extra cond rows, uncond rows last, sometimes in separate calls) and Forge's model wrapper (uncond
and cond chunks, either order, possibly split). ``RowComposer`` takes one such call, the host's rows
each labelled with its branch and the image it belongs to, expands every row into the plan's rows
(base model + LoRAs), evaluates them all in one forward through the per-row runtime (``max_rows``
at a time), and returns each host row's composed prediction: e_c for a cond row, the re-centred
e_u for an uncond row. The host's own CFG, uncond + w (cond - uncond), then gives the method's
guided prediction, because guidance is linear in the two branches.

What outlives a call is kept here, explicitly: within a step, each image's cond weights, which
its uncond rows reuse (they may arrive in another call); across steps, each cond row's top-k set.
``reset`` starts a new sampling pass; ``forget_cond`` a new model evaluation of the same step
(second-order samplers evaluate twice a step). The method weighs an image's uncond rows with its
cond rows' weights, so a host that may send an uncond row before its image's cond rows (Forge,
short of memory) asks ``missing_cond`` first and, when it says so, has the cond rows composed
before that call, passing their outputs back as ``known`` to any later call that holds them.
An uncond row whose image's cond rows were never seen this step is an error, not a guess.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .config import LoRAtorioConfig
from .gating import GateState, split_gate_state, stack_gate_states
from .lora.runtime import LoRARuntime, evaluate_entries, take_rows
from .step import COND, UNCOND, Adapter, CondResult, StepComposer

Convert = Callable[[Tensor, Mapping[str, object]], Tensor]


@dataclass(frozen=True)
class RowLabel:
    """A host row: its branch (``cond`` or ``uncond``) and the image of the batch it serves."""

    branch: str
    sample: int


class RowComposer:
    """Composes LoRAs over a host's labelled rows. See the module docstring.

    config, adapters: the method's settings and the LoRAs (index i = the runtime's adapter i).
    runtime: the per-row LoRA runtime on the host's model (attached by the host), or None when
    the forward applies adapters itself.
    named: bool (N, S), the LoRAs each of the host's S images asks for (``relevance.
    named_by_prompts``), or (N, 1) for every image alike, which a top-k selection keeps first;
    None: the intrinsic score alone.
    """

    def __init__(
        self,
        config: LoRAtorioConfig,
        adapters: Sequence[Adapter | tuple[str, float]],
        runtime: LoRARuntime | None = None,
        *,
        max_rows: int | None = None,
        record_weights: bool = False,
        named: Tensor | None = None,
    ):
        self.composer = StepComposer(config)
        self.adapters = [Adapter(*a) for a in adapters]
        shape_ok = named is None or (named.dim() == 2 and len(named) == len(adapters))
        if named is not None and (named.dtype != torch.bool or not shape_ok):
            raise ValueError(
                f"named must be a bool (N, images) mask over the {len(adapters)} adapters; got "
                f"{named.dtype} of shape {tuple(named.shape)}"
            )
        self.named = named
        self.runtime = runtime
        self.max_rows = max_rows
        self.record_weights = record_weights
        self.reset()

    def forget_cond(self) -> None:
        """A new model evaluation begins (second-order samplers evaluate twice a step): the cond
        weights of the previous one no longer apply to its uncond rows."""
        self._cond_of_sample = {}

    def missing_cond(self, labels: Sequence[RowLabel], step: int) -> bool:
        """Whether a call with these rows holds uncond rows whose re-centring needs cond weights
        that neither an earlier call of this step nor this call's own cond rows provide."""
        config = self.composer.config
        if config.mode != "loratorio" or config.recenter == 1.0:
            return False  # the uncond branch is the base model's or a baseline's: no weights needed
        uncond_samples = [label.sample for label in labels if label.branch == UNCOND]
        gates = self._uncond_gates(uncond_samples, step) if uncond_samples else None
        if gates is not None and gates.ready and not config.is_exact_step(step):
            return False  # a gated step: the uncond row is gated by an earlier exact step's maps
        seen = set(self._cond_of_sample) if step == self._step else set()
        seen |= {label.sample for label in labels if label.branch == COND}
        return any(label.branch == UNCOND and label.sample not in seen for label in labels)

    def reset(self) -> None:
        """Forget everything: a new sampling pass (hires, next batch) starts here."""
        self._step: int | None = None
        # image -> (sum of its cond rows' weights, how many rows, union of their kept sets, sum of
        # their LoRA changes when the uncond reuses them), this step
        self._cond_of_sample: dict[int, tuple[Tensor | None, int, Tensor | None, Tensor | None]] = {}
        self._kept_of_row: dict[tuple[int, int], Tensor] = {}
        self.weights: dict[int, dict[int, Tensor]] = {}  # step -> image -> (N, h, w), when recorded
        self.kept: dict[int, list[str]] = {}  # image -> names of the LoRAs its last step kept
        # gated steps (config.exact_every > 1): each cond row's GateState, the step it was made at,
        # and each image's uncond residual
        self._gate_of_row: dict[tuple[int, int], tuple[int, GateState]] = {}
        self._residual_uncond: dict[int, Tensor] = {}

    def __call__(
        self,
        forward: Callable[..., Tensor],
        inputs: Mapping[str, object],
        labels: Sequence[RowLabel],
        step: int,
        *,
        to_eps: Convert | None = None,
        from_eps: Convert | None = None,
        adapter_inputs: Mapping[int | None, Mapping[str, object]] | None = None,
        known: Mapping[int, Tensor] | None = None,
    ) -> Tensor:
        """Each host row's composed prediction, in the host's output space.

        forward(**inputs) evaluates rows: ``inputs`` holds the call's per-row tensors (nested
        dicts and lists allowed) with the rows on dimension 0; the host's rows are gathered from
        it for every plan entry. to_eps(output, inputs) / from_eps(eps, inputs) convert between
        the forward's output and noise predictions (identity when the forward returns eps).
        adapter_inputs: what the rows of one adapter (key: its index) or of the base model (key:
        None) see instead of ``inputs``, for the same host rows; partial (e.g. only the
        conditioning, when each LoRA's text-encoder part encodes the prompt its own way). Rows
        with several adapters active (merge) keep ``inputs``.
        known: host rows whose composed output (in the forward's space) was made earlier this step
        (cond rows composed ahead of their uncond rows): returned as they are, not evaluated again.
        """
        rows = _rows(inputs)
        if len(labels) != rows:
            raise ValueError(f"labels has {len(labels)} entries for {rows} rows of inputs")
        if any(label.branch not in (COND, UNCOND) for label in labels):
            raise ValueError("every label's branch must be 'cond' or 'uncond'")
        if step != self._step:
            self._step, self._cond_of_sample = step, {}
        known = known or {}
        if self.missing_cond([label for r, label in enumerate(labels) if r not in known], step):
            raise RuntimeError(
                "LoRAtorio: an uncond row came before its image's cond rows; its re-centring needs their "
                "weights (the host must compose the cond rows first)"
            )
        if len(known) == rows:
            return torch.stack([known[r] for r in range(rows)])
        cond_rows = [r for r, label in enumerate(labels) if label.branch == COND and r not in known]
        uncond_rows = [r for r, label in enumerate(labels) if label.branch == UNCOND and r not in known]
        cond_keys = _cond_keys(labels, cond_rows)

        plan_c = plan_u = None
        entry_rows: list[Tensor] = []
        entry_adapters: list = []
        if cond_rows:
            kept = self._kept_for(cond_keys)
            plan_c = self.composer.plan(
                step,
                self.adapters,
                batch_size=len(cond_rows),
                cfg=False,
                kept=kept,
                named=self._named_of([labels[r].sample for r in cond_rows]),
                gates=self._cond_gates(cond_keys),
            )
            entry_rows.append(torch.tensor(cond_rows)[plan_c.sample_index])
            entry_adapters += plan_c.entry_adapters
        if uncond_rows:
            samples = [labels[r].sample for r in uncond_rows]
            kept = self._uncond_kept(samples, step)
            plan_u = self.composer.plan(
                step,
                self.adapters,
                batch_size=len(uncond_rows),
                cfg=True,
                kept=kept,
                reselect=False if kept is not None else None,
                named=self._named_of(samples),
                gates=self._uncond_gates(samples, step),
            )
            first = plan_u.num_cond_entries
            entry_rows.append(torch.tensor(uncond_rows)[plan_u.sample_index[first:]])
            entry_adapters += plan_u.entry_adapters[first:]

        index = torch.cat(entry_rows)
        gathered = take_rows(inputs, index)
        if adapter_inputs:
            keys = [a[0][0] if len(a) == 1 else (None if not a else "shared") for a in entry_adapters]
            for key in set(keys) & set(adapter_inputs):
                rows_of_key = torch.tensor([r for r, k in enumerate(keys) if k == key])
                _assign(gathered, rows_of_key, take_rows(adapter_inputs[key], index[rows_of_key]))
        output = evaluate_entries(forward, self.runtime, entry_adapters, gathered, max_rows=self.max_rows)
        eps = to_eps(output, gathered) if to_eps is not None else output
        composed = eps.new_empty((rows, *eps.shape[1:]))

        split = plan_c.num_cond_entries if plan_c is not None else 0
        if plan_c is not None:
            cond = self.composer.combine_cond(plan_c, eps[:split])
            self._remember_cond(cond, plan_c.evaluated, cond_rows, cond_keys, labels, step)
            if cond.gates is not None:
                for key, state in zip(cond_keys, split_gate_state(cond.gates), strict=True):
                    self._gate_of_row[key] = (step, state)
            composed[cond_rows] = cond.cond.to(composed.dtype)
        if plan_u is not None:
            uncond_eps = eps[split:]
            weights_up = self._uncond_weights(plan_u, [labels[r].sample for r in uncond_rows])
            change = self._uncond_change(plan_u, [labels[r].sample for r in uncond_rows])
            uncond = self.composer.combine_uncond(
                plan_u, uncond_eps, CondResult(None, None, None, None, weights_up, change=change)
            )
            composed[uncond_rows] = uncond.to(composed.dtype)
            residual = self.composer.residual_uncond(plan_u, uncond_eps, uncond)
            if residual is not None:
                for k, r in enumerate(uncond_rows):
                    self._residual_uncond[labels[r].sample] = residual[k : k + 1]
        if from_eps is not None:
            composed = from_eps(composed, take_rows(inputs, torch.arange(rows)))
        for r, output in known.items():
            composed[r] = output.to(composed)
        return composed

    # --- state -------------------------------------------------------------------------------------

    def _named_of(self, samples: list[int]) -> Tensor | None:
        """(N, rows) the named mask of each row's image."""
        if self.named is None:
            return None
        if self.named.shape[1] == 1:
            return self.named.expand(-1, len(samples))
        if max(samples) >= self.named.shape[1]:
            raise ValueError(f"named covers {self.named.shape[1]} images; a row is of image {max(samples)}")
        return self.named[:, samples]

    def _cond_gates(self, keys: list[tuple[int, int]]) -> GateState | None:
        """The gate state of these cond rows (None until each has one: the step is exact)."""
        if not self.composer.config.gated or not all(k in self._gate_of_row for k in keys):
            return None
        return stack_gate_states([self._gate_of_row[k][1] for k in keys])

    def _uncond_gates(self, samples: list[int], step: int) -> GateState | None:
        """The gate state of these images' uncond rows: their first cond row's, with the maps its
        residual was measured with when this step's cond rows already came (the uncond residual is
        measured with the same gates) and the image's own uncond residual. None: an exact step."""
        if not self.composer.config.gated:
            return None
        states = []
        for sample in samples:
            made = self._gate_of_row.get((sample, 0))
            if made is None:
                return None
            made_at, state = made
            latest = state.gates if made_at == step and state.gates is not None else state.latest
            states.append(
                GateState(latest, state.gates, state.residual_cond, self._residual_uncond.get(sample))
            )
        return stack_gate_states(states)

    def _kept_for(self, keys: list[tuple[int, int]]) -> Tensor | None:
        if self.composer.config.top_k is None or not all(k in self._kept_of_row for k in keys):
            return None
        return torch.stack([self._kept_of_row[k] for k in keys], dim=1)

    def _uncond_kept(self, samples: list[int], step: int) -> Tensor | None:
        """The top-k set an image's uncond rows use: what its cond rows kept this step (an
        earlier call), else, on a step that does not reselect, what they kept last step; None
        (the uncond rows see the whole pool) when the set is being chosen right now."""
        config = self.composer.config
        if config.top_k is None or config.mode != "loratorio" or config.recenter == 1.0:
            return None
        sets = []
        for sample in samples:
            if sample in self._cond_of_sample:
                sets.append(self._cond_of_sample[sample][2])
                continue
            previous = [kept for (s, _), kept in self._kept_of_row.items() if s == sample]
            if step % config.reselect_every == 0 or not previous:
                return None
            sets.append(torch.stack(previous).any(0))
        return torch.stack(sets, dim=1)

    def _remember_cond(self, cond: CondResult, evaluated, cond_rows, cond_keys, labels, step) -> None:
        n = len(self.adapters)
        full = None
        config = self.composer.config
        if cond.weights_up is not None and config.recenter < 1.0 and not config.reuses_cond_change:
            # Only a re-centred uncond that evaluates the LoRAs reads them: (N, R, 1, H, W), 0 where
            # an adapter took no part.
            full = cond.weights_up.new_zeros((n, *cond.weights_up.shape[1:]))
            full[list(evaluated)] = cond.weights_up
        for k, key in enumerate(cond_keys):
            if cond.kept is not None:
                self._kept_of_row[key] = cond.kept[:, k].cpu()
        by_sample: dict[int, list[int]] = {}
        for k, r in enumerate(cond_rows):
            by_sample.setdefault(labels[r].sample, []).append(k)
        names = [a.name for a in self.adapters]
        for sample, ks in by_sample.items():
            # AND sub-prompts: the image's uncond rows take the mean of its cond rows' weights, over
            # every call of the step that brought some of them (a host may split them over calls).
            weights = full[:, ks].sum(1) if full is not None else None
            kept = cond.kept[:, ks].any(1).cpu() if cond.kept is not None else None
            change = cond.change[ks].sum(0) if cond.change is not None else None
            count = len(ks)
            if sample in self._cond_of_sample:
                total, count_before, kept_before, change_before = self._cond_of_sample[sample]
                weights = total + weights if weights is not None else None
                kept = kept | kept_before if kept is not None else None
                change = change + change_before if change is not None else None
                count += count_before
            self._cond_of_sample[sample] = (weights, count, kept, change)
            if kept is not None:
                self.kept[sample] = [names[i] for i in range(n) if bool(kept[i])]
            if self.record_weights and cond.weights is not None:
                self.weights.setdefault(step, {})[sample] = cond.weights[:, ks[0]].float().cpu()

    def _uncond_weights(self, plan_u, samples: list[int]) -> Tensor | None:
        config = self.composer.config
        if config.mode != "loratorio" or config.recenter == 1.0 or not plan_u.evaluated:
            return None  # no re-centring to weigh: the uncond is the base's or a baseline's
        if config.reuses_cond_change:
            return None  # the re-centred uncond adds the cond's LoRA change: no weights to apply
        # missing_cond was checked on entry: every image's cond weights are known this step
        stored = [self._cond_of_sample[s][0] / self._cond_of_sample[s][1] for s in samples]
        return torch.stack(stored, dim=1)[list(plan_u.evaluated)]

    def _uncond_change(self, plan_u, samples: list[int]) -> Tensor | None:
        """(rows, C, H, W) each uncond row's image's LoRA change, the mean over its cond rows (AND
        sub-prompts), when the re-centred uncond reuses it; else None."""
        if not self.composer.config.reuses_cond_change or plan_u.gated:
            # gated step: its uncond row is gated, with the residual of an exact step
            return None
        return torch.stack([self._cond_of_sample[s][3] / self._cond_of_sample[s][1] for s in samples])


def _cond_keys(labels: Sequence[RowLabel], cond_rows: list[int]) -> list[tuple[int, int]]:
    """(image, j): the j-th cond row of an image (AND sub-prompts), stable across steps."""
    seen: dict[int, int] = {}
    keys = []
    for r in cond_rows:
        sample = labels[r].sample
        keys.append((sample, seen.get(sample, 0)))
        seen[sample] = seen.get(sample, 0) + 1
    return keys


def _rows(inputs: Mapping[str, object]) -> int:
    for value in inputs.values():
        if isinstance(value, Tensor):
            return value.shape[0]
        if isinstance(value, Mapping):
            return _rows(value)
        if isinstance(value, (list, tuple)) and value:
            return _rows({"_": value[0]})
    raise ValueError("inputs holds no tensor with the rows on dimension 0")



def _assign(target, rows: Tensor, values) -> None:
    """target[rows] = values, in place, through the nested structure ``values`` has (a part of
    ``target``'s)."""
    if isinstance(values, Tensor):
        target[rows.to(target.device)] = values.to(target)
    elif isinstance(values, Mapping):
        for key, item in values.items():
            _assign(target[key], rows, item)
    elif isinstance(values, (list, tuple)):
        for part, item in zip(target, values, strict=True):
            _assign(part, rows, item)
