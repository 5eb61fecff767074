"""Scores for explanations with no judge model: the arithmetic (adapters/apps/evaluation.py feeds it real data).

- activation check: does the explanation text make the feature fire more than the other features'
  explanations do? Score = the fraction of other explanations that evoke the feature less (ties count half):
  1 = the feature's own explanation evokes it most, 0.5 = chance.
- embedding score (after delphi's embedding scorer): AUROC of the cosine similarity between the explanation and
  contexts, at separating the feature's top-activating contexts from contexts where it does not fire.

A score that cannot be computed is None with its reason, never an exception mid-run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Score:
    value: float | None
    reason: str = ""  # why value is None

    def to_dict(self) -> dict[str, float | str | None]:
        return {"value": self.value, "reason": self.reason} if self.value is None else {"value": self.value}


def auroc(positives: torch.Tensor, negatives: torch.Tensor) -> float:
    """P(a random positive scores above a random negative), ties counted half (the Mann-Whitney U form)."""
    if positives.numel() == 0 or negatives.numel() == 0:
        raise ValueError("AUROC needs at least one positive and one negative.")
    diff = positives.float()[:, None] - negatives.float()[None, :]
    return float((diff > 0).float().mean() + 0.5 * (diff == 0).float().mean())


def activation_check(activations: torch.Tensor, has_text: torch.Tensor | None = None) -> list[Score]:
    """activations[g, f]: how strongly feature f fires on feature g's explanation (e.g. its max over tokens).
    Returns, per feature f, the fraction of other features' explanations g that evoke f less than f's own."""
    n = activations.shape[0]
    has_text = torch.ones(n, dtype=torch.bool) if has_text is None else has_text
    scores = []
    for f in range(n):
        if not has_text[f]:
            scores.append(Score(None, "empty explanation"))
            continue
        others = [g for g in range(n) if g != f and has_text[g]]
        if not others:
            scores.append(Score(None, "no other explanations to compare with"))
            continue
        own, rest = activations[f, f], activations[others, f]
        scores.append(Score(float((rest < own).float().mean() + 0.5 * (rest == own).float().mean())))
    return scores


def embedding_score(explanation: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor) -> Score:
    """AUROC of cos(explanation, context) at telling positive contexts [P, e] from negative ones [N, e]."""
    if positives.shape[0] == 0 or negatives.shape[0] == 0:
        return Score(None, "no activation examples (needs top-activating and non-activating contexts)")
    cos = torch.nn.functional.cosine_similarity
    return Score(auroc(cos(explanation[None], positives), cos(explanation[None], negatives)))


def detection(firing: torch.Tensor, quiet: torch.Tensor) -> tuple[Score, Score]:
    """A judge's margins (log P(Yes) - log P(No)) on contexts where the feature fires and where it does not:
    (balanced accuracy of answering Yes exactly when margin > 0, AUROC of the margin). 0.5 = chance for both."""
    if firing.numel() == 0 or quiet.numel() == 0:
        reason = "no activation examples (needs firing and non-firing contexts)"
        return Score(None, reason), Score(None, reason)
    accuracy = (float((firing > 0).float().mean()) + float((quiet <= 0).float().mean())) / 2
    return Score(accuracy), Score(auroc(firing, quiet))


def versus(interval: Sequence[float] | None, reference: Sequence[float] | None) -> str:
    """ "above", "below", or "tie" (the two 95% intervals overlap): how a mean compares with a reference's."""
    if not interval or not reference:
        return "-"
    if interval[0] > reference[1]:
        return "above"
    return "below" if interval[1] < reference[0] else "tie"


def bootstrap_interval(values: Sequence[float], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """The bootstrap 95% interval of the mean of `values` (percentiles of `n` resampled means, fixed seed)."""
    x = torch.tensor(list(values), dtype=torch.float64)
    if len(x) < 2:
        return (round(float(x.mean()), 4),) * 2 if len(x) else (float("nan"), float("nan"))
    g = torch.Generator().manual_seed(seed)
    means = x[torch.randint(len(x), (n, len(x)), generator=g)].mean(1)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return round(low, 4), round(high, 4)
