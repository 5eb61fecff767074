"""The one interface the engine uses to run a model.

A backend (transformers, TransformerLens, nnsight, ...) turns a GenerationRequest into texts. Backends
that can run one forward step at a time with a KV cache get the batching, stopping and row-dropping
logic for free from `decoding.decode` by implementing `StepModel`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import torch

from .errors import InputError
from .ops import patch_residual

StopReason = Literal["stop_string", "eos", "length"]


@dataclass
class Injection:
    """Write `vectors[b]` into the residual stream entering block `layer`, at `positions[b]` of row b.

    Applies on the prompt pass only; the KV cache carries the patched positions forward.
    """

    layer: int
    positions: torch.Tensor  # bool [B, T]
    vectors: torch.Tensor  # [B, d_model], or [B, K, d_model]: one per placeholder slot (ops.patch_residual)
    mode: Literal["replace", "add"] = "replace"

    def apply(self, hidden: torch.Tensor) -> torch.Tensor:
        """Patched copy of a [B, T, d] residual (the original is left untouched)."""
        return patch_residual(hidden, self.positions, self.vectors, add=self.mode == "add")


@dataclass
class GenerationRequest:
    """A batch of left-padded prompts, each with its own injected vector."""

    input_ids: torch.Tensor  # long [B, T], left-padded
    attention_mask: torch.Tensor  # long [B, T], 0 on padding
    injection: Injection
    max_new_tokens: int
    stop_strings: tuple[str, ...] = ()
    temperature: float = 0.0  # 0 = greedy
    seed: int = 0
    # Never generate a word token (one with a letter or digit: `word_tokens`) twice in one row: greedy
    # decoding of a list label otherwise repeats its first item ("idea, idea, idea").
    no_repeats: bool = False
    # Blocks whose input residual at the last prompt position to return (GenerationResult.prompt_residuals),
    # read on the prompt pass itself: the scale metrics then cost no extra pass. Backends may ignore it.
    probe_layers: tuple[int, ...] = ()


@dataclass
class GenerationResult:
    """Per row: generated token ids (up to the stop), the text cut before the stop, and why it stopped."""

    tokens: list[list[int]]
    texts: list[str]
    stop_reasons: list[StopReason]
    # With request.probe_layers, read at the last prompt position on the injected prompt pass: the residuals
    # entering those blocks [B, len(probe_layers), d_model] (set by a backend that reads them) and the
    # next-token logits [B, vocab] (set by the decode loop).
    prompt_residuals: torch.Tensor | None = None
    prompt_logits: torch.Tensor | None = None


@runtime_checkable
class Backend(Protocol):
    """What the engine needs from a model."""

    @property
    def tokenizer(self) -> Any:
        """A Hugging Face fast tokenizer (offsets, chat template, decode)."""

    @property
    def n_layers(self) -> int: ...

    @property
    def d_model(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def model_id(self) -> str:
        """A name for the model, recorded with every result."""

    def residual(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, layer: int) -> torch.Tensor:
        """The residual stream entering block `layer`, [B, T, d_model], with no injection."""

    def generate(self, request: GenerationRequest) -> GenerationResult:
        """Generate a continuation for every row, injecting on the prompt pass."""


class StepModel(Protocol):
    """A model that can prefill with injection and then decode one token at a time with a KV cache."""

    def prefill(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, injection: Injection
    ) -> tuple[torch.Tensor, Any]:
        """Run the prompt with the injection; return last-position logits [B, V] and the cache."""

    def step(self, token_ids: torch.Tensor, attention_mask: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
        """Feed one new token per row ([B]); `attention_mask` covers prompt + generated so far."""

    def select_rows(self, cache: Any, rows: torch.Tensor) -> Any:
        """Keep only `rows` of the cache (finished rows leave the batch)."""


@runtime_checkable
class ProbeModel(Protocol):
    """Prompt passes that read what the scale metrics need (scale_metrics.py); optional for a backend."""

    def probe(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, injection: Injection, layers: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One prompt pass with the injection: the residuals entering each block of `layers` at the last
        position [B, len(layers), d_model] and the next-token logits there [B, vocab]."""

    def mean_token_embedding(self) -> torch.Tensor:
        """The mean of the input token embeddings [d_model] (the neutral baseline's direction)."""

    def token_logprobs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, injection: Injection
    ) -> torch.Tensor:
        """Teacher-forced: log P(input_ids[:, t + 1] | input_ids[:, :t + 1]) with the injection, [B, T - 1]."""


def context_length(backend: Backend) -> int | None:
    """The most tokens (prompt plus generated) the backend's model takes: its optional `context_length`
    property (not in `Backend`, so that backends written before it still qualify); None where unknown."""
    n = getattr(backend, "context_length", None)
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def check_layer(layer: int, n_layers: int) -> None:
    """Raise InputError unless `layer` names a block of a model with `n_layers` blocks."""
    if not 0 <= layer < n_layers:
        raise InputError(
            f"layer {layer} is out of range: the model has {n_layers} blocks, "
            f"so inject at a layer in 0..{n_layers - 1}."
        )


def left_pad(sequences: list[list[int]] | list[tuple[int, ...]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token sequences into (input_ids, attention_mask)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        if seq:
            ids[i, width - len(seq) :] = torch.tensor(list(seq), dtype=torch.long)
            mask[i, width - len(seq) :] = 1
    return ids, mask


def plain_prompts(backend: Backend, prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor, Injection]:
    """Prompts as a left-padded batch on the backend's device, with an injection that writes nothing: for a
    model that only reads (a judge, an explainer, a writer) through the same backend methods."""
    pad = getattr(backend.tokenizer, "pad_token_id", None) or 0
    ids, mask = left_pad([list(p) for p in prompts], pad)
    ids, mask = ids.to(backend.device), mask.to(backend.device)
    nowhere = torch.zeros_like(ids, dtype=torch.bool)
    nothing = Injection(0, nowhere, torch.zeros(len(ids), backend.d_model, device=ids.device))
    return ids, mask, nothing


def generate_texts(
    backend: Backend, prompts: Sequence[Sequence[int]], max_new_tokens: int, batch_size: int = 16
) -> list[str]:
    """Greedy continuations of plain prompts (no injection), cut at the first line break, stripped."""
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        ids, mask, nothing = plain_prompts(backend, prompts[start : start + batch_size])
        result = backend.generate(GenerationRequest(ids, mask, nothing, max_new_tokens, stop_strings=("\n",)))
        out += [text.strip() for text in result.texts]
    return out


def shared_prefix_length(input_ids: torch.Tensor, attention_mask: torch.Tensor, injection: Injection) -> int:
    """How many leading tokens all rows share: the same ids, no padding, nothing injected.

    Their keys and values do not depend on the row, so a backend can compute them once (batch 1) and
    start every prompt pass from that cache. At least the last token is left to run."""
    shared = (
        (input_ids == input_ids[:1]).all(0)
        & attention_mask.bool().all(0)
        & ~injection.positions.to(input_ids.device).any(0)
    )
    shared[-1] = False
    return int((~shared).nonzero()[0])


class PrefixCache:
    """KV caches of shared prompt prefixes (the template before its first placeholder), one per distinct
    prefix, computed on first use by `run_prefix(ids [1, n])` and kept (the newest `size`).

    A backend's prompt passes start from the cache `lookup` returns instead of recomputing the prefix for
    every row of every batch. `enabled = False` turns it off (benchmarks compare both)."""

    min_length = 4  # shorter shared prefixes are not worth a cache

    def __init__(
        self, run_prefix: Callable[[torch.Tensor], Any], size: int = 4, state: Callable[[], Any] | None = None
    ) -> None:
        self.run_prefix = run_prefix
        self.size = size
        # what else a prefix pass depends on (e.g. SAEs attached to the model): a change means a new cache
        self.state = state
        self.enabled = True
        self._caches: dict[tuple[Any, ...], Any] = {}
        self._primed: set[tuple[Any, ...]] = set()  # keys of `prime`d prefixes (still in _caches)

    def lookup(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, injection: Injection) -> tuple[int, Any]:
        """(length, one-row cache) of the batch's shared prefix, or (0, None) where there is none to reuse.
        A batch whose own shared prefix is new but starts with a `prime`d one reuses the longest such.

        The first lookup of a prefix runs the model: do it before registering hooks that must not see it."""
        n = shared_prefix_length(input_ids, attention_mask, injection) if self.enabled else 0
        if n < self.min_length:
            return 0, None
        head, tokens = self._head(input_ids), input_ids[0, :n].tolist()
        if (*head, *tokens) not in self._caches:
            h = len(head)
            primed = [k for k in self._primed if k[:h] == head and list(k[h:]) == tokens[: len(k) - h]]
            if primed:
                longest = max(primed, key=len)
                return len(longest) - h, self._caches[longest]
        return n, self._cache(head, input_ids[:1, :n])

    def prime(self, ids: torch.Tensor) -> None:
        """Compute the cache of `ids` [1, n] now (if new), for batches that start with these tokens but share
        more among themselves (a judge's label prompt, before contexts batched by length)."""
        if self.enabled and ids.shape[1] >= self.min_length:
            self._cache(self._head(ids), ids)
            self._primed.add((*self._head(ids), *ids[0].tolist()))

    def _head(self, ids: torch.Tensor) -> tuple[Any, ...]:
        return (str(ids.device), self.state() if self.state else None)

    def _cache(self, head: tuple[Any, ...], ids: torch.Tensor) -> Any:
        key = (*head, *ids[0].tolist())
        if key not in self._caches:
            if len(self._caches) >= self.size:
                evicted = next(iter(self._caches))
                del self._caches[evicted]
                self._primed.discard(evicted)
            self._caches[key] = self.run_prefix(ids)
        return self._caches[key]


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore left padding: the first real token of every row is position 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
