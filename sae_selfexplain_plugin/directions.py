"""Feature directions and ids as the engine takes them: checked once, with errors that name the fix."""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch

from .errors import InputError


def check_directions(directions: torch.Tensor, d_model: int, feature_ids: Sequence[int] | None = None) -> torch.Tensor:
    """`directions` as [n_features, d_model] on the CPU, or one InputError naming what is wrong with them."""
    if not isinstance(directions, torch.Tensor):
        raise InputError(f"directions must be a torch.Tensor [n_features, d_model], got {type(directions)}.")
    if directions.is_complex() or directions.dtype == torch.bool:
        raise InputError(f"directions must be real numbers, got dtype {directions.dtype}.")
    if directions.is_meta:
        raise InputError("directions are on the meta device (no values); load the SAE's weights first.")
    if directions.ndim == 1:
        directions = directions[None]
    if directions.ndim != 2:
        raise InputError(f"directions must be [n_features, d_model], got shape {tuple(directions.shape)}.")
    if directions.shape[0] == 0:
        raise InputError("the feature list is empty: pass at least one direction.")
    if directions.shape[1] != d_model:
        raise InputError(
            f"direction dimension {directions.shape[1]} != the model's d_model {d_model}: "
            "the directions come from a different model or hook "
            "(an SAE's decoder rows, W_dec, are [d_sae, d_in])."
        )
    if feature_ids is not None and len(feature_ids) != len(directions):
        raise InputError(f"got {len(directions)} directions but {len(feature_ids)} feature ids; pass one id per row.")
    problems = bad_directions(directions)
    if problems:
        ids = list(range(len(directions))) if feature_ids is None else list(feature_ids)
        named = [f"feature {ids[row]}: {why}" for row, why in list(problems.items())[:10]]
        raise InputError(f"cannot explain {len(problems)} directions ({'; '.join(named)}); drop or repair them.")
    return directions.detach().cpu()


def bad_directions(directions: torch.Tensor) -> dict[int, str]:
    """Rows that have no direction to inject, with why: NaN or inf values, or all zeros."""
    rows = directions.detach().float()
    finite = torch.isfinite(rows).all(dim=-1)
    zero = finite & (rows.norm(dim=-1) == 0)
    problems = {int(r): "NaN or inf values" for r in torch.nonzero(~finite).flatten()}
    problems.update({int(r): "all zeros" for r in torch.nonzero(zero).flatten()})
    return dict(sorted(problems.items()))


def feature_id_list(feature_ids: Sequence[int] | torch.Tensor) -> list[int]:
    """Feature ids as non-negative ints; 1.7, -1, True or "3" are refused, not coerced."""
    if isinstance(feature_ids, torch.Tensor):
        if feature_ids.is_floating_point() or feature_ids.is_complex() or feature_ids.dtype == torch.bool:
            raise InputError(f"feature ids must be integers, got a {feature_ids.dtype} tensor.")
        feature_ids = feature_ids.flatten().tolist()
    ids: list[int] = []
    for i in feature_ids:
        if isinstance(i, bool) or not hasattr(i, "__index__"):
            raise InputError(f"feature ids must be integers, got {i!r} ({type(i).__name__}).")
        ids.append(operator.index(i))
    negative = [i for i in ids if i < 0]
    if negative:
        raise InputError(f"feature ids must be >= 0, got {negative[:5]}.")
    return ids
