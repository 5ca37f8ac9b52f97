"""Weight-map images added to a generation's outputs (as ControlNet adds its detected maps)."""

from __future__ import annotations

import torch

from loratorio_core.maps import PALETTE, weight_overlay


def weight_map_images(image, weights: torch.Tensor, names: list[str]) -> list:
    """One picture per LoRA: its weights (N, h, w) tinted over the result ``image`` (PIL), or over
    a grey canvas when the image is not a PIL image (latent output)."""
    picture, pil = _as_tensor(image)
    out = []
    for n, name in enumerate(names):
        overlay = weight_overlay(picture, weights[n], PALETTE[n % len(PALETTE)])
        out.append((_to_pil(overlay) if pil else overlay, name))
    return out


def mean_weights(recorded: dict[int, dict[int, torch.Tensor]], sample: int) -> torch.Tensor | None:
    """An image's weights averaged over the steps (N, h, w)."""
    steps = [by_sample[sample] for by_sample in recorded.values() if sample in by_sample]
    return torch.stack(steps).mean(0) if steps else None


def _as_tensor(image):
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - the WebUIs ship PIL
        Image = None
    if Image is not None and isinstance(image, Image.Image):
        rgb = image.convert("RGB")
        data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).reshape(rgb.height, rgb.width, 3)
        return data.permute(2, 0, 1).float() / 255.0, True
    height, width = (
        (image.shape[-2] * 8, image.shape[-1] * 8) if isinstance(image, torch.Tensor) else (512, 512)
    )
    return torch.full((3, height, width), 0.5), False


def _to_pil(overlay: torch.Tensor):
    from PIL import Image

    pixels = (overlay.permute(1, 2, 0) * 255).round().to(torch.uint8).contiguous()
    return Image.frombytes("RGB", (pixels.shape[1], pixels.shape[0]), bytes(pixels.flatten().tolist()))
