"""Which intrinsic per-LoRA score picks the prompt's LoRAs out of a pool? (issue 12, point 6)

    python benchmarks/selection.py                       # both benchmarks, all 120 dev sets, 4 steps
    python benchmarks/selection.py --benchmark pixelworld --limit 24 --steps 2   # a quick look

With all 11 LoRAs of a synthetic benchmark loaded as the pool, every candidate score ranks the 11
LoRAs for a dev set's prompt (one seed); the score's top-N (N = the set's size) is compared with
the set. Reported per candidate, per N and on average over N (the mean of the N columns, as
``quality.py`` averages): ``exact``, the share of images whose top-N is exactly the set (chance
1/C(11, N): 0.018 at N = 2), and ``recall``, the mean share of the set's LoRAs in the top-N.
Only the DEV halves are used (selection rules are chosen here; the test halves stay held out).

UNet scores are measured along the BASE model's own CFG trajectory (the same for every LoRA,
independent of any selection): at each of the first ``--steps`` DDIM steps of the benchmark's
20, every job evaluates 2 + 2 x 11 rows at the base latent (the base and each LoRA alone, cond and
uncond, at the benchmark's LoRA scale), in one UNet forward through one ``LoRARuntime``.
Divergences are per patch of side 1 (the shipped 1/16 of these latents' side), 1 - cosine.

Candidates (``CANDIDATES``):
- ``a cond div @1``: today's rule (``weighting.mean_divergence``): mean over patches of the
  cond divergence eps_i(c) vs eps_0(c), first step;
- ``b cond div @K``: the same averaged over the first K steps of the base trajectory;
- ``c patch-max @1`` / ``@K``: the per-patch maximum of the cond divergence instead of the mean;
- ``d cond-uncond @1`` / ``@K``: mean cond divergence minus mean uncond divergence
  (eps_i(u) vs eps_0(u)): what the prompt adds to the LoRA's effect;
- ``d2 guidance div @K``: mean divergence of the guidance direction, eps_i(c) - eps_i(u) vs
  eps_0(c) - eps_0(u);
- ``f norm ratio @K``: ||eps_i(c) - eps_0(c)|| / ||eps_i(u) - eps_0(u)|| over the image;
- ``d ratio cond/uncond @1`` / ``@K``: mean cond divergence over mean uncond divergence;
- ``f attn-out ratio @1``: the change of each attn2 layer's output (to_k and to_v deltas, base
  queries) over the base output's norm, prompt context over empty context;
- ``f attn gain @1`` / ``pool-rel``: the largest attention mass a prompt word gains from the
  LoRA's to_k delta (base queries), raw or minus the pool's mean gain for that word;
- ``f attention shift @1``: with the base's cross-attention queries of the first step, the
  total-variation change of each attn2 layer's attention over the context tokens when the LoRA's
  to_k delta is added to the keys, prompt context over empty context (one base pass, no LoRA pass);
- ``e text ratio``: NO UNet evaluation. Each LoRA's attn2.to_k / to_v deltas applied to the
  encoded prompt tokens: max over the prompt's words of sqrt(sum over layers ||dW x||^2), over the
  same max over the empty prompt's tokens (a LoRA trained behind a trigger word answers it);
- ``e text / vocab``: the same prompt maximum over the median response to every vocabulary word
  encoded alone;
- ``e text relative``: max over the prompt's words of ||dW x|| / ||W x|| (layers pooled), over
  the same for the empty prompt;
- ``e text pool-rel``: max over the prompt's words of the LoRA's response to the word over the
  pool's mean response to it (a trigger moves its own LoRA, a generic word moves them all);
- ``e text vocab+pool``: the same after dividing each LoRA's responses by its median response to
  the vocabulary (both normalisations: per LoRA, then per token across the pool).

Measured (all 120 dev sets of each, K = 4, 166 s on 2 shared CPU cores): every UNet score picks
the exact set in at most 0.02 of images on average (today's rule 0.02 / 0.00); the best is
``e text vocab+pool`` with no UNet pass, 0.71 on the first benchmark and 0.27 on the pixel world
(recall 0.92 / 0.74), whose contextual text encoder blurs the trigger tokens. Not above 0.5 on
both, so no selection rule changes; the tag prior (``relevance.py``) stays the fix.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quality import BENCHMARKS, benchmark, pool_of, selected_sets  # noqa: E402

from loratorio_core.lora.runtime import LoRARuntime  # noqa: E402
from loratorio_core.synthetic.sampler import (  # noqa: E402
    Job,
    ddim_step,
    ddim_timesteps,
    eps_from_prediction,
    initial_noise,
)
from loratorio_core.weighting import patch_cosine_similarity  # noqa: E402

PATCH = 1
CANDIDATES = (
    "a cond div @1",
    "b cond div @K",
    "c patch-max @1",
    "c patch-max @K",
    "d cond-uncond @1",
    "d cond-uncond @K",
    "d2 guidance div @K",
    "f norm ratio @K",
    "d ratio cond/uncond @1",
    "d ratio cond/uncond @K",
    "f attention shift @1",
    "f attn-out ratio @1",
    "f attn gain @1",
    "f attn gain pool-rel @1",
    "e text ratio",
    "e text / vocab",
    "e text relative",
    "e text pool-rel",
    "e text vocab+pool",
)
CONTEXT_LAYERS = ("attn2.to_k", "attn2.to_v")


# --- UNet scores along the base trajectory ------------------------------------------------------


def step_measures(eps: Tensor, jobs: int, pool: int) -> dict[str, Tensor]:
    """eps (J * (2 + 2M), C, H, W), each job's rows as [base c, base u, M LoRAs c, M LoRAs u]
    -> per measure (M, J): this step's per-LoRA numbers."""
    rows = eps.reshape(jobs, 2 + 2 * pool, *eps.shape[1:])
    base_c, base_u = rows[:, 0], rows[:, 1]
    lora_c, lora_u = rows[:, 2 : 2 + pool].transpose(0, 1), rows[:, 2 + pool :].transpose(0, 1)
    div_c = 1 - patch_cosine_similarity(lora_c, base_c, PATCH)
    div_u = 1 - patch_cosine_similarity(lora_u, base_u, PATCH)
    div_g = 1 - patch_cosine_similarity(lora_c - lora_u, base_c - base_u, PATCH)
    norm_c = (lora_c - base_c).flatten(2).norm(dim=2)
    norm_u = (lora_u - base_u).flatten(2).norm(dim=2)
    return {
        "cond": div_c.mean((2, 3)),
        "max": div_c.amax((2, 3)),
        "uncond": div_u.mean((2, 3)),
        "cond-uncond": div_c.mean((2, 3)) - div_u.mean((2, 3)),
        "guidance": div_g.mean((2, 3)),
        "norm ratio": norm_c / norm_u.clamp_min(1e-12),
    }


class QueryRecorder:
    """Records the base cond rows' cross-attention queries (attn2.to_q outputs) of one forward."""

    def __init__(self, unet: torch.nn.Module, rows: Tensor):
        self.rows, self.queries, self.handles = rows, {}, []
        for name, module in unet.named_modules():
            if name.endswith("attn2"):
                self.handles.append(module.to_q.register_forward_hook(self._hook(name, module)))

    def _hook(self, name: str, attention: torch.nn.Module):
        def hook(module, args, output):
            self.queries[name] = (attention, output[self.rows].detach())

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def attention_effects(queries: dict, loras: list[dict], context: Tensor, scale: float) -> dict[str, Tensor]:
    """What each LoRA's attn2 to_k / to_v deltas change in the base's cross-attention over
    ``context`` (J, T, D), with the base's queries (``QueryRecorder``), averaged over the attn2
    layers: ``tv`` (M, J) the total-variation distance between the attention distributions (to_k
    delta only), mean over heads and query positions; ``gain`` (M, J, T) the attention mass each
    token gains (mean over heads and queries); ``out`` (M, J) the norm of the attention output's
    change (to_k and to_v deltas) over the base output's norm."""
    m, (j, t, _) = len(loras), context.shape
    effects = {"tv": torch.zeros(m, j), "gain": torch.zeros(m, j, t), "out": torch.zeros(m, j)}
    for name, (attention, q) in queries.items():
        heads = attention.heads
        qh = q.unflatten(-1, (heads, -1)).transpose(1, 2)  # (J, heads, L, d)
        keys, values = attention.to_k(context), attention.to_v(context)
        base = _attention(qh, keys, heads)
        base_out = base @ _heads(values, heads)
        for i, layers in enumerate(loras):
            delta_k, delta_v = (
                _context_delta(layers.get(f"{name}.{which}"), getattr(attention, which), context, scale)
                for which in ("to_k", "to_v")
            )
            shifted = _attention(qh, keys + delta_k, heads)
            effects["tv"][i] += 0.5 * (shifted - base).abs().sum(-1).mean((1, 2))
            effects["gain"][i] += (shifted - base).mean((1, 2))
            out = shifted @ _heads(values + delta_v, heads)
            effects["out"][i] += (out - base_out).flatten(1).norm(dim=1) / base_out.flatten(1).norm(dim=1)
    return {key: value / max(len(queries), 1) for key, value in effects.items()}


def _context_delta(update, layer: torch.nn.Module, context: Tensor, scale: float) -> Tensor:
    if update is None:
        return torch.zeros(())
    return scale * context @ update.delta_weight(layer.weight.shape).T


def _heads(x: Tensor, heads: int) -> Tensor:
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def _attention(qh: Tensor, keys: Tensor, heads: int) -> Tensor:
    return torch.softmax(qh @ _heads(keys, heads).transpose(-1, -2) / qh.shape[-1] ** 0.5, dim=-1)


def unet_scores(bench: ModuleType, model, jobs: list[Job], steps: int, chunk: int = 8) -> dict[str, Tensor]:
    """Per UNet candidate, (M, J) scores of the pool's M LoRAs for every job (one seed each)."""
    pool = pool_of(bench)
    loras = [model.loras[n] for n in pool]
    runtime = LoRARuntime(model.unet, loras)
    parts: list[dict[str, Tensor]] = []
    with runtime, torch.no_grad():
        for start in range(0, len(jobs), chunk):
            parts.append(_chunk_scores(bench, model, runtime, loras, jobs[start : start + chunk], steps))
    return {key: torch.cat([p[key] for p in parts], dim=1) for key in parts[0]}


def _chunk_scores(bench, model, runtime, loras, jobs: list[Job], steps: int) -> dict[str, Tensor]:
    m, j = len(loras), len(jobs)
    x = torch.stack([initial_noise(job.seeds[0], model.latent_shape) for job in jobs])
    cond = model.encode_text([job.prompt for job in jobs])
    uncond = model.encode_text([[]]).expand_as(cond)
    context = torch.cat([torch.stack([c, u] + [c] * m + [u] * m) for c, u in zip(cond, uncond, strict=True)])
    adapters = [(), ()] + [((i, bench.LORA_SCALE),) for i in range(m)] * 2
    row_adapters = adapters * j
    alphas = model.alphas_cumprod
    times = ddim_timesteps(bench.STEPS, len(alphas))
    per_step: list[dict[str, Tensor]] = []
    attention: dict[str, Tensor] = {}
    for step, t in enumerate(times[:steps]):
        a = alphas[t]
        x_rows = x.repeat_interleave(2 + 2 * m, dim=0)
        recorder = QueryRecorder(model.unet, torch.arange(j) * (2 + 2 * m)) if step == 0 else None
        with runtime.rows(row_adapters):
            output = model.unet(x_rows, torch.full((x_rows.shape[0],), t), context)
        if recorder is not None:
            recorder.remove()
            attention = attention_scores(recorder.queries, loras, cond, uncond, jobs, bench.LORA_SCALE)
        eps = eps_from_prediction(model.prediction, output, x_rows, a)
        per_step.append(step_measures(eps, j, m))
        base = eps.reshape(j, 2 + 2 * m, *eps.shape[1:])
        guided = base[:, 1] + bench.GUIDANCE * (base[:, 0] - base[:, 1])
        a_prev = alphas[times[step + 1]] if step + 1 < len(times) else torch.tensor(1.0)
        x = ddim_step(x, guided, a, a_prev)
    mean = {key: torch.stack([s[key] for s in per_step]).mean(0) for key in per_step[0]}
    first = per_step[0]
    return {
        "a cond div @1": first["cond"],
        "b cond div @K": mean["cond"],
        "c patch-max @1": first["max"],
        "c patch-max @K": mean["max"],
        "d cond-uncond @1": first["cond-uncond"],
        "d cond-uncond @K": mean["cond-uncond"],
        "d2 guidance div @K": mean["guidance"],
        "f norm ratio @K": mean["norm ratio"],
        "d ratio cond/uncond @1": first["cond"] / first["uncond"].clamp_min(1e-12),
        "d ratio cond/uncond @K": mean["cond"] / mean["uncond"].clamp_min(1e-12),
        **attention,
    }


def attention_scores(queries, loras, cond: Tensor, uncond: Tensor, jobs: list[Job], scale) -> dict:
    """The attention candidates (M, J) from the first step's base queries."""
    on_c = attention_effects(queries, loras, cond, scale)
    on_u = attention_effects(queries, loras, uncond, scale)
    real = prompt_tokens(jobs, cond.shape[1])
    gain = on_c["gain"]  # (M, J, T)
    return {
        "f attention shift @1": on_c["tv"] / on_u["tv"].clamp_min(1e-12),
        "f attn-out ratio @1": on_c["out"] / on_u["out"].clamp_min(1e-12),
        "f attn gain @1": gain.masked_fill(~real, -1.0).amax(2),
        "f attn gain pool-rel @1": (gain - gain.mean(0, keepdim=True)).masked_fill(~real, -1.0).amax(2),
    }


def prompt_tokens(jobs: list[Job], length: int) -> Tensor:
    """(J, T) bool: the positions of each prompt's words (not its padding)."""
    return torch.stack([torch.arange(length) < len(job.prompt) for job in jobs])


# --- text-token scores (no UNet) -----------------------------------------------------------------


def context_deltas(model, layers: dict, scale: float) -> tuple[list[Tensor], list[Tensor]]:
    """A LoRA's attn2.to_k / to_v weight deltas (out, D) at ``scale`` and the base weights."""
    modules = dict(model.unet.named_modules())
    names = sorted(n for n in layers if n.endswith(CONTEXT_LAYERS))
    deltas = [scale * layers[n].delta_weight(modules[n].weight.shape) for n in names]
    return deltas, [modules[n].weight.float() for n in names]


def token_response(tokens: Tensor, deltas: list[Tensor], weights: list[Tensor] | None = None) -> Tensor:
    """tokens (..., D) -> (...): sqrt(sum over layers ||dW x||^2), over sqrt(sum ||W x||^2) when
    ``weights`` (the base layers) are given."""
    change = sum((tokens @ d.T).pow(2).sum(-1) for d in deltas).sqrt()
    if weights is None:
        return change
    return change / sum((tokens @ w.T).pow(2).sum(-1) for w in weights).sqrt().clamp_min(1e-12)


def text_scores(bench: ModuleType, model, jobs: list[Job]) -> dict[str, Tensor]:
    """Per text candidate, (M, J) scores from the encoded prompts alone (no UNet evaluation)."""
    pool = pool_of(bench)
    with torch.no_grad():
        cond = model.encode_text([job.prompt for job in jobs])  # (J, T, D)
        uncond = model.encode_text([[]])[0]  # (T, D)
        vocabulary = [w for w in bench.DEFINITION.world.VOCABULARY[1:]]
        words = model.encode_text([[w] for w in vocabulary])[:, 0]  # (V, D)
    real = prompt_tokens(jobs, cond.shape[1])
    scores = {name: torch.zeros(len(pool), len(jobs)) for name in CANDIDATES if name.startswith("e ")}
    per_token, vocabulary_medians = [], []
    for i, name in enumerate(pool):
        deltas, weights = context_deltas(model, model.loras[name], bench.LORA_SCALE)
        per_token.append(token_response(cond, deltas))
        on_prompt = per_token[-1].masked_fill(~real, 0).amax(1)
        scores["e text ratio"][i] = on_prompt / token_response(uncond, deltas).amax()
        vocabulary_medians.append(token_response(words, deltas).median())
        scores["e text / vocab"][i] = on_prompt / vocabulary_medians[-1]
        relative = token_response(cond, deltas, weights).masked_fill(~real, 0).amax(1)
        scores["e text relative"][i] = relative / token_response(uncond, deltas, weights).amax()
    responses = torch.stack(per_token)  # (M, J, T)
    scores["e text pool-rel"] = pool_relative(responses).masked_fill(~real, 0).amax(2)
    by_vocabulary = responses / torch.stack(vocabulary_medians)[:, None, None]
    scores["e text vocab+pool"] = pool_relative(by_vocabulary).masked_fill(~real, 0).amax(2)
    return scores


def pool_relative(responses: Tensor) -> Tensor:
    """(M, ...) each LoRA's response over the pool's mean response to the same token."""
    return responses / responses.mean(0, keepdim=True).clamp_min(1e-12)


# --- accuracy and the table ----------------------------------------------------------------------


def accuracy(scores: Tensor, pool: Sequence[str], sets: Sequence[tuple[str, ...]]) -> dict[int, tuple]:
    """scores (M, J) -> {N: (exact-set accuracy, mean recall)} of each job's top-N."""
    hits: dict[int, list[tuple[float, float]]] = {}
    for j, wanted in enumerate(sets):
        n = len(wanted)
        top = {pool[i] for i in torch.topk(scores[:, j].double(), n).indices.tolist()}
        found = len(top & set(wanted)) / n
        hits.setdefault(n, []).append((float(found == 1.0), found))
    return {n: tuple(sum(v) / len(v) for v in zip(*h, strict=True)) for n, h in sorted(hits.items())}


def summary(per_n: dict[int, tuple[float, float]]) -> tuple[float, float]:
    """(exact, recall) averaged over the N columns."""
    values = list(per_n.values())
    return sum(v[0] for v in values) / len(values), sum(v[1] for v in values) / len(values)


def measure(name: str, limit: int | None, steps: int) -> tuple[dict[str, dict], float]:
    """One benchmark: {candidate: {N: (exact, recall)}} on its dev sets, and the seconds taken."""
    began = time.perf_counter()
    bench = benchmark(name)
    sets = selected_sets(bench, "dev", limit)
    jobs = bench.jobs_for(sets, 1)
    model = bench.load_model()
    scores = {**unet_scores(bench, model, jobs, steps), **text_scores(bench, model, jobs)}
    pool = pool_of(bench)
    return {c: accuracy(scores[c], pool, sets) for c in CANDIDATES}, time.perf_counter() - began


def table(results: dict[str, dict[str, dict]], ns: Sequence[int] = (2, 3, 4, 5)) -> str:
    """One row per candidate; per benchmark exact-set accuracy per N, its average and the mean
    recall; the last column averages the benchmarks' exact averages."""
    names = list(results)
    head = f"{'candidate':24}" + "".join(
        f" | {name[:10]:>10}" + "".join(f" {'N=' + str(n):>5}" for n in ns) + f" {'avg':>5} {'rec':>5}"
        for name in names
    )
    head += " | both"
    lines = [head, "-" * len(head)]
    for candidate in CANDIDATES:
        line, averages = f"{candidate:24}", []
        for name in names:
            per_n = results[name][candidate]
            exact, recall = summary(per_n)
            averages.append(exact)
            cells = "".join(f" {per_n[n][0]:5.2f}" if n in per_n else f" {'-':>5}" for n in ns)
            line += f" | {'':>10}{cells} {exact:5.2f} {recall:5.2f}"
        lines.append(line + f" | {sum(averages) / len(averages):4.2f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--benchmark", default="all", help=f"all, or one of {', '.join(BENCHMARKS)}")
    parser.add_argument("--limit", type=int, default=None, help="dev sets, spread over N (default: 120)")
    parser.add_argument("--steps", type=int, default=4, help="K: base-trajectory steps the @K scores average")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    names = list(BENCHMARKS) if args.benchmark == "all" else [args.benchmark]
    began = time.perf_counter()
    results, seconds = {}, {}
    for name in names:
        results[name], seconds[name] = measure(name, args.limit, args.steps)
    sets = "all 120" if args.limit is None else f"{args.limit}"
    print(
        f"LoRA selection from the pool of 11, top-k = N, dev half ({sets} sets a benchmark, 1 seed, "
        f"K = {args.steps} of 20 DDIM steps on the base trajectory); exact-set accuracy (chance 0.018 "
        f"at N=2), avg over N, rec = mean recall"
    )
    print(table(results))
    timing = ", ".join(f"{name} {s:.0f} s" for name, s in seconds.items())
    print(f"took {time.perf_counter() - began:.0f} s ({timing})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
