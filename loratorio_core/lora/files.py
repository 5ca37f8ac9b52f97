"""Reading LoRA files: .safetensors only, validated, every known format normalised per layer.

A file becomes a ``LoRAFile``: its layers keyed by ``(component, path)``, where component is
``unet`` (the denoiser: UNet or transformer), ``te1`` or ``te2`` (first and second text
encoder) and path is the layer's module name with dots as underscores (kohya's spelling, which
is what survives every format: ``down_blocks_0_attentions_0_proj_in``).

Formats: kohya / LyCORIS (``lora_unet_*``, ``lora_te*_*``; ``.lora_down/.lora_up/.alpha``,
LoCon's ``.lora_mid``), diffusers/PEFT (``lora_A/lora_B`` under ``unet.``/``transformer.``/
``text_encoder(_2).``, and the older ``.lora.down``/``_lora.down`` spellings), and LyCORIS LoHa,
LoKr and full-diff layers, which become a dense weight delta. DoRA, IA3, OFT and GLoRA layers are
refused by name. Pickle files (.ckpt, .pt, .bin, .pth) are never opened.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")

_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}


class LoRAFileError(ValueError):
    """A LoRA file that cannot be used; the message names the file and the problem."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


@dataclass(frozen=True, eq=False)
class LayerUpdate:
    """One layer's weight update, as stored (no scale applied).

    Low rank: delta W = alpha / rank * up @ [mid] @ down, with down (r, in[, kh, kw]), up
    (out, r[, 1, 1]), mid (r, r, kh, kw) for LoCon's Tucker form. Dense (LoHa, LoKr, full diff):
    ``dense`` is delta W itself, weight-shaped, and ``dense_bias`` an optional bias delta.
    """

    down: Tensor | None = None
    up: Tensor | None = None
    mid: Tensor | None = None
    alpha: float | None = None
    dense: Tensor | None = None
    dense_bias: Tensor | None = None

    @property
    def is_dense(self) -> bool:
        return self.dense is not None

    @property
    def rank(self) -> int:
        return 0 if self.down is None else int(self.down.shape[0])

    @property
    def multiplier(self) -> float:
        """alpha / rank: what the file's up @ down is multiplied by (1 for dense updates)."""
        if self.is_dense:
            return 1.0
        return (self.alpha if self.alpha is not None else self.rank) / self.rank

    def delta_weight(self, weight_shape: tuple[int, ...] | torch.Size) -> Tensor:
        """Delta W with alpha / rank applied, shaped like the layer's weight (float32)."""
        shape = tuple(weight_shape)
        if self.is_dense:
            return self.dense.float().reshape(shape)
        down, up = self.down.float(), self.up.float().flatten(1)
        if self.mid is not None:
            # Tucker: W = up x1 (mid contracted with down over the rank axes).
            core = torch.einsum("ijkl,jc->ickl", self.mid.float(), down.flatten(1))
            delta = torch.einsum("oi,ickl->ockl", up, core)
        elif down.dim() == 4 and len(shape) == 4:
            delta = torch.einsum("or,rikl->oikl", up, down)
        else:
            delta = up @ down.flatten(1)
        return (delta * self.multiplier).reshape(shape)


@dataclass(eq=False)
class LoRAFile:
    """A loaded LoRA: its layers, metadata, and the keys it holds that are not layer updates."""

    path: str
    layers: dict[tuple[str, str], LayerUpdate]
    metadata: dict[str, str] = field(default_factory=dict)
    unknown_keys: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return Path(self.path).stem

    def component(self, name: str) -> dict[str, LayerUpdate]:
        """The layers of one component (``unet``, ``te1``, ``te2``) keyed by path."""
        return {path: update for (comp, path), update in self.layers.items() if comp == name}


def load_lora(path: str | os.PathLike) -> LoRAFile:
    """Read and validate a LoRA file; raise ``LoRAFileError`` naming the file and the problem."""
    tensors, metadata = read_safetensors(path)
    layers, unknown = _parse_layers(path, tensors)
    if not layers:
        raise LoRAFileError(
            path,
            "holds no LoRA layers (no lora_down/lora_up, lora_A/lora_B, LoHa, LoKr or diff keys)"
            + (f"; its keys look like {unknown[:3]}" if unknown else ""),
        )
    return LoRAFile(str(path), layers, metadata, unknown)


def save_lora(
    path: str | os.PathLike,
    layers: dict[tuple[str, str], LayerUpdate],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write low-rank layers as a kohya-format .safetensors file (``lora_unet_*``, ``lora_te1_*``...)."""
    from safetensors.torch import save_file

    prefixes = {"unet": "lora_unet_", "te1": "lora_te1_", "te2": "lora_te2_"}
    tensors = {}
    for (component, layer), update in layers.items():
        if update.is_dense:
            raise ValueError(f"layer {component}:{layer} is dense; save_lora writes low-rank layers only")
        key = prefixes[component] + layer
        tensors[f"{key}.lora_down.weight"] = update.down.contiguous()
        tensors[f"{key}.lora_up.weight"] = update.up.contiguous()
        if update.mid is not None:
            tensors[f"{key}.lora_mid.weight"] = update.mid.contiguous()
        alpha = update.alpha if update.alpha is not None else update.rank
        tensors[f"{key}.alpha"] = torch.tensor(float(alpha))
    save_file(tensors, str(path), metadata=metadata)


def read_header(path: str | os.PathLike) -> dict:
    """A .safetensors file's JSON header (tensor entries and ``__metadata__``), reading nothing else."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if size > MAX_HEADER_BYTES:
                raise LoRAFileError(
                    path, f"claims a {size}-byte header, over the format's 100 MB limit: corrupt file"
                )
            header = json.loads(f.read(size).decode("utf-8"))
    except FileNotFoundError:
        raise LoRAFileError(path, "no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise LoRAFileError(
            path, "has a header that is not valid JSON: corrupt or not a safetensors file"
        ) from None
    if not isinstance(header, dict):
        raise LoRAFileError(path, "has a header that is not a JSON object: corrupt file")
    return header


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """A .safetensors file's ``__metadata__`` (trainer settings, tag frequencies), reading only its header."""
    metadata = read_header(path).get("__metadata__", {})
    return {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {}


def tag_frequencies(metadata: dict[str, str]) -> dict[str, int]:
    """A kohya LoRA's training tags and how many captions had each (``ss_tag_frequency``, summed
    over its datasets); {} when the file has none or it is malformed."""
    try:
        frequencies = json.loads(metadata.get("ss_tag_frequency", "{}"))
    except ValueError:
        return {}
    counts: dict[str, int] = {}
    for dataset in frequencies.values() if isinstance(frequencies, dict) else []:
        for tag, count in dataset.items() if isinstance(dataset, dict) else []:
            if isinstance(count, (int, float)) and not isinstance(count, bool) and tag.strip():
                counts[tag.strip()] = counts.get(tag.strip(), 0) + int(count)
    return counts


def trigger_words(metadata: dict[str, str], limit: int = 8) -> list[str]:
    """A kohya LoRA's most frequent training tags (``ss_tag_frequency``), the words that call it up."""
    counts = tag_frequencies(metadata)
    return [tag for tag, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]]


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """All tensors and the metadata of a .safetensors file, after checking its header."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise LoRAFileError(
            path,
            f"is a pickle file ({path.suffix}), which can run code when opened: LoRAtorio reads "
            ".safetensors only (convert it with a trusted tool first)",
        )
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise LoRAFileError(path, "no such file") from None
    except IsADirectoryError:
        raise LoRAFileError(path, "is a folder, not a LoRA file") from None
    except OSError as error:
        raise LoRAFileError(path, f"cannot be read ({error.strerror or error})") from None
    if len(data) < 8:
        raise LoRAFileError(path, f"is truncated: {len(data)} bytes, too short for a safetensors header")
    looks_like_pickle = data[:4] == b"PK\x03\x04" or (
        data[:1] == b"\x80" and data[1:2] in b"\x02\x03\x04\x05"
    )
    if data[8:9] != b"{" and looks_like_pickle:
        # torch.save writes a zip (PK..) or a raw pickle (0x80, protocol): never unpickled here.
        raise LoRAFileError(
            path, "is a pickle/zip file with a .safetensors name: refused (it could run code)"
        )
    header_size = int.from_bytes(data[:8], "little")
    if header_size > MAX_HEADER_BYTES:
        raise LoRAFileError(
            path, f"claims a {header_size}-byte header, over the format's 100 MB limit: corrupt file"
        )
    if 8 + header_size > len(data):
        raise LoRAFileError(
            path, f"is truncated: its header needs {8 + header_size} bytes, the file has {len(data)}"
        )
    try:
        header = json.loads(data[8 : 8 + header_size].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise LoRAFileError(
            path, "has a header that is not valid JSON: corrupt or not a safetensors file"
        ) from None
    if not isinstance(header, dict):
        raise LoRAFileError(path, "has a header that is not a JSON object: corrupt file")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise LoRAFileError(path, "has __metadata__ that is not a map of strings: corrupt file")
    body = memoryview(data)[8 + header_size :]
    tensors = {}
    spans = []
    for key, entry in header.items():
        dtype, shape, begin, end = _check_entry(path, key, entry, len(body))
        spans.append((begin, end, key))
        count = math.prod(shape)
        if count == 0:
            tensors[key] = torch.empty(shape, dtype=dtype)
            continue
        # bytearray: a writable copy, so the tensor owns its memory.
        raw = bytearray(body[begin:end])
        tensors[key] = torch.frombuffer(raw, dtype=dtype, count=count).reshape(shape)
    spans.sort()
    for (_, end, key), (begin, _, other) in zip(spans, spans[1:], strict=False):
        if begin < end:
            raise LoRAFileError(path, f"has tensors {key!r} and {other!r} sharing bytes: corrupt header")
    covered = sum(end - begin for begin, end, _ in spans)
    if covered != len(body):
        # The format indexes every data byte; a gap means the header and data are out of step.
        raise LoRAFileError(
            path,
            f"its header accounts for {covered} of its {len(body)} data bytes: corrupt or truncated file",
        )
    return tensors, dict(metadata)


def _check_entry(path, key: str, entry: object, body_size: int) -> tuple[torch.dtype, list[int], int, int]:
    if not isinstance(entry, dict):
        raise LoRAFileError(path, f"header entry {key!r} is not an object: corrupt header")
    dtype_name, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype_name not in _DTYPES:
        raise LoRAFileError(path, f"tensor {key!r} has an unsupported dtype {dtype_name!r}")
    if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
        raise LoRAFileError(path, f"tensor {key!r} has an invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= body_size
    ):
        raise LoRAFileError(
            path, f"tensor {key!r} has data offsets {offsets!r} outside the file's {body_size} data bytes"
        )
    dtype, itemsize = _DTYPES[dtype_name]
    if offsets[1] - offsets[0] != math.prod(shape) * itemsize:
        raise LoRAFileError(
            path,
            f"tensor {key!r}: shape {shape} of {dtype_name} needs {math.prod(shape) * itemsize} bytes, "
            f"its offsets span {offsets[1] - offsets[0]}: corrupt header",
        )
    return dtype, shape, offsets[0], offsets[1]


# --- formats -----------------------------------------------------------------------------------

_COMPONENT_PREFIXES = (
    ("lora_unet_", "unet"),
    ("lora_te1_", "te1"),
    ("lora_te2_", "te2"),
    ("lora_te_", "te1"),
    ("unet.", "unet"),
    ("transformer.", "unet"),
    ("text_encoder_2.", "te2"),
    ("text_encoder.", "te1"),
)

# Suffix of a tensor key -> the role of that tensor in its layer. Longest first.
_ROLES = {
    ".lora_down.weight": "down",
    ".lora_up.weight": "up",
    ".lora_mid.weight": "mid",
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora.down.weight": "down",
    ".lora.up.weight": "up",
    "_lora.down.weight": "down",
    "_lora.up.weight": "up",
    ".alpha": "alpha",
    ".hada_w1_a": "hada_w1_a",
    ".hada_w1_b": "hada_w1_b",
    ".hada_w2_a": "hada_w2_a",
    ".hada_w2_b": "hada_w2_b",
    ".hada_t1": "hada_t1",
    ".hada_t2": "hada_t2",
    ".lokr_w1": "lokr_w1",
    ".lokr_w1_a": "lokr_w1_a",
    ".lokr_w1_b": "lokr_w1_b",
    ".lokr_w2": "lokr_w2",
    ".lokr_w2_a": "lokr_w2_a",
    ".lokr_w2_b": "lokr_w2_b",
    ".lokr_t2": "lokr_t2",
    ".diff": "diff",
    ".diff_b": "diff_b",
    ".dora_scale": "refuse:DoRA",
    ".lora_magnitude_vector": "refuse:DoRA",
    ".lora_magnitude_vector.weight": "refuse:DoRA",
    ".on_input": "refuse:IA3",
    ".oft_blocks": "refuse:OFT",
    ".oft_diag": "refuse:OFT",
    ".oft_R.weight": "refuse:OFT",
    ".a1.weight": "refuse:GLoRA",
    ".a2.weight": "refuse:GLoRA",
    ".b1.weight": "refuse:GLoRA",
    ".b2.weight": "refuse:GLoRA",
}
_SUFFIXES = sorted(_ROLES, key=len, reverse=True)
_PEFT_WRAPPER = "base_model.model."


def _split_key(key: str) -> tuple[str, str, str] | None:
    """A tensor key -> (component, layer path with underscores, role), or None if unknown."""
    for suffix in _SUFFIXES:
        if key.endswith(suffix):
            stem, role = key[: -len(suffix)], _ROLES[suffix]
            break
    else:
        return None
    wrapped = stem.startswith(_PEFT_WRAPPER)
    stem = stem.removeprefix(_PEFT_WRAPPER)
    found = next(((p, c) for p, c in _COMPONENT_PREFIXES if stem.startswith(p)), None)
    if found is not None:
        stem, component = stem[len(found[0]) :], found[1]
    elif wrapped or "." in stem:
        component = "unet"  # PEFT state dict of a bare denoiser
    else:
        return None
    # Old diffusers attention processors: attn1.processor.to_q_lora -> attn1.to_q.
    stem = re.sub(r"\.processor\.(to_[qkv]|to_out)(_lora)?$", r".\1", stem)
    stem = re.sub(r"\.to_out$", ".to_out.0", stem) if suffix.startswith("_lora") else stem
    return component, stem.replace(".", "_"), role


def _parse_layers(path, tensors: dict[str, Tensor]) -> tuple[dict[tuple[str, str], LayerUpdate], list[str]]:
    grouped: dict[tuple[str, str], dict[str, Tensor]] = {}
    unknown = []
    for key, tensor in tensors.items():
        split = _split_key(key)
        if split is None:
            unknown.append(key)
            continue
        component, layer, role = split
        if role.startswith("refuse:"):
            kind = role.split(":")[1]
            raise LoRAFileError(
                path,
                f"layer {key!r} is a {kind} layer, which LoRAtorio does not support "
                "(supported: LoRA/LoCon, LoHa, LoKr, full diff)",
            )
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise LoRAFileError(path, f"tensor {key!r} holds NaN or Inf values: the LoRA is broken")
        grouped.setdefault((component, layer), {})[role] = tensor
    layers = {name: _layer_update(path, name, parts) for name, parts in grouped.items()}
    return layers, sorted(unknown)


def _layer_update(path, name: tuple[str, str], parts: dict[str, Tensor]) -> LayerUpdate:
    where = f"layer {name[0]}:{name[1]}"
    alpha = _alpha(path, where, parts.get("alpha"))
    if "down" in parts or "up" in parts:
        if "down" not in parts or "up" not in parts:
            missing = "down (lora_down / lora_A)" if "down" not in parts else "up (lora_up / lora_B)"
            raise LoRAFileError(path, f"{where} has no {missing} weight")
        down, up, mid = parts["down"], parts["up"], parts.get("mid")
        if down.dim() not in (2, 4) or up.dim() not in (2, 4):
            raise LoRAFileError(
                path, f"{where}: down {tuple(down.shape)} / up {tuple(up.shape)} are not 2-D or 4-D"
            )
        rank = down.shape[0]
        if up.shape[1] != rank:
            raise LoRAFileError(
                path,
                f"{where}: up has rank {up.shape[1]} but down has rank {rank} (shapes "
                f"{tuple(up.shape)} and {tuple(down.shape)}): corrupt or mismatched LoRA",
            )
        if up.dim() == 4 and up.shape[2:] != (1, 1):
            raise LoRAFileError(path, f"{where}: a conv up weight must be 1x1; got {tuple(up.shape)}")
        if mid is not None and (mid.dim() != 4 or tuple(mid.shape[:2]) != (rank, rank)):
            raise LoRAFileError(path, f"{where}: lora_mid {tuple(mid.shape)} does not match rank {rank}")
        if rank == 0:
            raise LoRAFileError(path, f"{where} has rank 0")
        return LayerUpdate(down=down, up=up, mid=mid, alpha=alpha)
    if "diff" in parts:
        return LayerUpdate(dense=parts["diff"], dense_bias=parts.get("diff_b"))
    if any(role.startswith("hada_") for role in parts):
        return LayerUpdate(dense=_loha_delta(path, where, parts, alpha))
    if any(role.startswith("lokr_") for role in parts):
        return LayerUpdate(dense=_lokr_delta(path, where, parts, alpha))
    raise LoRAFileError(path, f"{where} has only {sorted(parts)}: no weight update")


def _alpha(path, where: str, tensor: Tensor | None) -> float | None:
    if tensor is None:
        return None
    if tensor.numel() != 1:
        raise LoRAFileError(path, f"{where}: alpha must be one number; got shape {tuple(tensor.shape)}")
    return float(tensor.reshape(()).float())


def _need(path, where: str, parts: dict[str, Tensor], *roles: str) -> list[Tensor]:
    missing = [role for role in roles if role not in parts]
    if missing:
        raise LoRAFileError(path, f"{where} lacks {', '.join(missing)}")
    return [parts[role].float() for role in roles]


def _loha_delta(path, where: str, parts: dict[str, Tensor], alpha: float | None) -> Tensor:
    """LoHa: (w1a @ w1b) * (w2a @ w2b) * alpha / rank, or its Tucker form with t1, t2."""
    w1a, w1b, w2a, w2b = _need(path, where, parts, "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    rank = w1b.shape[0]
    scale = (alpha if alpha is not None else rank) / rank
    try:
        if "hada_t1" in parts and "hada_t2" in parts:
            t1, t2 = parts["hada_t1"].float(), parts["hada_t2"].float()
            one = torch.einsum("ijkl,jr,ip->prkl", t1, w1b, w1a)
            two = torch.einsum("ijkl,jr,ip->prkl", t2, w2b, w2a)
            return one * two * scale
        return (w1a @ w1b) * (w2a @ w2b) * scale
    except RuntimeError as error:
        raise LoRAFileError(path, f"{where}: LoHa factors do not fit together ({error})") from None


def _lokr_delta(path, where: str, parts: dict[str, Tensor], alpha: float | None) -> Tensor:
    """LoKr: kron(w1, w2), each factor given whole or as a low-rank a @ b (then scaled by
    alpha / rank); conv layers carry the kernel in w2."""
    try:
        rank = None
        if "lokr_w1" in parts:
            w1 = parts["lokr_w1"].float()
        else:
            a, b = _need(path, where, parts, "lokr_w1_a", "lokr_w1_b")
            w1, rank = a @ b, b.shape[0]
        if "lokr_w2" in parts:
            w2 = parts["lokr_w2"].float()
        else:
            a, b = _need(path, where, parts, "lokr_w2_a", "lokr_w2_b")
            rank = b.shape[0]
            if "lokr_t2" in parts:
                w2 = torch.einsum("ijkl,jr,ip->prkl", parts["lokr_t2"].float(), b, a)
            else:
                w2 = (a @ b.flatten(1)).reshape(a.shape[0], *b.shape[1:])
        if w2.dim() == 4 and w1.dim() == 2:
            w1 = w1[:, :, None, None]
        scale = alpha / rank if rank is not None and alpha is not None else 1.0
        return torch.kron(w1, w2) * scale
    except RuntimeError as error:
        raise LoRAFileError(path, f"{where}: LoKr factors do not fit together ({error})") from None
