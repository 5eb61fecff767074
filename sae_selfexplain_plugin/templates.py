"""Prompt templates with a placeholder token, and how to find the placeholder after tokenization.

A template is rendered to text, tokenized once, and every position of its placeholder is patched.
Placeholders are found by character offsets, so this works whatever the tokenizer merges.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import TemplateError

RARE_TOKEN = "<rare-token>"
"""Placeholder value meaning: use the tokenizer's unknown token (rarely seen in training text)."""

# Private-use character: survives chat templates untouched and never occurs in real prompts.
_SENTINEL = "\ue000"


@dataclass(frozen=True)
class PromptTemplate:
    """A prompt with a placeholder.

    Base-model templates set `text`. Chat templates set `user` (the user's message) and `prefill`
    (the start of the model's turn); they are rendered through the tokenizer's chat template.
    `placeholder` occurs in text/user/prefill as a literal; RARE_TOKEN means the tokenizer's unk token.
    Generation stops at the first of `stop_strings` (excluded from the explanation) or at EOS.
    """

    name: str
    description: str
    text: str | None = None
    user: str | None = None
    prefill: str = ""
    placeholder: str = "X"
    stop_strings: tuple[str, ...] = ('"', "\n")

    @property
    def is_chat(self) -> bool:
        return self.user is not None


@dataclass(frozen=True)
class RenderedPrompt:
    """A template rendered for one tokenizer: token ids and the positions to patch."""

    template: str
    text: str
    input_ids: tuple[int, ...]
    placeholder_positions: tuple[int, ...]
    stop_strings: tuple[str, ...]


_REGISTRY: dict[str, PromptTemplate] = {}


def register_template(template: PromptTemplate, *, overwrite: bool = False) -> PromptTemplate:
    """Add a template to the registry so it can be selected by name."""
    if (template.text is None) == (template.user is None):
        raise TemplateError(f"template {template.name!r}: set exactly one of `text` (base) or `user` (chat).")
    if template.name in _REGISTRY and not overwrite:
        raise TemplateError(f"template {template.name!r} is already registered; pass overwrite=True.")
    body = (template.text or "") + (template.user or "") + template.prefill
    if template.placeholder not in body:
        raise TemplateError(
            f"template {template.name!r}: placeholder {template.placeholder!r} does not occur in its text; "
            "write the placeholder where the feature should be injected."
        )
    _REGISTRY[template.name] = template
    return template


def get_template(name: str) -> PromptTemplate:
    """Look a template up by name."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise TemplateError(
            f"unknown template {name!r}; known templates: {', '.join(sorted(_REGISTRY))}. "
            "Register your own with register_template()."
        ) from None


def template_names() -> list[str]:
    """Names of all registered templates."""
    return sorted(_REGISTRY)


def default_template_name(tokenizer: Any) -> str:
    """The chat "meaning" prompt for chat models, the few-shot identity prompt for base models."""
    return "chat-meaning" if getattr(tokenizer, "chat_template", None) else "identity"


register_template(
    PromptTemplate(
        name="identity",
        description="few-shot token identity (Patchscopes); base models",
        text="cat -> cat\n1135 -> 1135\nhello -> hello\nX ->",
        stop_strings=("\n",),
    )
)
register_template(
    PromptTemplate(
        name="definition",
        description='"The meaning of the word "X" is ""; base models',
        text='The meaning of the word "X" is "',
    )
)
register_template(
    PromptTemplate(
        name="chat-meaning",
        description="the original work's meaning prompt, model turn pre-filled; chat models",
        user='What is the meaning of the word "X"?',
        prefill='The meaning of the word "X" is "',
    )
)
register_template(
    PromptTemplate(
        name="chat-repeat",
        description="the original work's repeat prompt (token identity); chat models",
        user='Repeat "X" four times exactly as it is written.',
        prefill='1. "X"\n2. "X"\n3. "X"\n4. "',
    )
)
register_template(
    PromptTemplate(
        name="chat-short",
        description="short meaning prompt with a rare token as placeholder (no 'word', no letter X); chat",
        user=f' "{RARE_TOKEN}"?',
        prefill=f' "{RARE_TOKEN}" "',
        placeholder=RARE_TOKEN,
    )
)


def _resolve_placeholder(template: PromptTemplate, tokenizer: Any) -> str:
    if template.placeholder != RARE_TOKEN:
        return template.placeholder
    unk = getattr(tokenizer, "unk_token", None)
    taken = {getattr(tokenizer, a, None) for a in ("bos_token", "eos_token", "pad_token")}
    if not unk or unk in taken:
        raise TemplateError(
            f"template {template.name!r} needs a rarely-used token as placeholder, but this tokenizer has no "
            "distinct unk token; register a copy of the template with placeholder set to a reserved token."
        )
    return str(unk)


def _render_text(template: PromptTemplate, tokenizer: Any) -> str:
    """Render with a sentinel in place of the placeholder."""
    if not template.is_chat:
        assert template.text is not None
        return template.text.replace(template.placeholder, _SENTINEL)
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError(
            f"template {template.name!r} is for chat models, but this tokenizer has no chat template; "
            "use a base-model template such as 'identity' or 'definition'."
        )
    assert template.user is not None
    user = template.user.replace(template.placeholder, _SENTINEL)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
    )
    if not isinstance(rendered, str):
        raise TemplateError("apply_chat_template(tokenize=False) did not return text; update transformers.")
    return rendered + template.prefill.replace(template.placeholder, _SENTINEL)


def render(template: PromptTemplate | str, tokenizer: Any) -> RenderedPrompt:
    """Tokenize a template and locate every placeholder token.

    Raises TemplateError when the placeholder is absent, or covers several tokens, or shares a token
    with neighbouring text.
    """
    if isinstance(template, str):
        template = get_template(template)
    placeholder = _resolve_placeholder(template, tokenizer)
    with_sentinels = _render_text(template, tokenizer)
    parts = with_sentinels.split(_SENTINEL)
    if len(parts) < 2:
        raise TemplateError(f"template {template.name!r}: placeholder {placeholder!r} is absent from the prompt.")
    text, spans = parts[0], []
    for part in parts[1:]:
        spans.append((len(text), len(text) + len(placeholder)))
        text += placeholder + part

    if not getattr(tokenizer, "is_fast", False):
        raise TemplateError("placeholders are located by token offsets, which need a fast (Rust) tokenizer.")
    bos = getattr(tokenizer, "bos_token", None)
    add_special = not template.is_chat and not (bos and text.startswith(bos))
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=add_special)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

    positions = []
    for start, end in spans:
        hits = [i for i, (s, e) in enumerate(offsets) if e > s and s < end and e > start]
        if len(hits) != 1:
            pieces = [text[offsets[i][0] : offsets[i][1]] for i in hits]
            raise TemplateError(
                f"template {template.name!r}: placeholder {placeholder!r} tokenizes into {len(hits)} tokens "
                f"{pieces}; use a placeholder that is a single token for this tokenizer."
            )
        s, e = offsets[hits[0]]
        outside = text[s:start] + text[end:e]
        if outside.strip():
            raise TemplateError(
                f"template {template.name!r}: placeholder {placeholder!r} merges with {outside!r} into one "
                f"token {text[s:e]!r}; put whitespace or punctuation around it."
            )
        positions.append(hits[0])
    return RenderedPrompt(
        template=template.name,
        text=text,
        input_ids=tuple(int(i) for i in ids),
        placeholder_positions=tuple(positions),
        stop_strings=template.stop_strings,
    )


def question_ids(tokenizer: Any, question: str, base_suffix: str = "") -> list[int]:
    """Token ids asking `question`, for an answer to follow: a user turn and the opened assistant turn where
    the tokenizer has a chat template, else BOS + `question` + `base_suffix` (e.g. "\\nAnswer:")."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        if not isinstance(text, str):
            raise TemplateError("apply_chat_template(tokenize=False) did not return text; update transformers.")
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = getattr(tokenizer, "bos_token_id", None)
    body = tokenizer(question + base_suffix, add_special_tokens=False)["input_ids"]
    return ([bos] if bos is not None else []) + list(body)
