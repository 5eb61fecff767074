"""Prompt passes that start from the cached KV of the template's shared prefix give the same results as
full passes, and really skip the prefix."""

from __future__ import annotations

import pytest
import torch

from sae_selfexplain_plugin import Injection, PromptTemplate, SelfExplainConfig, SelfExplainer, register_template
from sae_selfexplain_plugin.backend import shared_prefix_length
from sae_selfexplain_plugin.word_recovery import run_word_recovery

# A prompt whose placeholder comes late, like the chat templates' (many shared tokens before it).
LONG_PREFIX = register_template(
    PromptTemplate(
        name="test-long-prefix",
        description="tests only",
        text="cat dog sun tree blue cat dog sun tree blue cat dog: X means",
        stop_strings=(),
    ),
    overwrite=True,
)
CFG = SelfExplainConfig(template="test-long-prefix", scales=(0.5, 2.0, 6.0), max_new_tokens=5, batch_size=4)


def _injection(positions: torch.Tensor) -> Injection:
    return Injection(1, positions, torch.zeros(positions.shape[0], 8))


def test_shared_prefix_stops_at_the_first_difference_padding_or_injection():
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [5, 6, 7, 8, 9, 10]])
    mask = torch.ones_like(ids)
    placeholder = torch.zeros_like(ids, dtype=torch.bool)
    placeholder[:, 4] = True
    assert shared_prefix_length(ids, mask, _injection(placeholder)) == 4
    nothing = torch.zeros_like(placeholder)
    assert shared_prefix_length(ids, mask, _injection(nothing)) == 5  # the last token always runs
    differ = ids.clone()
    differ[1, 2] = 99
    assert shared_prefix_length(differ, mask, _injection(placeholder)) == 2
    padded = mask.clone()
    padded[0, 0] = 0
    assert shared_prefix_length(ids, padded, _injection(placeholder)) == 0


def _explain(backend, enabled: bool, config: SelfExplainConfig = CFG) -> list:
    backend.prefixes.enabled = enabled
    try:
        return SelfExplainer(backend, config).explain(
            torch.randn(5, backend.d_model, generator=torch.Generator().manual_seed(3))
        )
    finally:
        backend.prefixes.enabled = True


@pytest.mark.parametrize("generate", ["all", "chosen"])
def test_prefix_cache_gives_the_same_texts_and_metrics(backend, generate):
    config = CFG.replace(policy="knee", generate=generate, keep_top=1)
    full = _explain(backend, False, config)
    cached = [_explain(backend, True, config) for _ in range(2)]  # twice: the stored prefix is not written
    for run in cached:
        assert [[(c.scale, c.text) for c in r.candidates] for r in run] == [
            [(c.scale, c.text) for c in r.candidates] for r in full
        ]
        for a, b in zip(run, full):
            assert a.ranked_scales == b.ranked_scales
            for name in ("self_similarity", "entropy", "cross_entropy"):
                assert a.sweep[name] == pytest.approx(b.sweep[name], abs=1e-4)


def test_prompt_passes_skip_the_prefix(gemma_backend):
    explainer = SelfExplainer(gemma_backend, CFG)
    prompt = explainer.prompt
    first = min(prompt.placeholder_positions)
    assert first >= 8
    explainer.explain(torch.randn(2, gemma_backend.d_model))  # the prefix is computed and stored
    embed = gemma_backend.model.get_input_embeddings()
    lengths: list[int] = []
    handle = embed.register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
    try:
        explainer.explain(torch.randn(2, gemma_backend.d_model))
    finally:
        handle.remove()
    prompt_passes = [n for n in lengths if n > 1]  # decode steps feed one token
    assert prompt_passes and all(n == len(prompt.input_ids) - first for n in prompt_passes)


def test_chat_template_prefix(chat_backend):
    config = CFG.replace(template="chat-meaning")
    full = _explain(chat_backend, False, config)
    cached = _explain(chat_backend, True, config)
    assert [c.text for r in cached for c in r.candidates] == [c.text for r in full for c in r.candidates]


def test_word_recovery_is_unchanged(gemma_backend):
    words = ["cat", "dog", "sun", "tree", "blue"]
    config = CFG.replace(scales=(1.0, 4.0))
    runs = []
    for enabled in (False, True):
        gemma_backend.prefixes.enabled = enabled
        try:
            rows = run_word_recovery(
                gemma_backend, templates=["test-long-prefix"], config=config, source_layers=[2], words=words
            )
        finally:
            gemma_backend.prefixes.enabled = True
        runs.append([(r.source, r.rate_by_scale, r.examples) for r in rows])
    assert runs[0] == runs[1]


def test_training_scores_and_gradients_are_the_same_from_the_prefix(gemma_backend):
    from sae_selfexplain_plugin import render
    from sae_selfexplain_plugin.direction_adapter.training import label_batch

    prompt = render("test-long-prefix", gemma_backend.tokenizer)
    results = []
    for enabled in (False, True):
        gemma_backend.prefixes.enabled = enabled
        vectors = torch.randn(3, gemma_backend.d_model, generator=torch.Generator().manual_seed(2)) * 5
        vectors.requires_grad_(True)
        ids, mask, injection, target = label_batch(prompt, gemma_backend.tokenizer, 1, vectors, ["cat", "dog sun", "x"])
        try:
            logprobs = gemma_backend.continuation_logprobs(ids, mask, injection, len(prompt.input_ids))
        finally:
            gemma_backend.prefixes.enabled = True
        (logprobs * target).sum().backward()
        results.append((logprobs.detach(), vectors.grad))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-5)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-5) and results[0][1].abs().sum() > 0
