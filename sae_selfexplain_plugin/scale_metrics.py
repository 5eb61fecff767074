"""The per-(feature, scale) metrics of the original self-explanation work, on prompt passes only.

Each is read at the last real prompt token (never a pad: prompts are left-padded) and baseline-subtracted,
i.e. its value at scale 0 (a zero vector in the placeholder slots) is subtracted:
- self_similarity: cosine between the feature direction and the residual entering the probe layer;
- entropy: of the next-token distribution;
- cross_entropy: -sum softmax(patched) * log_softmax(neutral), where the neutral run writes the unit-norm
  mean token embedding into the slots.
And per generated explanation, SelfIE's relevancy: |P(token | injected) - P(token | not injected)| per token.
"""

from __future__ import annotations

import torch

METRICS = ("self_similarity", "entropy", "cross_entropy")


def default_probe_layer(n_layers: int) -> int:
    """16 of 18 blocks, as in the original work, scaled to the model's depth."""
    return min(n_layers - 1, round(n_layers * 16 / 18))


def self_similarity(residual: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine between residuals [B, d] and directions [B, d]."""
    return torch.nn.functional.cosine_similarity(residual.float(), directions.float(), dim=-1)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of softmax(logits) per row, [B, V] -> [B]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def cross_entropy(logits: torch.Tensor, baseline_logits: torch.Tensor) -> torch.Tensor:
    """-sum softmax(logits) * log_softmax(baseline) per row; baseline [V] or [B, V]."""
    return -(torch.softmax(logits.float(), -1) * torch.log_softmax(baseline_logits.float(), -1)).sum(-1)


def relevancy(logp_injected: torch.Tensor, logp_plain: torch.Tensor) -> torch.Tensor:
    """Per token |P(token | injected) - P(token | not injected)| from two teacher-forced log-prob rows."""
    return (logp_injected.exp() - logp_plain.exp()).abs()
