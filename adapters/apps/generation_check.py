"""The generation check: an output-side score. The explained model writes a short text from each label; does the
feature fire more on the text written from its own label than on the texts written from the other features'?

After Pepper et al. (arXiv 2602.10352), who score adapters this way: a label that explains the feature lets the
model write text on which the feature fires. Ranked like the activation check (`scoring.activation_check`),
with the written text in place of the label itself: it favours labels the model can write about in a way the
feature reads, descriptions as much as token lists.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sae_selfexplain_plugin.backend import Backend, GenerationRequest, Injection, left_pad

PROMPT = "Write one short sentence about: {label}"
BASE_PROMPT = "Here is one short sentence about {label}:"
MAX_NEW_TOKENS = 24


def written_texts(backend: Backend, labels: Sequence[str], batch_size: int = 16) -> list[str]:
    """The text the model writes from each label ("" for an empty label); greedy, so reruns agree."""
    tok = backend.tokenizer
    chat = getattr(tok, "chat_template", None) is not None
    pad = getattr(tok, "pad_token_id", None) or 0
    todo = [i for i, label in enumerate(labels) if label.strip()]
    out = [""] * len(labels)
    for start in range(0, len(todo), batch_size):
        rows = todo[start : start + batch_size]
        prompts = [_prompt(tok, chat, labels[i].strip()) for i in rows]
        ids, mask = left_pad(prompts, pad)
        ids, mask = ids.to(backend.device), mask.to(backend.device)
        nothing = Injection(0, torch.zeros_like(ids, dtype=torch.bool), torch.zeros(len(rows), backend.d_model))
        result = backend.generate(GenerationRequest(ids, mask, nothing, MAX_NEW_TOKENS, stop_strings=("\n",)))
        for i, text in zip(rows, result.texts):
            out[i] = text.strip()
    return out


def _prompt(tok: object, chat: bool, label: str) -> list[int]:
    if chat:
        ids = tok.apply_chat_template(  # type: ignore[attr-defined]
            [{"role": "user", "content": PROMPT.format(label=label)}], add_generation_prompt=True
        )
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)
    bos = getattr(tok, "bos_token_id", None)
    body = tok(BASE_PROMPT.format(label=label), add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    return ([bos] if bos is not None else []) + list(body)
