"""The generation check: an output-side score. The explained model writes a short text from each label; does the
feature fire more on the text written from its own label than on the texts written from the other features'?

After Pepper et al. (arXiv 2602.10352), who score adapters this way: a label that explains the feature lets the
model write text on which the feature fires. Ranked like the activation check (`scoring.activation_check`),
with the written text in place of the label itself: it favours labels the model can write about in a way the
feature reads, descriptions as much as token lists.
"""

from __future__ import annotations

from collections.abc import Sequence

from sae_selfexplain_plugin.backend import Backend, generate_texts
from sae_selfexplain_plugin.templates import question_ids

PROMPT = "Write one short sentence about: {label}"
MAX_NEW_TOKENS = 24


def written_texts(backend: Backend, labels: Sequence[str], batch_size: int = 16) -> list[str]:
    """The text the model writes from each label ("" for an empty label); greedy, so reruns agree. A base model
    continues the request itself."""
    todo = [i for i, label in enumerate(labels) if label.strip()]
    prompts = [question_ids(backend.tokenizer, PROMPT.format(label=labels[i].strip())) for i in todo]
    out = [""] * len(labels)
    for i, text in zip(todo, generate_texts(backend, prompts, MAX_NEW_TOKENS, batch_size)):
        out[i] = text
    return out
