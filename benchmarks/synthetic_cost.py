"""What one image costs on each synthetic benchmark: seconds per UNet row and per image (CPU).

    python benchmarks/synthetic_cost.py            # 8 dev sets x 1 seed, LoRAtorio lam = 0.5, 20 steps

Both benchmarks sample the same kind of work (8 dev sets, one seed each, the default sampler
settings, one thread) in alternation, ``--repeats`` times, and the median is reported, so load
from other work on the machine hits both alike. A quality table's cost is its rows times the
per-row time: the second benchmark must not cost more per row than the first.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loratorio_core.config import LoRAtorioConfig  # noqa: E402
from loratorio_core.pixelworld import benchmark as pixelworld  # noqa: E402
from loratorio_core.synthetic import benchmark as synthetic  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sets", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    config = LoRAtorioConfig(patch_size=1, temperature=1.0, recenter=0.5)
    benchmarks = (synthetic, pixelworld)
    models = {b.NAME: b.load_model() for b in benchmarks}
    jobs = {
        b.NAME: b.jobs_for(b.sets("dev")[:: max(1, 120 // args.sets)][: args.sets], 1) for b in benchmarks
    }
    seconds: dict[str, list[float]] = {b.NAME: [] for b in benchmarks}
    rows: dict[str, float] = {}
    for _ in range(args.repeats):
        for b in benchmarks:
            started = time.perf_counter()
            out = b.sample(models[b.NAME], jobs[b.NAME], config, steps=args.steps)
            seconds[b.NAME].append(time.perf_counter() - started)
            rows[b.NAME] = sum(out.rows)
    images = args.sets
    print(f"LoRAtorio lam=0.5, {images} dev sets x 1 seed, {args.steps} steps, median of {args.repeats}")
    for b in benchmarks:
        median = statistics.median(seconds[b.NAME])
        print(
            f"{b.NAME:<22} {median / images:6.3f} s/image  {1000 * median / rows[b.NAME]:6.2f} ms/row  "
            f"({rows[b.NAME] / images:.0f} rows/image)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
