"""Choose LoRAtorio's weighting rule, temperature, patch size and lam on the DEV halves of BOTH
synthetic benchmarks (a setting counts only if it holds on models it was not tuned on).

    python benchmarks/sweep.py                       # both dev halves, 2 seeds a set
    python benchmarks/sweep.py --limit 48 --seeds 1  # a quicker look
    python benchmarks/sweep.py --only power:5,contrast:3   # just these rules:temperatures (one stage)

Stage 1: every weighting rule over its temperature grid, at patch 1/16 of the latent side and
lam = 0.5 (the paper's re-centring; lam = 1 lost to it on both models in first looks). Stage 2:
at the best rule and temperature, lam = 1 (N + 2 rows a step instead of 2N + 2: shipped if it
does not lose) and patch 1/8. The score of a setting is its all-present rate averaged over N and over the
two benchmarks; each benchmark's own rate, interval and winning weight are printed beside it, so
a setting that wins on one model only shows as such. The test halves are never used here.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quality import BENCHMARKS, Method, benchmark, evaluate, patch_size_of, selected_sets, summarize  # noqa: E402

from loratorio_core.config import LoRAtorioConfig  # noqa: E402

# Sharper settings than these (winning weights 0.6-1) lost on the first benchmark's dev half.
TEMPERATURES = {
    "softmin": (0.1, 1.0),
    "spread": (2.0, 4.0),
    "median": (5.0, 10.0),
    "power": (3.0, 5.0),
    "rank": (2.0, 3.0, 4.0),
    "contrast": (2.0, 3.0),
}


def setting(rule: str, tau: float, fraction: float, lam: float) -> tuple[str, float, float, float]:
    return (rule, tau, fraction, lam)


def label(key: tuple[str, float, float, float]) -> str:
    rule, tau, fraction, lam = key
    return f"{rule} tau={tau:g} d=1/{round(1 / fraction)} lam={lam:g}"


def parse_only(text: str) -> dict[str, tuple[float, ...]]:
    """"power:5,contrast:3" -> {"power": (5.0,), "contrast": (3.0,)}; SystemExit naming a bad item."""
    grid: dict[str, tuple[float, ...]] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        rule, _, tau = item.partition(":")
        try:
            LoRAtorioConfig(weighting=rule, temperature=float(tau))
        except ValueError as error:
            raise SystemExit(f"sweep: --only {item!r}: {error}; write rule:tau, e.g. contrast:3") from None
        grid[rule] = (*grid.get(rule, ()), float(tau))
    if not grid:
        raise SystemExit("sweep: --only needs at least one rule:temperature, e.g. contrast:3")
    return grid


def run(keys: list[tuple], names: list[str], args: argparse.Namespace) -> dict:
    """{key: {benchmark: summary}} for every setting on every benchmark's dev half."""
    scores: dict[tuple, dict[str, dict]] = {key: {} for key in keys}
    for name in names:
        bench = benchmark(name)
        jobs = bench.jobs_for(selected_sets(bench, "dev", args.limit), args.seeds)
        methods = {
            key: Method(
                label(key),
                LoRAtorioConfig(
                    weighting=key[0],
                    temperature=key[1],
                    patch_size=patch_size_of(bench, key[2]),
                    recenter=key[3],
                ),
            )
            for key in keys
        }
        results = evaluate(name, list(methods.values()), jobs, args.steps or bench.STEPS, args.workers)
        for key, m in methods.items():
            scores[key][name] = summarize(bench, results[m.label])
    return scores


def row(key: tuple, per_bench: dict[str, dict], names: list[str]) -> str:
    cells = []
    for name in names:
        s = per_bench[name]
        ci = f"[{100 * s['ci'][0]:3.0f},{100 * s['ci'][1]:3.0f}]"
        cells.append(f"{100 * s['avg']:5.1f} {ci} {s['win']:.2f}")
    mean = sum(per_bench[n]["avg"] for n in names) / len(names)
    return f"{label(key):<32}" + "".join(f"{c:>24}" for c in cells) + f"{100 * mean:8.1f}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--benchmark", default="all", help=f"all, or one of {', '.join(BENCHMARKS)}")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (default: the benchmark's)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--only", default=None, help="rule:tau,... to compare at patch 1/16 and lam 0.5 instead of the grid"
    )
    args = parser.parse_args(argv)
    names = list(BENCHMARKS) if args.benchmark == "all" else [args.benchmark]
    started = time.time()
    grid = TEMPERATURES if args.only is None else parse_only(args.only)
    stage1 = [setting(r, t, 1 / 16, 0.5) for r, taus in grid.items() for t in taus]
    scores = run(stage1, names, args)

    def mean(key: tuple) -> float:
        return sum(scores[key][n]["avg"] for n in names) / len(names)

    best = max(stage1, key=mean)
    stage2 = []
    if args.only is None:
        stage2 = [setting(best[0], best[1], 1 / 16, 1.0), setting(best[0], best[1], 1 / 8, 0.5)]
        scores.update(run(stage2, names, args))
    winner = max(stage1 + stage2, key=mean)

    print(f"LoRAtorio sweep on the dev halves ({args.limit or 'all'} sets a benchmark x {args.seeds} seeds)")
    print("per benchmark: all-present avg % [95% CI] and the winning LoRA's mean weight; last: mean of both")
    print(f"{'setting':<32}" + "".join(f"{n:>24}" for n in names) + f"{'mean':>8}")
    for key in stage1 + stage2:
        print(row(key, scores[key], names) + (" <- best" if key == winner else ""))
    print(f"best: {label(winner)}; took {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
