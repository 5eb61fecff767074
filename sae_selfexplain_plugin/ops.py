"""Trace-side math, pure torch: the only code that runs inside an nnsight trace, locally or on NDIF.

NDIF pickles trace bodies by source and admits only whitelisted modules (torch, math, ...), so this module
imports torch alone; the nnsight adapter registers it with `nnsight.register` and imports its functions
directly. Every backend patches the residual through `patch_residual`, so there is one implementation.
"""

import torch


def patch_residual(hidden: torch.Tensor, positions: torch.Tensor, vectors: torch.Tensor, add: bool) -> torch.Tensor:
    """Write `vectors[b]` at `positions[b]` of a [B, T, d] residual (replace, or add when `add`); a new tensor."""
    mask = positions.to(hidden.device)[..., None]
    vec = vectors.to(device=hidden.device, dtype=hidden.dtype)[:, None, :]
    if add:
        return hidden + mask * vec
    return torch.where(mask, vec, hidden)


def padded_positions(positions: torch.Tensor, length: int) -> torch.Tensor:
    """Placeholder mask [B, P] of the prompt, extended with False to `length` >= P (for whole-sequence passes)."""
    extra = length - positions.shape[1]
    return torch.nn.functional.pad(positions, (0, extra)) if extra > 0 else positions
