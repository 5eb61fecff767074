"""Auto-interp: a local explainer model reads a feature's explain-split contexts and writes a one-line description.

The comparator the original self-explanation work measured against, and the approach of OpenAI's explainer
and Neuronpedia's auto-interp (our own prompt): the strongest contexts, the token where the feature peaks
marked <<like this>>, and a request for a short description. It reads only the **explain split**; the scorers
read the score split. The explainer is any causal LM behind a backend (an embedded model by name, or a
checkpoint): the Qwen2.5-Coder-1.5B-Instruct labels are the teacher for description adapters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from sae_selfexplain_plugin.activation_examples import ActivationExamples, Context
from sae_selfexplain_plugin.backend import Backend, generate_texts
from sae_selfexplain_plugin.templates import question_ids

INSTRUCTION = (
    "Here are short texts on which one feature of a language model is active; the token where it is most "
    "active is marked <<like this>>.\n\n{contexts}\n\n"
    "In a few words, what does this feature respond to? Answer with a short description only."
)
BASE_SUFFIX = "\nThe feature responds to:"  # a model without a chat template continues this line
N_CONTEXTS = 8
MAX_NEW_TOKENS = 24


def marked(context: Context) -> str:
    """The context's text with its peak token marked <<token>>, on one line."""
    peak = max(range(len(context.values)), key=context.values.__getitem__)
    pieces = list(context.tokens)
    token = pieces[peak]
    pieces[peak] = f"{token[: len(token) - len(token.lstrip())]}<<{token.strip()}>>"  # the space stays outside
    return " ".join("".join(pieces).split())


def explainer_prompt(backend: Backend, contexts: Sequence[Context]) -> list[int]:
    """The explainer's prompt ids for one feature's contexts (chat template where the tokenizer has one)."""
    listed = "\n".join(f"{n}. {marked(c)}" for n, c in enumerate(contexts, 1))
    return question_ids(backend.tokenizer, INSTRUCTION.format(contexts=listed), BASE_SUFFIX)


def autointerp_labels(
    backend: Backend,
    examples: ActivationExamples,
    features: Sequence[int],
    *,
    batch_size: int = 4,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """One description per feature from its top explain-split contexts ("" for a feature with none)."""
    labels = {f: "" for f in features}
    todo = [f for f in features if examples[f].top]
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        prompts = [explainer_prompt(backend, examples[f].top[:N_CONTEXTS]) for f in chunk]
        for f, text in zip(chunk, generate_texts(backend, prompts, MAX_NEW_TOKENS, batch_size)):
            labels[f] = text.strip('"').strip()
        if progress is not None:
            progress(len(chunk))
    return [labels[f] for f in features]
