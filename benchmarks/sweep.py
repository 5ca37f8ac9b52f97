"""Choose LoRAtorio's patch size, temperature and lam by measurement, on the DEV half only.

    python benchmarks/sweep.py                   # writes docs/sweep.png and prints the table
    python benchmarks/sweep.py --limit 12        # a quick look

Two stages. First a grid of patch size x temperature at lam = 0.5 (the paper's lam); then lam
varied at the grid's best pair. The score is the quality benchmark's: the rate of images with
every element present (mean over N = 2..5, 95% bootstrap interval), with gt-rmse (lower is
better) and per-category recall beside it. The best cell wins; where its interval overlaps
others the table shows it, and the README says how sure the choice is. The test half is never
used here, so the reported table is not tuned on.

Patch sizes are in latent pixels of this model's 16x16 latent: d = 1 here covers 1/16 of the
side, as d = 4 does on SD1.5's 64x64 latent (512 px).
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

PATCH_SIZES = (1, 2, 4)
TEMPERATURES = (0.01, 0.1, 1.0, 10.0)
GRID_LAM = 0.5
LAMS = (0.0, 0.5, 1.0)


def method(patch_size: int, temperature: float, lam: float) -> Method:
    return Method(
        f"d={patch_size} tau={temperature:g} lam={lam:g}",
        LoRAtorioConfig(patch_size=patch_size, temperature=temperature, recenter=lam),
    )


def _cell_text(s: dict) -> str:
    return f"{100 * s['avg']:.1f} [{100 * s['ci'][0]:.0f},{100 * s['ci'][1]:.0f}]"


def plot(
    grid: dict[tuple[int, float], dict], lams: dict[float, dict], best: tuple[int, float], path: Path
) -> None:
    """Left: the all-present rate over patch size x temperature (lam 0.5), darker = better, the
    best cell outlined. Right: lam at the best pair, with 95% intervals. Drawn with PIL."""
    from PIL import Image, ImageDraw

    cell_w, cell_h, left, top = 110, 44, 70, 56
    grid_w = left + cell_w * len(TEMPERATURES) + 30
    panel_w, height = 300, top + cell_h * len(PATCH_SIZES) + 70
    image = Image.new("RGB", (grid_w + panel_w, max(height, 260)), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 8), "all elements present (dev half), lam = 0.5", fill="black")
    draw.text(
        (10, 22), "rows: patch size d (latent px of 16x16); columns: temperature tau", fill=(90, 90, 90)
    )
    rates = [s["avg"] for s in grid.values()]
    low, high = min(rates), max(rates)
    for i, d in enumerate(PATCH_SIZES):
        draw.text((left - 40, top + i * cell_h + cell_h // 2 - 6), f"d={d}", fill="black")
        for j, tau in enumerate(TEMPERATURES):
            s = grid[(d, tau)]
            shade = (s["avg"] - low) / max(high - low, 1e-6)
            colour = tuple(int(255 - shade * (255 - c)) for c in (0, 90, 160))
            box = [left + j * cell_w, top + i * cell_h, left + (j + 1) * cell_w, top + (i + 1) * cell_h]
            draw.rectangle(box, fill=colour, outline="white")
            ink = "white" if shade > 0.55 else "black"
            draw.text((box[0] + 6, box[1] + 15), _cell_text(s), fill=ink)
            if (d, tau) == best:
                draw.rectangle(box, outline=(213, 94, 0), width=3)
    for j, tau in enumerate(TEMPERATURES):
        draw.text((left + j * cell_w + cell_w // 2 - 14, top - 14), f"tau={tau:g}", fill="black")
    draw.text(
        (10, height - 30),
        "outlined: the best cell (the shipped setting); [95% bootstrap interval]",
        fill="black",
    )

    x0, x1, y0, y1 = grid_w + 40, grid_w + panel_w - 20, top, height - 50
    values = [s["ci"][1] for s in lams.values()] + [s["ci"][0] for s in lams.values()]
    vmax, vmin = min(1.0, max(values) + 0.05), max(0.0, min(values) - 0.05)

    def y_of(v: float) -> float:
        return y0 + (y1 - y0) * (vmax - v) / max(vmax - vmin, 1e-6)

    draw.text((x0, 8), f"lam at d={best[0]}, tau={best[1]:g}", fill="black")
    draw.rectangle([x0, y0, x1, y1], outline="black")
    for tick in range(5):
        v = vmin + (vmax - vmin) * tick / 4
        draw.line([x0 - 4, y_of(v), x0, y_of(v)], fill="black")
        draw.text((x0 - 36, y_of(v) - 6), f"{100 * v:.0f}%", fill="black")
    points = []
    for i, (lam, s) in enumerate(lams.items()):
        x = x0 + (x1 - x0) * (i + 0.5) / len(lams)
        draw.line([x, y_of(s["ci"][0]), x, y_of(s["ci"][1])], fill=(0, 114, 178), width=2)
        points.append((x, y_of(s["avg"])))
        draw.text((x - 8, y1 + 6), f"{lam:g}", fill="black")
    draw.line(points, fill=(0, 114, 178), width=2)
    for x, y in points:
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(0, 114, 178))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def _row(label: str, s: dict) -> str:
    return (
        f"{label:<26}{_cell_text(s):>18} | "
        + "".join(f"{100 * s['recall'][c]:7.1f}" for c in world.CATEGORIES)
        + f" | {s['rmse']:7.3f} {s['rows']:5.0f}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--plot", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "sweep.png"
    )
    args = parser.parse_args(argv)
    started = time.time()
    sets = selected_sets("dev", args.limit)
    jobs = jobs_for(sets, args.seeds)
    grid_methods = {(d, tau): method(d, tau, GRID_LAM) for d in PATCH_SIZES for tau in TEMPERATURES}
    results = evaluate(list(grid_methods.values()), jobs, args.steps, args.workers)
    grid = {key: summarize(results[m.label]) for key, m in grid_methods.items()}
    best = max(grid, key=lambda key: grid[key]["avg"])
    lam_methods = {lam: method(*best, lam) for lam in LAMS}
    extra = [m for lam, m in lam_methods.items() if lam != GRID_LAM]
    results.update(evaluate(extra, jobs, args.steps, args.workers))
    lams = {lam: summarize(results[m.label]) for lam, m in lam_methods.items()}
    best_lam = max(LAMS, key=lambda lam: lams[lam]["avg"])

    print(f"LoRAtorio sweep on the dev half: {len(sets)} sets x {args.seeds} seeds, {args.steps} DDIM steps")
    head = (
        f"{'setting':<26}{'all avg [95% CI]':>18} | "
        + "".join(f"{c[:5]:>7}" for c in world.CATEGORIES)
        + f" | {'gt-rmse':>7} {'rows':>5}"
    )
    print(head)
    print("-" * len(head))
    for key, m in grid_methods.items():
        print(_row(m.label, grid[key]) + (" <- best" if key == best else ""))
    print("-" * len(head))
    for lam, m in lam_methods.items():
        print(_row(m.label, lams[lam]) + (" <- best" if lam == best_lam else ""))
    print(f"best: patch {best[0]}, temperature {best[1]:g}, lam {best_lam:g}")
    plot(grid, lams, best, args.plot)
    print(f"wrote {args.plot}; took {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
