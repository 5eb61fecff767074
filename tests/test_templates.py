from __future__ import annotations

import pytest

from sae_selfexplain_plugin import PromptTemplate, TemplateError, get_template, register_template, render
from sae_selfexplain_plugin.templates import default_template_name


def tokens_at(tok, rendered):
    return [tok.convert_ids_to_tokens(rendered.input_ids[p]) for p in rendered.placeholder_positions]


def test_base_templates_find_their_single_placeholder(tokenizer):
    for name in ("identity", "definition"):
        r = render(name, tokenizer)
        assert tokens_at(tokenizer, r) == ["X"]
        assert r.input_ids[0] == tokenizer.bos_token_id  # base prompts get BOS from the tokenizer


def test_chat_templates_patch_every_placeholder(chat_tokenizer):
    assert tokens_at(chat_tokenizer, render("chat-meaning", chat_tokenizer)) == ["X", "X"]
    assert tokens_at(chat_tokenizer, render("chat-repeat", chat_tokenizer)) == ["X"] * 4
    r = render("chat-meaning", chat_tokenizer)
    assert r.text.endswith('The meaning of the word "X" is "')  # model turn pre-filled
    assert r.input_ids[:2] != (chat_tokenizer.bos_token_id,) * 2  # the chat template's BOS is not doubled


def test_short_template_uses_a_rare_token(chat_tokenizer):
    r = render("chat-short", chat_tokenizer)
    assert tokens_at(chat_tokenizer, r) == ["<unk>", "<unk>"]
    assert "X" not in r.text


def test_default_template_follows_the_chat_template(tokenizer, chat_tokenizer):
    assert default_template_name(tokenizer) == "identity"
    assert default_template_name(chat_tokenizer) == "chat-meaning"


def test_placeholder_in_several_tokens_is_an_error(tokenizer):
    t = PromptTemplate(name="_multi", description="", text="Say QZ now", placeholder="QZ")
    with pytest.raises(TemplateError, match="tokenizes into 2 tokens"):
        render(t, tokenizer)


def test_placeholder_merged_with_neighbour_is_an_error(tokenizer):
    t = PromptTemplate(name="_merged", description="", text="A Xylophone", placeholder="X")
    with pytest.raises(TemplateError, match="merges with"):
        render(t, tokenizer)


def test_absent_placeholder_is_an_error():
    with pytest.raises(TemplateError, match="does not occur"):
        register_template(PromptTemplate(name="_absent", description="", text="no placeholder here"))


def test_unknown_template_names_the_known_ones():
    with pytest.raises(TemplateError, match="identity"):
        get_template("nope")


def test_chat_template_on_base_tokenizer_is_an_error(tokenizer):
    with pytest.raises(TemplateError, match="no chat template"):
        render("chat-meaning", tokenizer)


def test_register_refuses_silent_overwrite():
    t = PromptTemplate(name="_twice", description="", text="X ->", stop_strings=("\n",))
    register_template(t, overwrite=True)
    with pytest.raises(TemplateError, match="already registered"):
        register_template(t)
