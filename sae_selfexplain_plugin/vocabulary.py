"""Vocabulary probe: which of the model's own tokens make a feature fire, with no corpus and no judge.

Every vocabulary token that begins a word is read once, as the word after a short neutral context
("<bos> The <token>"), and the residual entering the SAE's input block at that token goes through the
SAE's encoder. A feature's probe label is its most-activating distinct tokens. One pass over the
vocabulary serves every feature at once, so a whole SAE costs about what one feature costs.

It complements the self-explanation: it reads what the model *responds to* rather than what it *says*
when the direction is injected, and it cannot see features that need more context than one word
(positions, syntax). The encoder is a callable from the caller, so this module knows no SAE library.

The direction lens reads the same residuals without an encoder: a direction's label is the tokens whose
centred residual points most along it, so it needs what a self-explanation needs (the direction and the
model) and serves as the measure of what injecting and generating add to it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

from .backend import Backend
from .decoding import word_tokens
from .errors import InputError

PROBE_CONTEXT = " The"  # a common word before each probed token: position 0 is an attention sink
WORD_START_MARKS = ("Ġ", "▁")  # byte-level BPE and SentencePiece spell a leading space this way
BATCH_SIZE = 512  # vocabulary tokens per prompt pass (one request per batch on NDIF)


def word_start_tokens(tokenizer: Any) -> list[int]:
    """Ids of non-special tokens that begin a word (leading-space mark) and have a letter or digit; every
    such word token when the tokenizer marks no word starts."""
    n = len(tokenizer)
    words = word_tokens(tokenizer, n)
    special = set(tokenizer.all_special_ids)
    usable = [i for i in range(n) if words[i] and i not in special]
    pieces = tokenizer.convert_ids_to_tokens(usable)
    starts = [i for i, p in zip(usable, pieces) if p and p.startswith(WORD_START_MARKS)]
    return starts or usable


@torch.no_grad()  # torch's decorator sets the mode only while the generator runs, not between its yields
def vocabulary_residuals(
    backend: Backend,
    layer: int,
    *,
    prepend_bos: bool = True,
    context: str = PROBE_CONTEXT,
    batch_size: int = BATCH_SIZE,
    progress: Callable[[int], None] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Per batch of word-start tokens: their ids [n] and the residual entering block `layer` at each, read
    as the word after `context` ([n, d_model], on the backend's device). `progress` gets each batch's size."""
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1 (got {batch_size}).")
    tokenizer = backend.tokenizer
    candidates = torch.tensor(word_start_tokens(tokenizer))
    bos = [tokenizer.bos_token_id] if prepend_bos and tokenizer.bos_token_id is not None else []
    prefix = torch.tensor([*bos, *tokenizer(context, add_special_tokens=False)["input_ids"]], dtype=torch.long)
    for start in range(0, len(candidates), batch_size):
        chunk = candidates[start : start + batch_size]
        ids = torch.cat([prefix.expand(len(chunk), -1), chunk[:, None]], 1)
        yield chunk, backend.residual(ids, torch.ones_like(ids), layer)[:, -1]
        if progress is not None:
            progress(len(chunk))


@torch.no_grad()
def probe_vocabulary(
    backend: Backend,
    layer: int,
    encode: Callable[[torch.Tensor], torch.Tensor],
    n_features: int,
    *,
    k: int = 3,
    prepend_bos: bool = True,
    context: str = PROBE_CONTEXT,
    batch_size: int = BATCH_SIZE,
    progress: Callable[[int], None] | None = None,
) -> list[list[tuple[str, float]]]:
    """Per feature, its k most-activating distinct word tokens (text, activation), best first.

    `encode` maps residuals entering block `layer`, [n, d_model], to the features' activations
    [n, n_features]. Only tokens with a positive activation count, so a feature no single word evokes gets
    an empty list. Tokens that differ only in case or spacing count once. `progress` gets the number of
    tokens probed after each batch (`probe_size` in all)."""
    if k < 1 or batch_size < 1:
        raise InputError(f"k and batch_size must be >= 1 (got k={k}, batch_size={batch_size}).")
    batches = vocabulary_residuals(
        backend, layer, prepend_bos=prepend_bos, context=context, batch_size=batch_size, progress=progress
    )
    return probe_batches(backend.tokenizer, batches, encode, n_features, k)


@torch.no_grad()
def probe_batches(
    tokenizer: Any,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    encode: Callable[[torch.Tensor], torch.Tensor],
    n_features: int,
    k: int = 3,
) -> list[list[tuple[str, float]]]:
    """`probe_vocabulary` over batches already read (`vocabulary_residuals`), so that one read of the
    vocabulary can serve the probe and the direction lens."""
    if k < 1:
        raise InputError(f"k must be >= 1 (got {k}).")
    keep = 8 * k  # enough candidates that case and spacing variants do not crowd out k distinct words
    best_values = torch.empty(0, n_features)
    best_ids = torch.empty(0, n_features, dtype=torch.long)
    for chunk, resid in batches:
        acts = encode(resid).float().cpu()
        if acts.shape != (len(chunk), n_features):
            raise InputError(
                f"encode returned activations of shape {tuple(acts.shape)}; expected {(len(chunk), n_features)} "
                "(one row per residual, one column per feature)."
            )
        values = torch.cat([best_values, acts])
        ids_all = torch.cat([best_ids, chunk[:, None].expand(-1, n_features)])
        top = values.topk(min(keep, len(values)), dim=0)
        best_values, best_ids = top.values, ids_all.gather(0, top.indices)
    texts = _texts(tokenizer, best_ids)
    return [_distinct(best_values[:, f], best_ids[:, f], texts, k) for f in range(n_features)]


def centred_vocabulary(batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Word-start token ids [n] and their residuals from `batches` (`vocabulary_residuals`) minus the mean
    over all of them, as unit rows [n, d_model] (float32, CPU): the direction lens's table."""
    ids, rows = [], []
    for chunk, resid in batches:
        ids.append(chunk)
        rows.append(resid.float().cpu())
    table = torch.cat(rows)
    table -= table.mean(0)
    table /= table.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return torch.cat(ids), table


@torch.no_grad()
def direction_lens(
    backend: Backend,
    layer: int,
    directions: torch.Tensor,
    *,
    k: int = 3,
    prepend_bos: bool = True,
    context: str = PROBE_CONTEXT,
    batch_size: int = BATCH_SIZE,
    progress: Callable[[int], None] | None = None,
) -> list[list[tuple[str, float]]]:
    """Per direction [n, d_model], the k distinct word tokens whose residual entering block `layer` points
    most along it (text, cosine), best first: a lens that needs only the direction and the model.

    Each word-start token's residual is read as for the probe, minus the mean over all of them (the part
    every token shares, which an SAE decoder row lacks), then compared by cosine (`centred_vocabulary`,
    `nearest_tokens`). It keeps the vocabulary's residuals in memory (tokens x d_model floats: 73 MB for
    SmolLM2-135M). Not a self-explanation: nothing is injected and the model says nothing."""
    _check_lens_input(directions, backend.d_model, k)
    if len(directions) == 0:
        return []  # nothing to label: skip the pass over the vocabulary
    batches = vocabulary_residuals(
        backend, layer, prepend_bos=prepend_bos, context=context, batch_size=batch_size, progress=progress
    )
    ids, table = centred_vocabulary(batches)
    return nearest_tokens(backend.tokenizer, ids, table, directions, k)


@torch.no_grad()
def nearest_tokens(
    tokenizer: Any, ids: torch.Tensor, table: torch.Tensor, directions: torch.Tensor, k: int = 3
) -> list[list[tuple[str, float]]]:
    """Per direction, the k distinct tokens of `table` (`centred_vocabulary`'s unit rows, one per id) of
    highest positive cosine with it (text, cosine), best first."""
    _check_lens_input(directions, table.shape[1], k)
    if len(directions) == 0:
        return []
    units = directions.detach().float().cpu()
    units = units / units.norm(dim=1, keepdim=True)
    keep = min(8 * k, len(table))  # as the probe: room for case and spacing variants
    values, best = [], []
    for start in range(0, len(units), 256):  # bounds the [directions, tokens] similarity matrix
        top = (units[start : start + 256] @ table.T).topk(keep, dim=1)
        values.append(top.values)
        best.append(ids[top.indices])
    best_values, best_ids = torch.cat(values), torch.cat(best)
    texts = _texts(tokenizer, best_ids)
    return [_distinct(best_values[i], best_ids[i], texts, k) for i in range(len(units))]


def _check_lens_input(directions: torch.Tensor, d_model: int, k: int) -> None:
    if k < 1:
        raise InputError(f"k must be >= 1 (got {k}).")
    if directions.ndim != 2 or directions.shape[1] != d_model:
        raise InputError(
            f"directions must be [n, d_model={d_model}], got {tuple(directions.shape)}; pass one row per direction."
        )
    norms = directions.detach().float().norm(dim=1)
    if not torch.all(torch.isfinite(norms) & (norms > 0)):
        raise InputError("every direction needs a finite, non-zero norm; drop zero or NaN rows first.")


def probe_size(tokenizer: Any) -> int:
    """How many tokens `probe_vocabulary` reads (one short prompt pass each, batched)."""
    return len(word_start_tokens(tokenizer))


def probe_label(tokens: Sequence[tuple[str, float]]) -> str:
    """The probe's tokens as one label text, as the top-tokens baseline writes its tokens."""
    return ", ".join(text for text, _ in tokens)


def _texts(tokenizer: Any, ids: torch.Tensor) -> dict[int, str]:
    return {i: tokenizer.decode([i]).strip() for i in set(ids.flatten().tolist())}


def _distinct(values: torch.Tensor, ids: torch.Tensor, texts: dict[int, str], k: int) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    seen: set[str] = set()
    for value, i in zip(values.tolist(), ids.tolist()):
        text = texts[i]
        if value <= 0 or len(out) == k:
            break
        if text and text.lower() not in seen:
            seen.add(text.lower())
            out.append((text, value))
    return out
