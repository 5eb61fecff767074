"""Batched KV-cached decoding shared by every StepModel backend.

Greedy (argmax) or temperature sampling; each row stops at its first stop string or EOS and then leaves
the batch, so a long-running row never makes finished rows pay for more forward passes. With
`no_repeats`, a word token a row has generated is banned from that row (`word_tokens`).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from .backend import GenerationRequest, GenerationResult, StepModel, StopReason
from .ops import ban_generated, mark_generated


def cut_at_stop(text: str, stop_strings: tuple[str, ...]) -> tuple[str, bool]:
    """Text before the earliest stop string, and whether one occurred."""
    cut = min((i for i in (text.find(s) for s in stop_strings if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def accept_token(
    row_tokens: list[int], token: int, tokenizer: Any, stop_strings: tuple[str, ...], eos_token_ids: set[int]
) -> tuple[str | None, StopReason | None]:
    """Add one generated token to a row: (the row's text so far or None at EOS, why it stops or None)."""
    if token in eos_token_ids:
        return None, "eos"
    row_tokens.append(token)
    text, hit = cut_at_stop(tokenizer.decode(row_tokens, skip_special_tokens=True), stop_strings)
    return text, ("stop_string" if hit else None)


def finish_rows(
    generated: list[list[int]], tokenizer: Any, stop_strings: tuple[str, ...], eos_token_ids: set[int]
) -> GenerationResult:
    """For backends that return whole generated sequences: cut each row where `decode` would have stopped."""
    tokens: list[list[int]] = []
    texts: list[str] = []
    reasons: list[StopReason] = []
    for ids in generated:
        row: list[int] = []
        text, reason = "", None
        for token in ids:
            new_text, reason = accept_token(row, int(token), tokenizer, stop_strings, eos_token_ids)
            text = text if new_text is None else new_text
            if reason is not None:
                break
        tokens.append(row)
        texts.append(text)
        reasons.append(reason or "length")
    return GenerationResult(tokens=tokens, texts=texts, stop_reasons=reasons)


_WORD_TOKENS: weakref.WeakKeyDictionary[Any, torch.Tensor] = weakref.WeakKeyDictionary()  # per tokenizer


def word_tokens(tokenizer: Any, vocab_size: int) -> torch.Tensor:
    """bool [vocab_size]: token ids whose text has a letter or digit (the ones `no_repeats` bans from being
    generated twice); separators such as ", " stay free, so a list can go on. Ids past the tokenizer's
    vocabulary (padded embedding rows) count as non-words."""
    mask = _WORD_TOKENS.get(tokenizer)
    if mask is None or len(mask) < vocab_size:
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        mask = torch.zeros(max(vocab_size, len(texts)), dtype=torch.bool)
        mask[: len(texts)] = torch.tensor([any(c.isalnum() for c in t) for t in texts])
        _WORD_TOKENS[tokenizer] = mask  # decoding the vocabulary takes a while: once per tokenizer
    return mask[:vocab_size]


def _next_tokens(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def decode(model: StepModel, request: GenerationRequest, tokenizer: Any, eos_token_ids: set[int]) -> GenerationResult:
    """Run prefill with injection, then decode every row until it stops."""
    batch = request.input_ids.shape[0]
    generator = None
    if request.temperature > 0:
        generator = torch.Generator(device=request.input_ids.device).manual_seed(request.seed)

    tokens: list[list[int]] = [[] for _ in range(batch)]
    texts = [""] * batch
    reasons: list[StopReason] = ["length"] * batch
    active = list(range(batch))  # original row index of each row still in the batch
    mask = request.attention_mask

    logits, cache = model.prefill(request.input_ids, mask, request.injection)
    prompt_logits = logits.float().cpu() if request.probe_layers else None
    words = word_tokens(tokenizer, logits.shape[-1]).to(logits.device) if request.no_repeats else None
    banned = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device) if words is not None else None
    for step in range(request.max_new_tokens):
        if banned is not None:
            logits = ban_generated(logits, banned)
        new = _next_tokens(logits, request.temperature, generator)
        if banned is not None and words is not None:
            mark_generated(banned, new, words)
        keep: list[int] = []
        for local, row in enumerate(active):
            text, reason = accept_token(tokens[row], int(new[local]), tokenizer, request.stop_strings, eos_token_ids)
            if text is not None:
                texts[row] = text
            if reason is not None:
                reasons[row] = reason
                continue
            keep.append(local)
        if not keep or step == request.max_new_tokens - 1:
            break
        if len(keep) < len(active):
            rows = torch.tensor(keep, device=new.device)
            cache = model.select_rows(cache, rows)
            mask, new = mask[rows], new[rows]
            banned = banned[rows] if banned is not None else None
            active = [active[i] for i in keep]
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        logits, cache = model.step(new, mask, cache)
    return GenerationResult(tokens=tokens, texts=texts, stop_reasons=reasons, prompt_logits=prompt_logits)
