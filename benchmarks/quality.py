"""Composition quality on the synthetic ComposLoRA (offline, CPU): every method, every N.

    python benchmarks/quality.py                 # the test halves, 12 sets of each N, 2 seeds (README)
    python benchmarks/quality.py --per-n 0 --seeds 1 --gated   # every test set, gated rows too
    python benchmarks/quality.py --sets dev --limit 8 --steps 4   # a quick look

For each composition set (2-5 LoRAs, one character) and seed, each method generates an image
from the same starting noise and prompt; the detectors say which of the set's concepts are in it.
Reported per N and on average over N (the mean of the four N columns, as the paper averages):

- all: the rate of images with every element of the set present, with a 95% bootstrap interval
  (sets resampled within each N), and LoRAtorio's defaults minus each other method per N, paired
  on the same sets and seeds (the test of "better than": a set's difficulty cancels out);
- recall per category: how often a concept of that category is found where the set has one;
- gt-rmse: the image-quality proxy, the RMSE (pixels in [0, 1]) between the image and the
  nearest rendering of the intended scene over every layout (figure jitter, object corner). It
  measures how far the picture is from a clean, on-distribution rendering of what was asked:
  0 is a perfect picture; blends, smears and missing or extra elements all raise it;
- rows: UNet rows evaluated per image (summed over steps): the cost.

Methods: the base model alone (the prompt's trigger tokens still move it), merge, switch,
composite, LoRAtorio (lam = 0.5 and 1) with the set's LoRAs; the ablations (uniform weights and
winner-take-all, both with the re-centred uncond: what the patch weighting adds); each weighting
rule at its dev-chosen temperature; and dynamic selection: all 11 LoRAs loaded as the pool,
top-k = N by the intrinsic score alone or with the prompt's tags first, against merging all 11.
``win`` is the mean weight of the winning LoRA per patch and step (``1/N`` for uniform weights).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loratorio_core.config import LoRAtorioConfig  # noqa: E402
from loratorio_core.lora import read_metadata, tag_frequencies  # noqa: E402
from loratorio_core.relevance import NAMED, tag_relevance  # noqa: E402
from loratorio_core.synthetic.sampler import Job  # noqa: E402

# The synthetic benchmarks, by the name --benchmark takes: each module is a
# ``loratorio_core.synthetic.interface`` benchmark (sets, jobs, model, sampler, detectors).
BENCHMARKS = {
    "composlora": "loratorio_core.synthetic.benchmark",
    "pixelworld": "loratorio_core.pixelworld.benchmark",
}
SHORT = {"character": "char", "clothing": "cloth", "background": "bg", "object": "obj", "style": "style"}
DEFAULTS_LABEL = "LoRAtorio (defaults)"
PATCH_FRACTION = 1 / 16  # of the latent's side: d = 4 on SD1.5's 64x64 latent, 1 on a 16x16 one


def benchmark(name: str) -> ModuleType:
    """The benchmark module called ``name`` (a key of ``BENCHMARKS``)."""
    if name not in BENCHMARKS:
        raise SystemExit(f"quality: unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
    return importlib.import_module(BENCHMARKS[name])


def patch_size_of(bench: ModuleType, fraction: float = PATCH_FRACTION) -> int:
    """The patch side in the benchmark's latent pixels for a fraction of its latent side."""
    return max(1, round(bench.LATENT_SIDE * fraction))


@dataclass(frozen=True)
class Method:
    """A row of the table: a config, and whether it gets the whole pool instead of the set.

    pool: None (the set's LoRAs), ``all`` (every LoRA, merged or all composed), ``divergence``
    (top-k = N by the intrinsic score alone) or ``tags`` (top-k = N, the LoRAs whose training
    tags the prompt names first, as a host with the LoRAs' metadata does)."""

    label: str
    config: LoRAtorioConfig
    pool: str | None = None
    base: bool = False


# Each weighting rule's temperature, chosen on the dev halves of both benchmarks
# (benchmarks/sweep.py); softmin is the paper's rule, the reference.
RULE_TEMPERATURES = {
    "softmin": 1.0,
    "spread": 4.0,
    "median": 10.0,
    "power": 5.0,
    "rank": 4.0,
    "contrast": 3.0,
}


def methods(patch_size: int = 1, gated: bool = False) -> list[Method]:
    """The table's rows at the benchmark's patch side: the baselines, LoRAtorio at the shipped
    defaults and at lam = 1, the ablations, every other weighting rule at its temperature, the
    pool rows, and with ``gated`` the gated single pass at several K."""
    default = LoRAtorioConfig(patch_size=patch_size)
    rules = [
        Method(f"rule {rule} tau={tau:g}", default.replace(weighting=rule, temperature=tau))
        for rule, tau in RULE_TEMPERATURES.items()
        if (rule, tau) != (default.weighting, default.temperature)  # that row is the default's
    ]
    return [
        Method("base alone", LoRAtorioConfig(mode="merge"), base=True),
        Method("merge", LoRAtorioConfig(mode="merge")),
        Method("switch", LoRAtorioConfig(mode="switch")),
        Method("composite", LoRAtorioConfig(mode="composite")),
        Method(DEFAULTS_LABEL, default),
        Method("LoRAtorio lam=1", default.replace(recenter=1.0)),
        # lam 0.5 at lam 1's rows: the uncond reuses the cond branch's LoRA change.
        Method("LoRAtorio uncond=reuse", default.replace(uncond_loras="reuse")),
        # What the patch weighting adds: the same re-centred guidance with uniform weights
        # (tau -> infinity) and with all weight on the most divergent LoRA (tau -> 0).
        Method("ablation: uniform", default.replace(weighting="softmin", temperature=1e9)),
        Method("ablation: winner-take-all", default.replace(weighting="softmin", temperature=1e-9)),
        *rules,
        Method("pool: merge all", LoRAtorioConfig(mode="merge"), pool="all"),
        Method("pool: top-k=N divergence", default, pool="divergence"),
        Method("pool: top-k=N tags", default, pool="tags"),
        *(gated_methods(default) if gated else []),
    ]


# The gated single pass (issue 13): K = exact_every at the default exact_first (3 exact steps).
GATED_EVERY = (2, 3, 4, 6)


def gated_methods(exact: LoRAtorioConfig) -> list[Method]:
    """LoRAtorio's gated single pass at several K; one exact step only then every 5th; at K = 3
    the other rule for layers without position, winner-take-all gates, and lam = 1; and at K = 2
    and 3 with the uncond reusing the cond's LoRA change."""
    out = [Method(f"gated K={k}", exact.replace(exact_every=k)) for k in GATED_EVERY]
    k3 = exact.replace(exact_every=3)
    out += [
        Method("gated M=1 K=5", exact.replace(exact_every=5, exact_first=1)),
        Method("gated K=3 ctx=mean", k3.replace(gate_context="mean")),
        Method("gated K=3 winner", k3.replace(gate_maps="winner")),
        Method("gated K=3 lam=1", k3.replace(recenter=1.0)),
        Method("gated K=2 reuse", exact.replace(exact_every=2, uncond_loras="reuse")),
        Method("gated K=3 reuse", k3.replace(uncond_loras="reuse")),
    ]
    return out


def pool_of(bench: ModuleType) -> tuple[str, ...]:
    return tuple(c.name for c in bench.CONCEPTS)


def pool_tags(bench: ModuleType) -> list[dict[str, int]]:
    """Each pool LoRA's training tags, from its file's ``ss_tag_frequency`` (read once a chunk)."""
    files = bench.lora_files()
    return [tag_frequencies(read_metadata(files[name])) for name in pool_of(bench)]


def named_by_prompt(bench: ModuleType, prompt: Sequence[str], tags: list[dict[str, int]]) -> tuple[str, ...]:
    """The pool's LoRAs whose training tags ``tags`` the prompt names, as a WebUI host computes it."""
    relevance = tag_relevance(" ".join(prompt), tags)
    return tuple(name for name, r in zip(pool_of(bench), relevance.tolist(), strict=True) if r > NAMED)


def jobs_of(bench: ModuleType, method: Method, part: list[Job]) -> list[Job]:
    """What ``method`` samples for the benchmark's jobs: the set, nothing, or the whole pool."""
    if method.base:
        return [Job((), j.prompt, j.seeds) for j in part]
    if method.pool is None:
        return part
    tags = pool_tags(bench) if method.pool == "tags" else None
    pool = pool_of(bench)
    return [
        Job(pool, j.prompt, j.seeds, named_by_prompt(bench, j.prompt, tags) if tags else None) for j in part
    ]


def run_method(bench: ModuleType, method: Method, jobs: list[Job], steps: int, chunk: int = 48) -> list[dict]:
    """Per image: the set, which of its concepts were found, its gt-rmse, cost in rows and
    winning weight."""
    model = bench.load_model()
    records = []
    for start in range(0, len(jobs), chunk):
        part = jobs[start : start + chunk]
        run = jobs_of(bench, method, part)
        config = method.config
        record = config.mode == "loratorio"
        images, rows, wins = [None] * len(part), [0.0] * len(part), [None] * len(part)
        # top-k = N differs per set: sample the chunk's jobs grouped by N.
        by_n: dict[int, list[int]] = {}
        for k, job in enumerate(part):
            by_n.setdefault(len(job.loras) if method.pool and record else 0, []).append(k)
        for n, members in by_n.items():
            group_config = config.replace(top_k=n) if n else config
            out = bench.sample(model, [run[k] for k in members], group_config, steps, record_weights=record)
            for i, k in enumerate(members):
                images[k], rows[k] = out.images[i], out.rows[i]
                wins[k] = winning_weight(out.weights[i]) if record else None
        for job, im, r, win in zip(part, images, rows, wins, strict=True):
            found = {c: bench.detect(c, im) for c in job.loras}
            errors = bench.gt_rmse(im, job)
            for s in range(len(job.seeds)):
                records.append(
                    {
                        "set": job.loras,
                        "found": {c: bool(f[s]) for c, f in found.items()},
                        "rmse": float(errors[s]),
                        "rows": r,
                        "win": None if win is None else float(win[s]),
                    }
                )
    return records


def winning_weight(weights: list[torch.Tensor]) -> torch.Tensor:
    """Per image (S,): the mean over steps and patches of the largest LoRA weight among the LoRAs
    that took part (1/N for uniform weights, 1 for winner-take-all): how much selection happens."""
    return torch.stack([w.amax(0).mean((1, 2)) for w in weights]).mean(0)


def _worker(args) -> tuple[str, list[dict], float]:
    bench_name, method, jobs, steps = args
    torch.set_num_threads(1)
    started = time.time()
    return method.label, run_method(benchmark(bench_name), method, jobs, steps), time.time() - started


def evaluate(
    bench_name: str, method_list: list[Method], jobs: list[Job], steps: int, workers: int
) -> dict[str, list[dict]]:
    """Every method's records; ``workers`` one-thread processes share the (method, chunk) tasks."""
    chunk = max(1, (len(jobs) + 1) // 2) if workers > 1 else len(jobs)
    tasks = [
        (bench_name, m, jobs[i : i + chunk], steps) for m in method_list for i in range(0, len(jobs), chunk)
    ]
    results: dict[str, list[dict]] = {m.label: [] for m in method_list}
    if workers > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            outputs = pool.map(_worker, tasks, chunksize=1)
    else:
        outputs = [_worker(t) for t in tasks]
    for label, records, _ in outputs:
        results[label] += records
    return results


def all_present(record: dict) -> float:
    return float(all(record["found"].values()))


def per_set_rates(records: list[dict]) -> dict[tuple, float]:
    """Each set's all-present rate over its seeds, in the records' order of sets."""
    grouped: dict[tuple, list[float]] = {}
    for r in records:
        grouped.setdefault(r["set"], []).append(all_present(r))
    return {key: sum(v) / len(v) for key, v in grouped.items()}


def summarize(bench: ModuleType, records: list[dict], boot: int = 1000, seed: int = 0) -> dict:
    """Per N and on average: all-present rate with a 95% bootstrap interval, recall per
    category, mean gt-rmse and rows per image."""
    sizes = sorted({len(r["set"]) for r in records})
    by_n = {n: [r for r in records if len(r["set"]) == n] for n in sizes}
    rate = {n: sum(map(all_present, rs)) / len(rs) for n, rs in by_n.items()}
    gen = torch.Generator().manual_seed(seed)
    draws = torch.zeros(boot)
    ci_n = {}
    for n, rs in by_n.items():
        # Resample sets (all seeds of a set together), within N.
        values = torch.tensor(list(per_set_rates(rs).values()))
        pick = torch.randint(0, len(values), (boot, len(values)), generator=gen)
        draws_n = values[pick].mean(1)
        ci_n[n] = (float(draws_n.quantile(0.025)), float(draws_n.quantile(0.975)))
        draws += draws_n / len(sizes)
    recall = {}
    category_of = {c.name: c.category for c in bench.CONCEPTS}
    for category in bench.CATEGORIES:
        hits = [f for r in records for c, f in r["found"].items() if category_of[c] == category]
        recall[category] = sum(hits) / len(hits) if hits else float("nan")
    return {
        "rate": rate,
        "avg": sum(rate.values()) / len(rate),
        "ci": (float(draws.quantile(0.025)), float(draws.quantile(0.975))),
        "ci_n": ci_n,
        "recall": recall,
        "rmse": sum(r["rmse"] for r in records) / len(records),
        "rows": sum(r["rows"] for r in records) / len(records),
        "win": _mean_or_nan([r["win"] for r in records if r.get("win") is not None]),
        "uniform": _mean_or_nan([1 / len(r["set"]) for r in records if r.get("win") is not None]),
    }


def paired_difference(
    records: list[dict], baseline: list[dict], boot: int = 1000, seed: int = 0
) -> dict[int, tuple[float, float, float]]:
    """Per N: the all-present rate of ``records`` minus ``baseline``'s on the same sets and seeds,
    with a 95% bootstrap interval resampling the sets (both methods' images of a set together):
    (difference, low, high). The paired test is tighter than comparing two intervals, because
    how hard a set is cancels out."""
    ours, theirs = per_set_rates(records), per_set_rates(baseline)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for n in sorted({len(key) for key in ours}):
        keys = [key for key in ours if len(key) == n and key in theirs]
        diffs = torch.tensor([ours[key] - theirs[key] for key in keys])
        draws = diffs[torch.randint(0, len(diffs), (boot, len(diffs)), generator=gen)].mean(1)
        out[n] = (float(diffs.mean()), float(draws.quantile(0.025)), float(draws.quantile(0.975)))
    return out


def _mean_or_nan(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def table(bench: ModuleType, results: dict[str, list[dict]]) -> str:
    sizes = sorted({len(r["set"]) for rs in results.values() for r in rs})
    head = (
        f"{'method':<24}"
        + "".join(f"{'N=' + str(n):>6}" for n in sizes)
        + f"{'avg [95% CI]':>20} | "
        + "".join(f"{SHORT[c]:>6}" for c in bench.CATEGORIES)
        + f" | {'gt-rmse':>7} {'rows':>6} {'win':>5} {'1/N':>5}"
    )
    lines = [head, "-" * len(head)]
    for label, records in results.items():
        s = summarize(bench, records)
        ci = f"{100 * s['avg']:.1f} [{100 * s['ci'][0]:.1f},{100 * s['ci'][1]:.1f}]"
        lines.append(
            f"{label:<24}"
            + "".join(f"{100 * s['rate'][n]:6.1f}" for n in sizes)
            + f"{ci:>20} | "
            + "".join(f"{100 * s['recall'][c]:6.1f}" for c in bench.CATEGORIES)
            + f" | {s['rmse']:7.3f} {s['rows']:6.0f} {_two(s['win'])} {_two(s['uniform'])}"
        )
    lines += [
        "",
        "95% intervals of all-present per N (sets resampled):",
        head[:24] + "".join(f"{'N=' + str(n):>14}" for n in sizes),
    ]
    for label, records in results.items():
        ci_n = summarize(bench, records)["ci_n"]
        cells = [f"[{100 * ci_n[n][0]:.0f},{100 * ci_n[n][1]:.0f}]" for n in sizes]
        lines.append(f"{label:<24}" + "".join(f"{cell:>14}" for cell in cells))
    ours = results.get(DEFAULTS_LABEL)
    if ours is not None:
        lines += [
            "",
            f"{DEFAULTS_LABEL} minus each method, paired on the same sets and seeds (sets resampled):",
            head[:24] + "".join(f"{'N=' + str(n):>20}" for n in sizes),
        ]
        for label, records in results.items():
            if label == DEFAULTS_LABEL:
                continue
            diff = paired_difference(ours, records)
            cells = [_signed(diff[n]) if n in diff else "" for n in sizes]
            lines.append(f"{label:<24}" + "".join(f"{cell:>20}" for cell in cells))
    return "\n".join(lines)


def _signed(diff: tuple[float, float, float]) -> str:
    mean, low, high = (100 * v for v in diff)
    return f"{mean:+.0f} [{low:+.0f},{high:+.0f}]"


def _two(value: float) -> str:
    return f"{'':>5}" if value != value else f"{value:5.2f}"


def selected_sets(
    bench: ModuleType, which: str, limit: int | None, per_n: int | None = None
) -> list[tuple[str, ...]]:
    """The split's sets; with ``limit``, that many spread evenly over it (every N represented);
    with ``per_n``, that many of each N, spread evenly within it (the same interval width at
    every N, which the split's 12/36/48/24 sets at N = 2..5 do not give)."""
    sets = bench.sets(which)
    if per_n is not None:
        by_n: dict[int, list[tuple[str, ...]]] = {}
        for s in sets:
            by_n.setdefault(len(s), []).append(s)
        return [s for group in by_n.values() for s in _spread(group, per_n)]
    return _spread(sets, limit) if limit is not None else sets


def _spread(items: list, count: int) -> list:
    if count >= len(items):
        return items
    return [items[round(i * (len(items) - 1) / max(count - 1, 1))] for i in range(count)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--benchmark", default="all", help=f"all, or one of {', '.join(BENCHMARKS)}")
    parser.add_argument("--sets", choices=("dev", "test"), default="test")
    parser.add_argument("--seeds", type=int, default=2, help="images per set and method")
    parser.add_argument("--per-n", type=int, default=12, help="sets of each N (0: the whole split)")
    parser.add_argument("--limit", type=int, default=None, help="instead: this many sets in all")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (default: the benchmark's)")
    parser.add_argument("--gated", action="store_true", help="add the gated single pass at several K")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--methods", default=None, help="comma-separated labels' prefixes (default: all)")
    args = parser.parse_args(argv)
    names = list(BENCHMARKS) if args.benchmark == "all" else [args.benchmark]
    started = time.time()
    for name in names:
        bench = benchmark(name)
        patch_size = patch_size_of(bench)
        chosen = methods(patch_size, args.gated)
        if args.methods:
            prefixes = [p.strip().lower() for p in args.methods.split(",")]
            chosen = [m for m in chosen if any(m.label.lower().startswith(p) for p in prefixes)]
        per_n = None if args.limit or not args.per_n else args.per_n
        sets = selected_sets(bench, args.sets, args.limit, per_n)
        jobs = bench.jobs_for(sets, args.seeds)
        steps = args.steps or bench.STEPS
        results = evaluate(name, chosen, jobs, steps, args.workers)
        print(
            f"{bench.NAME}, {args.sets} half: {len(sets)} sets x {args.seeds} seeds, {steps} steps, "
            f"CFG {bench.GUIDANCE:g}, LoRA scale {bench.LORA_SCALE:g}, patch {patch_size} of its "
            f"{bench.LATENT_SIDE}-pixel latent side"
        )
        print(
            "all = % of images with every element present; per-category recall in %; gt-rmse lower is "
            "better; win = mean weight of the winning LoRA per patch and step (1/N: uniform)"
        )
        print(table(bench, results))
        print()
    print(f"took {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
