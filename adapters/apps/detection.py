"""The detection scorer: a judge model reads a label and one context and answers whether the feature fires there.

After delphi's detection scorer (EleutherAI; the method of its paper and code, our own prompt): the judge sees
the label and a context from the **score split** (never shown to a labeller), half of them contexts where the
feature fires (its strongest and ones sampled across its range), half where it never fires. Its margin
log P(Yes) - log P(No) at the answer gives two scores per label (`scoring.detection`): balanced accuracy of
"Yes" (margin > 0) and the AUROC of the margin. The judge is any causal LM behind a backend that can read
next-token logits (`ProbeModel`): the embedded Qwen2.5-Coder-1.5B-Instruct, or a bigger one on a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from sae_selfexplain_plugin.activation_examples import ActivationExamples
from sae_selfexplain_plugin.backend import Backend, PrefixCache, ProbeModel, plain_prompts
from sae_selfexplain_plugin.errors import InputError
from sae_selfexplain_plugin.scoring import Score, detection
from sae_selfexplain_plugin.templates import question_ids

# The label and the question come before the context, so that all of one label's prompts share them as a
# prefix computed once (DetectionJudge.margins); only the context and the answer's opening differ.
QUESTION = (
    'A feature of a language model is described as: "{label}".\n'
    "Is the following text an example of what the feature describes? Answer Yes or No.\n"
    'Text: "{context}"'
)
BASE_SUFFIX = "\nAnswer:"  # for a model without a chat template; the answer token is then " Yes" / " No"
PER_SIDE = 10  # contexts where the feature fires (5 strongest, 5 sampled) and as many where it does not


class DetectionJudge:
    """A model answering the detection question, read at its answer's first token."""

    def __init__(self, backend: Backend, batch_size: int = 16) -> None:
        if not isinstance(backend, ProbeModel):
            raise InputError(
                f"the detection judge reads next-token logits, which {type(backend).__name__} does not provide; "
                "pass an embedded model or a transformers checkpoint as the judge."
            )
        self.backend, self.batch_size = backend, batch_size
        tok = backend.tokenizer
        self.chat = getattr(tok, "chat_template", None) is not None
        # the answer's first token: " Yes" after "Answer:", "Yes" opening a chat reply (either where a
        # tokenizer starts both answers alike)
        spellings = [("Yes", "No"), (" Yes", " No")] if self.chat else [(" Yes", " No"), ("Yes", "No")]
        firsts = [(_first_token(tok, yes), _first_token(tok, no)) for yes, no in spellings]
        usable = [pair for pair in firsts if pair[0] != pair[1]]
        if not usable:
            raise InputError("the judge's tokenizer starts 'Yes' and 'No' with the same token; use another judge.")
        self.yes, self.no = usable[0]

    def prompt_ids(self, label: str, context: str) -> list[int]:
        question = QUESTION.format(label=label.strip(), context=context.strip())
        return question_ids(self.backend.tokenizer, question, BASE_SUFFIX)

    @torch.no_grad()
    def margins(self, label: str, contexts: Sequence[str]) -> torch.Tensor:
        """log P(Yes) - log P(No) at the answer, one per context.

        Prompts of equal length go together, so a batch has no padding and each row reads as it would alone
        (padding inside a row would shift a sliding-window model's view); the label's prompt, which every
        row starts with, is primed in the backend's PrefixCache and computed once for all batches."""
        assert isinstance(self.backend, ProbeModel)
        rows = [self.prompt_ids(label, c) for c in contexts]
        prefixes = getattr(self.backend, "prefixes", None)  # a backend's PrefixCache, where it has one
        if isinstance(prefixes, PrefixCache) and len(rows) > 1:  # the label's prompt: one pass for all batches
            prefixes.prime(torch.tensor([rows[0][: _common_start(rows)]], device=self.backend.device))
        out = torch.zeros(len(rows))
        by_length: dict[int, list[int]] = {}
        for i, row in enumerate(rows):
            by_length.setdefault(len(row), []).append(i)
        for group in by_length.values():
            for start in range(0, len(group), self.batch_size):
                chunk = group[start : start + self.batch_size]
                ids, mask, nothing = plain_prompts(self.backend, [rows[i] for i in chunk])
                _, logits = self.backend.probe(ids, mask, nothing, [0])  # (its block-0 residual is unused)
                logprobs = torch.log_softmax(logits.float(), dim=-1)
                out[chunk] = (logprobs[:, self.yes] - logprobs[:, self.no]).cpu()
        return out


def _common_start(rows: list[list[int]]) -> int:
    """How many leading tokens all rows share, leaving at least one token of each after them."""
    n = min(len(r) for r in rows) - 1
    return next((i for i in range(n) if any(r[i] != rows[0][i] for r in rows)), max(n, 0))


def _first_token(tokenizer: Any, text: str) -> int:
    """The answer's first token: the judge's choice between the answers is made there."""
    return int(tokenizer(text, add_special_tokens=False)["input_ids"][0])


def detection_contexts(
    examples: ActivationExamples, feature: int, per_side: int = PER_SIDE
) -> tuple[list[str], list[str]]:
    """(firing, non-firing) context texts of `feature`: half the strongest and half sampled across its range
    (the score split's `sampled`; the strongest only where there are none), and `per_side` never-firing ones."""
    e = examples[feature]
    strongest, sampled = [c.text for c in e.top], [c.text for c in e.sampled]
    half = per_side // 2 if sampled else per_side
    firing = list(dict.fromkeys(strongest[:half] + sampled[: per_side - half]))
    return firing, [c.text for c in e.random[:per_side]]


def detection_scores(
    judge: DetectionJudge, examples: ActivationExamples, pairs: set[tuple[int, str]], per_side: int = PER_SIDE
) -> dict[tuple[int, str], tuple[Score, Score]]:
    """(balanced accuracy, AUROC) for every (feature, label) pair."""
    out = {}
    for f, label in sorted(pairs):
        firing, quiet = detection_contexts(examples, f, per_side)
        if not label.strip():
            out[(f, label)] = (Score(None, "empty explanation"),) * 2
        elif not firing or not quiet:
            out[(f, label)] = (Score(None, "no activation examples (needs firing and non-firing contexts)"),) * 2
        else:
            margins = judge.margins(label, firing + quiet)
            out[(f, label)] = detection(margins[: len(firing)], margins[len(firing) :])
    return out
