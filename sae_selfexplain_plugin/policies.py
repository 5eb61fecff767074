"""Scale-selection policies: from a feature's metric sweep (one value per scale) to a ranking of scales.

    ranking = rank_scales(sweep, config)     # indices into sweep["scale"], best first, at most keep_top
    scales = ranked_scales(sweep, config)    # the same, as scales
    explainable(sweep, config)               # False: flag the feature instead of trusting a label

The metrics (scale_metrics.py) are baseline-subtracted: their value at scale 0 is 0.
- fixed: the scales nearest config.chosen_scale.
- max-self-similarity: highest self-similarity first.
- composite (the original work): a * minmax(self_similarity) - (1 - a) * minmax(cross_entropy).
- knee (ours): the smallest scale whose self-similarity reaches 80% of the sweep's maximum, then the next
  larger ones: the feature is already "held" at the answer position there, and larger scales mostly add
  gibberish (cross-entropy keeps rising while self-similarity saturates).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .config import SelfExplainConfig
from .errors import InputError

Sweep = dict[str, Any]  # "scale", "self_similarity", "entropy", "cross_entropy": a list per scale
KNEE_FRACTION = 0.8  # tuned on word recovery, Gemma block 6 (docs/scale_policies.md)


def rank_scales(sweep: Sweep, config: SelfExplainConfig, policy: str | None = None) -> list[int]:
    """Indices of sweep["scale"], best first, at most config.keep_top of them."""
    policy = policy or config.policy
    scales = sweep["scale"]
    if policy == "fixed":
        order = sorted(range(len(scales)), key=lambda i: (abs(scales[i] - config.chosen_scale), scales[i]))
        return order[: config.keep_top]
    _need(sweep, policy)
    allowed = [i for i, s in enumerate(scales) if s >= config.min_scale and s > 0] or [
        i for i, s in enumerate(scales) if s > 0
    ]
    if not allowed:
        raise InputError("every scale in the sweep is 0; a metric policy needs scales > 0.")
    ss = sweep["self_similarity"]
    if policy == "max-self-similarity":
        score = {i: ss[i] for i in allowed}
    elif policy == "composite":
        a = config.composite_weight
        ss_n, ce_n = _minmax([ss[i] for i in allowed]), _minmax([sweep["cross_entropy"][i] for i in allowed])
        score = {i: a * x - (1 - a) * y for i, x, y in zip(allowed, ss_n, ce_n)}
    elif policy == "knee":
        best = max(ss[i] for i in allowed)
        near = best - (1 - KNEE_FRACTION) * abs(best)  # 80% of a positive maximum; also sane when all are < 0
        knee = min((i for i in allowed if ss[i] >= near), key=lambda i: scales[i])
        # the knee first, then the larger scales nearest first, then the smaller ones
        above = sorted((i for i in allowed if scales[i] > scales[knee]), key=lambda i: scales[i])
        below = sorted((i for i in allowed if scales[i] < scales[knee]), key=lambda i: -scales[i])
        order = [knee, *above, *below]
        score = {i: -float(rank) for rank, i in enumerate(order)}
    else:
        raise InputError(f"unknown policy {policy!r}.")
    order = sorted(allowed, key=lambda i: (-score[i], scales[i]))
    return order[: config.keep_top]


def ranked_scales(sweep: Sweep, config: SelfExplainConfig, policy: str | None = None) -> list[float]:
    """The scales themselves, best first (rank_scales gives their indices)."""
    return [sweep["scale"][i] for i in rank_scales(sweep, config, policy)]


def explainable(sweep: Sweep, config: SelfExplainConfig) -> bool:
    """False when self-similarity never reaches the threshold at any scale > 0 (the original work's filter)."""
    ss = sweep.get("self_similarity") or []
    values = [v for v, s in zip(ss, sweep["scale"]) if s > 0 and math.isfinite(v)]
    return not values or max(values) >= config.explainable_threshold


def _need(sweep: Sweep, policy: str) -> None:
    missing = [k for k in ("self_similarity", "cross_entropy") if not sweep.get(k)]
    if missing:
        raise InputError(
            f"policy {policy!r} needs the metric sweep ({missing} missing): the backend must support prompt "
            "probes (transformers models do), or use policy='fixed'."
        )


def _minmax(values: Sequence[float]) -> list[float]:
    lo, hi = min(values), max(values)
    return [0.0 if hi == lo else (v - lo) / (hi - lo) for v in values]
