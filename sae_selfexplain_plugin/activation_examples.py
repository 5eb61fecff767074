"""Activation examples of SAE features: each feature's top-activating contexts and random non-activating ones.

Self-explanation never needs them; evaluation and reports do (a person, or a scorer, compares an explanation with
what the feature fires on). Built in one streaming pass over held-apart text (`ExampleCollector`), stored in one
safetensors file (token windows as ids + a table of their strings, activations in fp16).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import InputError
from .files import atomic_writer

EXAMPLES_FILE = "activation_examples.safetensors"
_FORMAT = "sae-selfexplain-activation-examples/1"


@dataclass(frozen=True)
class Context:
    """A window of text (one string per token) and the feature's activation at each token."""

    tokens: list[str]
    values: list[float]

    @property
    def text(self) -> str:
        return "".join(self.tokens)

    @property
    def max_value(self) -> float:
        return max(self.values, default=0.0)


@dataclass(frozen=True)
class FeatureExamples:
    feature: int
    frequency: float  # fraction of held-apart tokens on which the feature fires
    top: list[Context]  # strongest first
    random: list[Context]  # contexts where the feature does not fire at all

    def peak_tokens(self) -> list[str]:
        """The token (stripped) at which each top context peaks, strongest context first."""
        return [ctx.tokens[max(range(len(ctx.values)), key=ctx.values.__getitem__)].strip() for ctx in self.top]

    def top_tokens(self, n: int = 5) -> list[str]:
        """The distinct tokens at which the top contexts peak, strongest first (the cheap auto-interp baseline)."""
        return list(dict.fromkeys(t for t in self.peak_tokens() if t))[:n]

    def dominant_token(self, min_count: int) -> str | None:
        """The peak token of at least `min_count` top contexts, compared case-insensitively (a token
        feature), or None."""
        counts = Counter(t.lower() for t in self.peak_tokens() if t)
        token, count = max(counts.items(), key=lambda kv: kv[1], default=("", 0))
        return token if count >= min_count else None


class ActivationExamples:
    """Examples for every feature of one SAE; `examples[i]` is feature i's `FeatureExamples`."""

    def __init__(self, tensors: dict[str, torch.Tensor], vocab: dict[int, str]) -> None:
        self._t = tensors
        self._vocab = vocab

    @property
    def d_sae(self) -> int:
        return int(self._t["frequency"].shape[0])

    def live_features(self) -> list[int]:
        return [int(i) for i in torch.nonzero(self._t["frequency"] > 0).flatten()]

    def __getitem__(self, feature: int) -> FeatureExamples:
        if not 0 <= feature < self.d_sae:
            raise InputError(f"feature {feature} is out of range: these examples cover features 0..{self.d_sae - 1}.")
        t = self._t
        top = [
            self._context(t["top_tokens"][feature, j], t["top_values"][feature, j])
            for j in range(t["top_tokens"].shape[1])
            if t["top_values"][feature, j].max() > 0
        ]
        pool = t["pool_tokens"]
        rand = [self._context(pool[int(j)], torch.zeros(pool.shape[1])) for j in t["random_index"][feature] if j >= 0]
        return FeatureExamples(feature, float(t["frequency"][feature]), top, rand)

    def _context(self, ids: torch.Tensor, values: torch.Tensor) -> Context:
        return Context([self._vocab[int(i)] for i in ids], [round(float(v), 4) for v in values])

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save

        meta = {"format": _FORMAT, "vocab": json.dumps({str(k): v for k, v in sorted(self._vocab.items())})}
        data = save({k: v.contiguous() for k, v in self._t.items()}, metadata=meta)
        with atomic_writer(path, "wb") as f:
            f.write(data)

    @classmethod
    def load(cls, path: str | Path) -> ActivationExamples:
        from safetensors import safe_open

        path = Path(path)
        if not path.exists():
            raise InputError(f"no activation examples at {path}; build them with scripts/train_demo_sae.py.")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
        except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
            raise InputError(f"{path} is not a readable activation-examples file ({e}); rebuild it.") from e
        if meta.get("format") != _FORMAT:
            raise InputError(
                f"{path} is not an activation-examples file of this version (format {meta.get('format')})."
            )
        vocab = {int(k): v for k, v in json.loads(meta["vocab"]).items()}
        return cls(tensors, vocab)


class ExampleCollector:
    """Streams (token ids, feature activations) batches and keeps, per feature, the `top_k` contexts with the
    highest peak activation (a `window` of tokens around the peak) and `n_random` contexts from a fixed pool of
    random windows in which the feature never fires."""

    def __init__(
        self, d_sae: int, top_k: int = 10, window: int = 24, n_random: int = 10, pool_size: int = 256, seed: int = 0
    ) -> None:
        self.d_sae, self.top_k, self.window, self.n_random, self.pool_size = d_sae, top_k, window, n_random, pool_size
        self._g = torch.Generator().manual_seed(seed)
        self.best = torch.zeros(d_sae, top_k)  # peak activation of each kept context
        self.top_tokens = torch.zeros(d_sae, top_k, window, dtype=torch.int32)
        self.top_values = torch.zeros(d_sae, top_k, window)
        self.fires = torch.zeros(d_sae)
        self.n_tokens = 0
        self.pool_tokens: list[torch.Tensor] = []
        self.pool_fires: list[torch.Tensor] = []  # [d_sae] bool per pool window

    @torch.no_grad()
    def add(self, token_ids: torch.Tensor, acts: torch.Tensor) -> None:
        """token_ids [B, T]; acts [B, T, d_sae] (T >= window)."""
        b, t, _f = acts.shape
        if t < self.window:
            raise InputError(f"rows of {t} tokens are shorter than the example window ({self.window}).")
        acts = acts.float()
        self.fires += (acts > 0).sum((0, 1)).float()
        self.n_tokens += b * t
        self._add_pool(token_ids, acts)

        peak, where = acts.max(dim=1)  # [B, F]: each row's peak per feature and its position
        values = torch.cat([self.best, peak.T], dim=1)  # [F, K + B]
        keep = values.topk(self.top_k, dim=1).indices  # [F, K]
        is_new = keep >= self.top_k
        if not bool(is_new.any()):
            return
        feat, slot = torch.nonzero(is_new, as_tuple=True)
        row = keep[feat, slot] - self.top_k
        start = (where[row, feat] - self.window * 3 // 4).clamp(0, t - self.window)
        pos = start[:, None] + torch.arange(self.window)
        new_tokens = token_ids[row[:, None], pos].to(torch.int32)
        new_values = acts[row[:, None], pos, feat[:, None]]
        old_slot = keep.clamp(max=self.top_k - 1)
        tokens = torch.gather(self.top_tokens, 1, old_slot[..., None].expand(-1, -1, self.window))
        vals = torch.gather(self.top_values, 1, old_slot[..., None].expand(-1, -1, self.window))
        tokens[feat, slot], vals[feat, slot] = new_tokens, new_values
        self.top_tokens, self.top_values = tokens, vals
        self.best = torch.gather(values, 1, keep)

    def _add_pool(self, token_ids: torch.Tensor, acts: torch.Tensor) -> None:
        t = acts.shape[1]
        for i in range(min(len(acts), self.pool_size - len(self.pool_tokens))):
            s = int(torch.randint(0, t - self.window + 1, (1,), generator=self._g))
            self.pool_tokens.append(token_ids[i, s : s + self.window].to(torch.int32))
            self.pool_fires.append((acts[i, s : s + self.window] > 0).any(0))

    def dead_fraction(self) -> float:
        """Fraction of features that never fired on the text seen so far."""
        return float((self.fires == 0).float().mean())

    def finish(self, decode: Callable[[int], str]) -> ActivationExamples:
        """The collected examples; `decode(token_id)` gives a token's text."""
        if not self.pool_tokens:
            raise InputError("no text was added: the examples need at least one batch.")
        fires = torch.stack(self.pool_fires, dim=1)  # [F, pool]
        score = torch.rand(fires.shape, generator=self._g) + fires.float() * 2  # random order, firing windows last
        order = score.argsort(dim=1)[:, : self.n_random]
        random_index = torch.where(torch.gather(fires, 1, order), -1, order).to(torch.int32)
        pool = torch.stack(self.pool_tokens)
        tensors = {
            "frequency": self.fires / max(self.n_tokens, 1),
            "top_tokens": self.top_tokens,
            "top_values": self.top_values.half(),
            "pool_tokens": pool,
            "random_index": random_index,
        }
        ids = torch.unique(torch.cat([self.top_tokens.flatten(), pool.flatten()])).tolist()
        return ActivationExamples(tensors, {int(i): decode(int(i)) for i in ids})
