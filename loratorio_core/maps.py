"""Pictures of which LoRA owns which region: each LoRA's weight map over the image.

``weight_overlay`` is pure torch (usable by any host); ``weight_map_sheet`` lays the maps of
several steps out as one PIL image, LoRAs in rows and steps in columns (PIL is imported only
there).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# Distinct, colour-blind-friendly hues (Okabe-Ito), one per LoRA, cycling past eight.
PALETTE = (
    (230, 159, 0),
    (86, 180, 233),
    (0, 158, 115),
    (240, 228, 66),
    (0, 114, 178),
    (213, 94, 0),
    (204, 121, 167),
    (153, 153, 153),
)


def weight_overlay(image: Tensor, weights: Tensor, color: Sequence[int], strength: float = 0.75) -> Tensor:
    """One LoRA's patch weights tinted over an image.

    image (3, H, W) in [0, 1]; weights (h, w) in [0, 1] (a patch grid, spread to the image by
    nearest neighbour) -> (3, H, W): the image darkened where the LoRA has no weight and tinted
    with ``color`` where it has.
    """
    height, width = image.shape[-2:]
    spread = F.interpolate(weights[None, None].float(), size=(height, width), mode="nearest")[0]
    tint = torch.tensor(color, dtype=torch.float32).view(3, 1, 1) / 255.0
    shaded = image.float() * (1 - strength) + strength * spread * tint
    return shaded.clamp(0, 1)


def weight_map_sheet(
    image,
    weights_per_step: Sequence[Tensor],
    names: Sequence[str],
    sample: int = 0,
    columns: int = 6,
    cell: int = 160,
):
    """A PIL image: the result, then for each LoRA (a row) its weight map at up to ``columns``
    steps spread over the run (columns), labelled with the LoRA's name and the step.

    image: the PIL result; weights_per_step: per step, (N, B, h, w) weights.
    """
    from PIL import Image, ImageDraw

    steps = len(weights_per_step)
    count = min(columns, steps)
    shown = sorted({round(i * (steps - 1) / max(count - 1, 1)) for i in range(count)})
    small = image.convert("RGB").resize((cell, cell))
    picture = torch.frombuffer(bytearray(small.tobytes()), dtype=torch.uint8).reshape(cell, cell, 3)
    picture = picture.permute(2, 0, 1).float() / 255.0
    label = 14
    sheet = Image.new("RGB", ((len(shown) + 1) * cell, len(names) * (cell + label)), "white")
    draw = ImageDraw.Draw(sheet)
    for row, name in enumerate(names):
        top = row * (cell + label)
        sheet.paste(small, (0, top + label))
        draw.text((2, top), name[:40], fill="black")
        color = PALETTE[row % len(PALETTE)]
        for column, step in enumerate(shown, start=1):
            overlay = weight_overlay(picture, weights_per_step[step][row, sample], color)
            pixels = (overlay.permute(1, 2, 0) * 255).round().to(torch.uint8).flatten().tolist()
            tile = Image.frombytes("RGB", (cell, cell), bytes(pixels))
            sheet.paste(tile, (column * cell, top + label))
            draw.text((column * cell + 2, top), f"step {step + 1}/{steps}", fill="black")
    return sheet
