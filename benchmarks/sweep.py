"""Choose LoRAtorio's patch size, temperature and lam by measurement, on the DEV half only.

    python benchmarks/sweep.py                   # writes docs/sweep.png and prints the table
    python benchmarks/sweep.py --limit 12        # a quick look

One-dimensional sweeps around the shipped defaults (patch 4, temperature 0.01, lam 0.5): each
setting varies alone, the others stay at their defaults. The score is the quality benchmark's:
the rate of images with every element present (mean over N = 2..5, 95% bootstrap interval),
with gt-rmse (lower is better) and per-category recall beside it. The test half is never used
here, so the reported table is not tuned on.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quality import Method, evaluate, jobs_for, selected_sets, summarize  # noqa: E402

from loratorio_core.config import LoRAtorioConfig  # noqa: E402
from loratorio_core.synthetic import world  # noqa: E402

DEFAULTS = {"patch_size": 4, "temperature": 0.01, "recenter": 0.5}
GRID = {
    "patch_size": (1, 2, 4, 8),
    "temperature": (0.001, 0.01, 0.1, 1.0),
    "recenter": (0.0, 0.5, 1.0),
}
TITLES = {"patch_size": "patch size d", "temperature": "temperature tau", "recenter": "lam (re-centering)"}


def sweep_methods(grid: dict[str, Sequence[float]]) -> dict[tuple[str, float], Method]:
    """One LoRAtorio config per swept value; the defaults' config is shared by all three sweeps."""
    out, seen = {}, {}
    for setting, values in grid.items():
        for value in values:
            settings = {**DEFAULTS, setting: value}
            key = tuple(sorted(settings.items()))
            if key not in seen:
                label = (
                    f"d={settings['patch_size']} tau={settings['temperature']:g} lam={settings['recenter']:g}"
                )
                seen[key] = Method(label, LoRAtorioConfig(**settings))
            out[(setting, value)] = seen[key]
    return out


def plot(summaries: dict[tuple[str, float], dict], grid: dict[str, Sequence[float]], path: Path) -> None:
    """Three panels (patch size, temperature, lam): the all-present rate with its 95% interval
    per value, the default circled. Drawn with PIL (no matplotlib)."""
    from PIL import Image, ImageDraw

    width, height, margin = 300, 240, 40
    image = Image.new("RGB", (width * len(grid), height + 30), "white")
    draw = ImageDraw.Draw(image)
    values = [s["avg"] for s in summaries.values()] + [s["ci"][1] for s in summaries.values()]
    low = [s["ci"][0] for s in summaries.values()]
    top, bottom = min(1.0, max(values) + 0.05), max(0.0, min(low) - 0.05)

    def y_of(v: float) -> float:
        return margin + (height - 2 * margin) * (top - v) / max(top - bottom, 1e-6)

    for panel, (setting, vals) in enumerate(grid.items()):
        left = panel * width + margin
        right = (panel + 1) * width - 15
        draw.rectangle([left, margin, right, height - margin], outline="black")
        for tick in range(5):
            v = bottom + (top - bottom) * tick / 4
            draw.line([left - 4, y_of(v), left, y_of(v)], fill="black")
            draw.text((left - 36, y_of(v) - 6), f"{100 * v:.0f}%", fill="black")
        draw.text((left, 8), f"{TITLES[setting]} (dev half)", fill="black")
        draw.text((left, 20), "all elements present", fill=(90, 90, 90))
        points = []
        for i, value in enumerate(vals):
            x = left + (right - left) * (i + 0.5) / len(vals)
            s = summaries[(setting, value)]
            y = y_of(s["avg"])
            draw.line([x, y_of(s["ci"][0]), x, y_of(s["ci"][1])], fill=(0, 114, 178), width=2)
            points.append((x, y))
            draw.text((x - 12, height - margin + 6), f"{value:g}", fill="black")
            if value == DEFAULTS[setting]:
                draw.ellipse([x - 7, y - 7, x + 7, y + 7], outline=(213, 94, 0), width=2)
        draw.line(points, fill=(0, 114, 178), width=2)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(0, 114, 178))
    draw.text(
        (margin, height + 8), "circled: the shipped default; bars: 95% bootstrap interval", fill="black"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--plot", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "sweep.png"
    )
    args = parser.parse_args(argv)
    started = time.time()
    by_value = sweep_methods(GRID)
    unique = list({m.label: m for m in by_value.values()}.values())
    sets = selected_sets("dev", args.limit)
    results = evaluate(unique, jobs_for(sets, args.seeds), args.steps, args.workers)
    summaries = {key: summarize(results[m.label]) for key, m in by_value.items()}
    print(f"LoRAtorio sweep on the dev half: {len(sets)} sets x {args.seeds} seeds, {args.steps} DDIM steps")
    head = (
        f"{'setting':<14}{'value':>8}{'all avg [95% CI]':>22} | "
        + "".join(f"{c[:5]:>7}" for c in world.CATEGORIES)
        + f" | {'gt-rmse':>7} {'rows':>5}"
    )
    print(head)
    print("-" * len(head))
    for (setting, value), s in summaries.items():
        ci = f"{100 * s['avg']:.1f} [{100 * s['ci'][0]:.1f},{100 * s['ci'][1]:.1f}]"
        mark = " *" if value == DEFAULTS[setting] else ""
        print(
            f"{setting:<14}{value:>8g}{ci:>22} | "
            + "".join(f"{100 * s['recall'][c]:7.1f}" for c in world.CATEGORIES)
            + f" | {s['rmse']:7.3f} {s['rows']:5.0f}{mark}"
        )
    for setting, values in GRID.items():
        best = max(values, key=lambda v: summaries[(setting, v)]["avg"])
        print(f"best {setting}: {best:g} (default {DEFAULTS[setting]:g})")
    plot(summaries, GRID, args.plot)
    print(f"wrote {args.plot}; took {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
