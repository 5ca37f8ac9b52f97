"""``loratorio generate``: compose LoRAs on a diffusers model from the command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import (
    MODES,
    UNCOND_LORAS,
    UPSAMPLE_MODES,
    WEIGHTINGS,
    LoRAtorioConfig,
    format_patch,
    parse_patch,
)
from .infotext import KEPT, format_params, generation_params, kept_value
from .lora.files import PICKLE_SUFFIXES
from .lora.specs import split_scale


class UsageError(ValueError):
    """Bad command-line input: printed as one line, exit status 2."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a diffusers model folder, or a single-file .safetensors checkpoint")
    parser.add_argument("--prompt", "-p", required=True)
    parser.add_argument("--negative", "-n", default="", help="negative prompt")
    parser.add_argument(
        "--lora",
        "-l",
        action="append",
        default=[],
        metavar="FILE[:SCALE]",
        help="a LoRA .safetensors file and its scale (default 1.0); repeat for each LoRA",
    )
    parser.add_argument(
        "--pool",
        metavar="ENTRY[,ENTRY...]",
        help="LoRAs to choose from (use with --top-k): folders (every .safetensors LoRA in it) or files, "
        "comma-separated, each with an optional :SCALE (default 1.0), e.g. loras/:0.8,extra.safetensors",
    )
    parser.add_argument(
        "--top-k", type=int, help="dynamic selection: keep the K most relevant LoRAs per image"
    )
    parser.add_argument("--reselect-every", type=int, default=1, help="steps between top-k selections")
    parser.add_argument("--mode", choices=MODES, default="loratorio")
    defaults = LoRAtorioConfig()
    parser.add_argument(
        "--patch-size",
        default=format_patch(defaults),
        help="patch side: a fraction of the latent's shorter side (1/16, the default: 4 latent pixels at "
        "512 px, 8 at 1024) or an absolute size in latent pixels (4)",
    )
    parser.add_argument(
        "--weighting",
        choices=WEIGHTINGS,
        default=defaults.weighting,
        help="how divergences become patch weights (softmin: the paper's rule)",
    )
    parser.add_argument(
        "--temperature", type=float, default=defaults.temperature, help="the weighting rule's tau"
    )
    parser.add_argument(
        "--recenter", type=float, default=defaults.recenter, help="lam of the re-centred uncond"
    )
    parser.add_argument(
        "--uncond-loras",
        choices=UNCOND_LORAS,
        default=defaults.uncond_loras,
        help="with lam < 1, the LoRAs' part of the re-centred uncond: evaluate (every LoRA runs the "
        "negative prompt, 2N + 2 rows a step) or reuse (the positive branch's LoRA change; N + 2 rows)",
    )
    parser.add_argument("--upsample", choices=UPSAMPLE_MODES, default=defaults.upsample)
    parser.add_argument("--switch-every", type=int, default=defaults.switch_every)
    parser.add_argument(
        "--exact-every",
        type=int,
        default=defaults.exact_every,
        help="gated single pass: exact steps only every K-th step after --exact-first, one gated row "
        "between (1, the default: every step exact, the method as written; 2 kept its quality on both "
        "synthetic benchmarks, 3 costs fewer rows and loses some with 4-5 LoRAs)",
    )
    parser.add_argument(
        "--exact-first", type=int, default=defaults.exact_first, help="gated single pass: leading exact steps"
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", "--cfg", type=float, default=7.5, help="classifier-free guidance scale")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--batch", type=int, default=1, help="images per prompt")
    parser.add_argument("--device", default="auto", help="cuda, cpu, mps... (auto: cuda when available)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    parser.add_argument("--max-rows", type=int, help="at most this many UNet rows per forward (memory)")
    parser.add_argument(
        "--no-text-encoder-loras", action="store_true", help="ignore the LoRAs' text-encoder layers"
    )
    parser.add_argument("--output", "-o", default="loratorio.png", help="PNG path (numbered for --batch > 1)")
    parser.add_argument(
        "--maps", action="store_true", help="also write each LoRA's weight map over the steps"
    )
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def parse_lora(spec: str, option: str = "--lora") -> tuple[Path, float]:
    """``FILE[:SCALE]`` -> (path, scale); also for Windows paths (``C:\\x.safetensors:0.8``)."""
    try:
        path, scale = split_scale(spec)
    except ValueError as error:
        raise UsageError(f"{option} {error}") from None
    return Path(path), 1.0 if scale is None else scale


def collect_loras(args) -> list[tuple[Path, float]]:
    loras = [parse_lora(spec) for spec in args.lora]
    for entry in (args.pool or "").split(","):
        if not entry.strip():
            continue
        path, scale = parse_lora(entry, "--pool")
        if path.is_dir():
            files = sorted(path.glob("*.safetensors"))
            if not files:
                raise UsageError(f"--pool {path}: holds no .safetensors LoRA")
            loras += [(f, scale) for f in files]
        else:
            loras.append((path, scale))
    for path, _ in loras:
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise UsageError(f"{path}: a pickle LoRA ({path.suffix}) can run code; use a .safetensors file")
        if not path.is_file():
            raise UsageError(f"{path}: no such LoRA file")
    return loras


def build_config(args) -> LoRAtorioConfig:
    try:
        return LoRAtorioConfig(
            mode=args.mode,
            **parse_patch(args.patch_size),
            weighting=args.weighting,
            temperature=args.temperature,
            recenter=args.recenter,
            uncond_loras=args.uncond_loras,
            top_k=args.top_k,
            reselect_every=args.reselect_every,
            upsample=args.upsample,
            switch_every=args.switch_every,
            exact_every=args.exact_every,
            exact_first=args.exact_first,
        )
    except ValueError as error:
        raise UsageError(str(error)) from None


def infotext(
    args, config: LoRAtorioConfig, names: list[tuple[str, float]], scheduler: str, size, kept
) -> str:
    """The parameters text A1111 writes, with LoRAtorio's settings by the one writer the WebUI
    extension uses too (only when LoRAs were composed), so the WebUIs paste it back."""
    params: dict[str, object] = {
        "Steps": args.steps,
        "Sampler": scheduler,
        "CFG scale": f"{args.guidance:g}",
        "Seed": args.seed,
        "Size": f"{size[1]}x{size[0]}",
        "Model": Path(args.model).stem,
    }
    if names:
        params.update(generation_params(config, pool=args.pool or ""))
    if kept:
        params[KEPT] = kept_value(kept)
    lora_tags = " ".join(f"<lora:{name}:{scale:g}>" for name, scale in names)
    prompt = f"{args.prompt} {lora_tags}".strip()
    negative = f"\nNegative prompt: {args.negative}" if args.negative else ""
    return f"{prompt}{negative}\n{format_params(params)}"


def run_generate(args) -> list[Path]:
    from .integrations.diffusers import LoRAtorioDiffusers  # diffusers itself is imported only there
    from .maps import weight_map_sheet

    config = build_config(args)
    loras = collect_loras(args)
    if args.top_k is not None and args.top_k > len(loras):
        raise UsageError(f"--top-k {args.top_k} is more than the {len(loras)} LoRAs given")
    for value, name in ((args.steps, "--steps"), (args.batch, "--batch")):
        if value < 1:
            raise UsageError(f"{name} must be at least 1")
    from .integrations.diffusers import load_pipeline

    pipe = load_pipeline(args.model, args.device, args.dtype)
    composer = LoRAtorioDiffusers(
        pipe,
        [path for path, _ in loras],
        [scale for _, scale in loras],
        config,
        max_rows=args.max_rows,
        text_encoder_loras=not args.no_text_encoder_loras,
        asked=[index < len(args.lora) for index in range(len(loras))],  # --lora first, then --pool
    )
    for warning in composer.warnings:
        print(f"loratorio: warning: {warning}", file=sys.stderr)
    if not composer.adapters:
        print("loratorio: warning: nothing composed: no LoRA given (--lora, --pool)", file=sys.stderr)
    progress = _progress(args.steps, args.quiet)
    try:
        result = composer(
            args.prompt,
            args.negative,
            steps=args.steps,
            guidance_scale=args.guidance,
            height=args.height,
            width=args.width,
            seed=args.seed,
            num_images_per_prompt=args.batch,
            record_weights=args.maps,
            on_step=progress,
        )
    finally:
        progress.close()
    from PIL.PngImagePlugin import PngInfo

    names = [(a.name, a.scale) for a in composer.adapters]
    size = (result.images[0].height, result.images[0].width)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for b, image in enumerate(result.images):
        path = (
            output
            if len(result.images) == 1
            else output.with_name(f"{output.stem}-{b}{output.suffix or '.png'}")
        )
        kept = []
        if result.kept and result.kept[-1] is not None:
            kept = [names[i][0] for i in range(len(names)) if bool(result.kept[-1][i, b])]
        info = PngInfo()
        info.add_text("parameters", infotext(args, config, names, type(pipe.scheduler).__name__, size, kept))
        info.add_text("loratorio", json.dumps({"config": config.__dict__, "loras": names, "seed": args.seed}))
        image.save(path, pnginfo=info)
        written.append(path)
        if args.maps and result.weights and result.weights[0] is not None:
            maps_path = path.with_name(f"{path.stem}_maps.png")
            exact_steps = [w for w in result.weights if w is not None]  # gated steps have no maps
            weight_map_sheet(image, exact_steps, [n for n, _ in names], sample=b).save(maps_path)
            written.append(maps_path)
    return written


class _progress:
    """A tqdm bar on stderr (a plain line per step without tqdm)."""

    def __init__(self, total: int, quiet: bool):
        self.bar = None
        self.quiet = quiet
        if not quiet:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc="loratorio", unit="step", file=sys.stderr)
            except ImportError:
                self.bar = None

    def __call__(self, done: int, total: int) -> None:
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.update(1)
        else:
            print(f"step {done}/{total}", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


__all__ = ["UsageError", "add_arguments", "parse_lora", "run_generate"]
