"""Vocabulary probe: which of the model's own tokens make a feature fire, with no corpus and no judge.

Every vocabulary token that begins a word is read once, as the word after a short neutral context
("<bos> The <token>"), and the residual entering the SAE's input block at that token goes through the
SAE's encoder. A feature's probe label is its most-activating distinct tokens. One pass over the
vocabulary serves every feature at once, so a whole SAE costs about what one feature costs.

It complements the self-explanation: it reads what the model *responds to* rather than what it *says*
when the direction is injected, and it cannot see features that need more context than one word
(positions, syntax). The encoder is a callable from the caller, so this module knows no SAE library.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .backend import Backend
from .decoding import word_tokens
from .errors import InputError

PROBE_CONTEXT = " The"  # a common word before each probed token: position 0 is an attention sink
WORD_START_MARKS = ("Ġ", "▁")  # byte-level BPE and SentencePiece spell a leading space this way


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
    batch_size: int = 512,
    progress: Callable[[int], None] | None = None,
) -> list[list[tuple[str, float]]]:
    """Per feature, its k most-activating distinct word tokens (text, activation), best first.

    `encode` maps residuals entering block `layer`, [n, d_model], to the features' activations
    [n, n_features]. Only tokens with a positive activation count, so a feature no single word evokes gets
    an empty list. Tokens that differ only in case or spacing count once. `progress` gets the number of
    tokens probed after each batch (`probe_size` in all)."""
    if k < 1 or batch_size < 1:
        raise InputError(f"k and batch_size must be >= 1 (got k={k}, batch_size={batch_size}).")
    tokenizer = backend.tokenizer
    candidates = torch.tensor(word_start_tokens(tokenizer))
    bos = [tokenizer.bos_token_id] if prepend_bos and tokenizer.bos_token_id is not None else []
    prefix = torch.tensor([*bos, *tokenizer(context, add_special_tokens=False)["input_ids"]], dtype=torch.long)
    keep = 8 * k  # enough candidates that case and spacing variants do not crowd out k distinct words
    best_values = torch.empty(0, n_features)
    best_ids = torch.empty(0, n_features, dtype=torch.long)
    for start in range(0, len(candidates), batch_size):
        chunk = candidates[start : start + batch_size]
        ids = torch.cat([prefix.expand(len(chunk), -1), chunk[:, None]], 1)
        acts = encode(backend.residual(ids, torch.ones_like(ids), layer)[:, -1]).float().cpu()
        if acts.shape != (len(chunk), n_features):
            raise InputError(
                f"encode returned activations of shape {tuple(acts.shape)}; expected {(len(chunk), n_features)} "
                "(one row per residual, one column per feature)."
            )
        values = torch.cat([best_values, acts])
        ids_all = torch.cat([best_ids, chunk[:, None].expand(-1, n_features)])
        top = values.topk(min(keep, len(values)), dim=0)
        best_values, best_ids = top.values, ids_all.gather(0, top.indices)
        if progress is not None:
            progress(len(chunk))
    texts = {i: tokenizer.decode([i]).strip() for i in set(best_ids.flatten().tolist())}
    return [_distinct(best_values[:, f], best_ids[:, f], texts, k) for f in range(n_features)]


def probe_size(tokenizer: Any) -> int:
    """How many tokens `probe_vocabulary` reads (one short prompt pass each, batched)."""
    return len(word_start_tokens(tokenizer))


def probe_label(tokens: Sequence[tuple[str, float]]) -> str:
    """The probe's tokens as one label text, as the top-tokens baseline writes its tokens."""
    return ", ".join(text for text, _ in tokens)


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
