"""Trace-side math, pure torch: the only code that runs inside an nnsight trace, locally or on NDIF.

NDIF has no copy of this package, so the nnsight adapter registers this module with `nnsight.register`:
its source travels with each request (by value) and the server executes it; it imports torch alone, which
every NDIF server has. Inside traces: `patch_residual` (every backend patches the residual through it, so
there is one implementation) and, for `no_repeats`, `ban_generated`/`mark_generated` (which the shared
decode loop uses too).
"""

import torch


def patch_residual(hidden: torch.Tensor, positions: torch.Tensor, vectors: torch.Tensor, add: bool) -> torch.Tensor:
    """Write `vectors[b]` at `positions[b]` of a [B, T, d] residual (replace, or add when `add`); a new tensor.

    `vectors` is [B, d] (one vector for every placeholder of a row) or [B, K, d] (one per placeholder slot:
    the k-th placeholder of a row, in position order, gets `vectors[b, k]`)."""
    positions = positions.to(hidden.device)
    mask = positions[..., None]
    vec = vectors.to(device=hidden.device, dtype=hidden.dtype)
    if vec.ndim == 3:
        slot = (positions.long().cumsum(-1) - 1).clamp(min=0, max=vec.shape[1] - 1)  # [B, T]
        vec = vec.gather(1, slot[..., None].expand(-1, -1, vec.shape[-1]))
    else:
        vec = vec[:, None, :]
    if add:
        return hidden + mask * vec
    return torch.where(mask, vec, hidden)


def padded_positions(positions: torch.Tensor, length: int) -> torch.Tensor:
    """Placeholder mask [B, P] of the prompt, extended with False to `length` >= P (for whole-sequence passes)."""
    extra = length - positions.shape[1]
    return torch.nn.functional.pad(positions, (0, extra)) if extra > 0 else positions


def ban_generated(logits: torch.Tensor, banned: torch.Tensor) -> torch.Tensor:
    """`logits` [..., V] with the ids `banned` (bool, broadcastable to `logits`) set to -inf; a new tensor."""
    return logits.masked_fill(banned.to(logits.device), float("-inf"))


def mark_generated(banned: torch.Tensor, tokens: torch.Tensor, words: torch.Tensor) -> None:
    """Ban each row's newly generated token from that row from now on, if it is a word token (`words`:
    bool [V]); in place on `banned` [B, V]."""
    tokens = tokens.to(banned.device)
    banned[torch.arange(len(tokens), device=banned.device), tokens] |= words.to(banned.device)[tokens]
