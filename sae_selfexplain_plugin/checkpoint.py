"""Resume checkpoints (`contexts --resume`, `train-adapter --resume`): tensors in a safetensors file, everything
else as JSON in its metadata. Never pickle: a checkpoint lies beside an output, where anyone who can write
could plant one, and unpickling runs code.

Each checkpoint stores what it was made from (the SAE, the data, the settings); a resume compares that with
the run and refuses, naming the field, where they differ (`check_fields`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .errors import InputError
from .files import atomic_writer, parse_json


def _format(kind: str) -> str:
    return f"sae-selfexplain-{kind}-checkpoint/1"


def save_checkpoint(path: Path, kind: str, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    """Write `tensors` and the JSON-able `info` to `path` atomically."""
    from safetensors.torch import save

    meta = {"format": _format(kind), "info": json.dumps(info, allow_nan=False)}
    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=meta)
    with atomic_writer(path, "wb") as f:
        f.write(data)


def load_checkpoint(path: Path, kind: str, fix: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, info) of a checkpoint written by `save_checkpoint(path, kind, ...)`; InputError naming the
    file and ending with `fix` for anything else (garbage, a pickle, another safetensors file)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    except Exception as e:  # safetensors has its own error types for corrupt, truncated or foreign files
        raise InputError(f"{path} is not a readable resume checkpoint ({str(e)[:200]}); {fix}") from None
    if meta.get("format") != _format(kind):
        raise InputError(
            f"{path}: field 'format' is {meta.get('format')!r}, not {_format(kind)!r}: not a {kind} resume "
            f"checkpoint of sae-selfexplain; {fix}"
        )
    try:
        info = parse_json(meta.get("info", ""), f"{path}: field 'info'")
    except InputError as e:
        raise InputError(f"{str(e).rstrip('.')}; {fix}") from None
    if not isinstance(info, dict):
        raise InputError(f"{path}: field 'info' must be a JSON object, got {type(info).__name__}; {fix}")
    return tensors, info


def check_fields(path: Path, field: str, saved: Any, current: Any, fix: str) -> None:
    """InputError naming the first (dotted) field where the checkpoint's `saved` differs from this run's
    `current`; lists become tuples so that JSON's lists match a run's tuples."""
    if isinstance(current, dict) and isinstance(saved, dict):
        for key in sorted(set(current) | set(saved)):
            check_fields(path, f"{field}.{key}", saved.get(key), current.get(key), fix)
        return
    if _plain(saved) != _plain(current):
        raise InputError(f"{path}: field {field!r} is {saved!r} in the checkpoint but {current!r} in this run; {fix}")


def _plain(value: Any) -> Any:
    return tuple(_plain(v) for v in value) if isinstance(value, list | tuple) else value


def take(
    path: Path, tensors: dict[str, torch.Tensor], name: str, shape: tuple[int, ...], dtype: torch.dtype, fix: str
) -> torch.Tensor:
    """Tensor `name` of a checkpoint, which must have `shape` and `dtype` (-1 in `shape`: any size)."""
    if name not in tensors:
        raise InputError(f"{path}: tensor {name!r} is missing; {fix}")
    t = tensors[name]
    fits = t.ndim == len(shape) and all(s in (-1, n) for s, n in zip(shape, t.shape))
    if not fits or t.dtype != dtype:
        want = "x".join("any" if s < 0 else str(s) for s in shape)
        raise InputError(f"{path}: tensor {name!r} is {tuple(t.shape)} {t.dtype}, expected [{want}] {dtype}; {fix}")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise InputError(f"{path}: tensor {name!r} holds NaN or infinite values; {fix}")
    return t


def restore_generator(path: Path, generator: torch.Generator, state: torch.Tensor, fix: str) -> None:
    """Set a random generator's state from a checkpoint's uint8 tensor, refusing one of the wrong size."""
    try:
        generator.set_state(state)
    except RuntimeError as e:
        raise InputError(f"{path}: tensor 'generator' is not a random generator's state ({e}); {fix}") from None
