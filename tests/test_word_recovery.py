from __future__ import annotations

import pytest
import torch

from sae_selfexplain_plugin import SelfExplainConfig
from sae_selfexplain_plugin.word_recovery import (
    CARRIER,
    default_source_layers,
    load_words,
    recovered,
    run_word_recovery,
    single_token_words,
    word_vectors,
)


def test_shipped_word_list():
    words = load_words()
    assert len(words) >= 200 and len(set(w.lower() for w in words)) == len(words)
    assert all(w.isalpha() for w in words)


def test_recovered_matches_whole_words_only():
    assert recovered("Paris\n", "Paris")
    assert recovered("the city of paris", "Paris")
    assert not recovered("Parisian food", "Paris")
    assert not recovered("1135", "cat")
    assert recovered("cat.", "cat")


def test_single_token_filter(tokenizer):
    assert single_token_words(tokenizer, ["cat", "dog", "zebra", "sun"]) == ["cat", "dog", "sun"]


def test_default_source_layers():
    assert default_source_layers(18) == [6, 9]
    assert default_source_layers(30) == [10, 15]


@pytest.mark.parametrize("in_context", [False, True])
def test_word_vectors_read_the_word_position_despite_padding(gemma_backend, in_context):
    tok = gemma_backend.tokenizer
    words = ["cat", "tree"]
    batched = word_vectors(gemma_backend, words, 2, in_context)
    for w, vec in zip(words, batched):
        if in_context:
            text = CARRIER.format(word=" " + w)
            ids = tok(text)["input_ids"]
            pos = ids.index(tok(" " + w, add_special_tokens=False)["input_ids"][0])
        else:
            ids = [tok.bos_token_id, *tok(" " + w, add_special_tokens=False)["input_ids"]]
            pos = len(ids) - 1
        x = torch.tensor([ids])
        alone = gemma_backend.residual(x, torch.ones_like(x), 2)[0, pos]
        assert torch.allclose(vec, alone, atol=1e-4)


def test_run_reports_every_template_source_and_scale(gemma_backend):
    cfg = SelfExplainConfig(scales=(1.0, 4.0), max_new_tokens=3)
    rows = run_word_recovery(
        gemma_backend, templates=["test-open"], config=cfg, source_layers=[3], words=["cat", "dog", "zebra"]
    )
    assert [(r.template, r.source) for r in rows] == [("test-open", "same-layer"), ("test-open", "block 3")]
    for r in rows:
        assert r.n_words == 2  # "zebra" is not a single token here
        assert set(r.rate_by_scale) == {1.0, 4.0}
        assert all(0 <= v <= 1 for v in r.rate_by_scale.values())
        assert r.default_scale == 4.0 and set(r.examples) == {"cat", "dog"}


def test_each_policy_is_scored_at_the_scale_it_picks_per_word(gemma_backend):
    from sae_selfexplain_plugin import SelfExplainer
    from sae_selfexplain_plugin.policies import rank_scales
    from sae_selfexplain_plugin.word_recovery import rate_by_policy

    cfg = SelfExplainConfig(template="test-open", scales=(1.0, 2.0, 4.0), max_new_tokens=3)
    words = ["cat", "dog"]
    vectors = word_vectors(gemma_backend, words, 1, in_context=False)
    records = SelfExplainer(gemma_backend, cfg).explain(vectors)
    # make the texts name the word only at the scale max-self-similarity picks for it
    for r, w in zip(records, words):
        best = cfg.scales[rank_scales(r.sweep, cfg, "max-self-similarity")[0]]
        for c in r.candidates:
            c.text = w if c.scale == best else "nothing"
    rates = rate_by_policy(records, words, cfg)
    assert set(rates) == {"fixed", "max-self-similarity", "composite", "knee"}
    assert rates["max-self-similarity"] == 1.0
    fixed_hits = sum(r.at_scale(4.0)[0].text == w for r, w in zip(records, words)) / 2
    assert rates["fixed"] == fixed_hits


WORDS = ["violin", "calculus", "nostalgia", "turbine", "Egypt"]
DESCRIPTIONS = [
    "a stringed instrument with four strings",
    "the branch of mathematics that deals with rates of change",
    "a feeling of longing for something that is gone",
    "a machine that converts mechanical energy into electrical",
    "the land of the Pharaohs",
]


def test_semantic_criterion_counts_a_description_and_refuses_a_wrong_one():
    """The issue's case: "violin" -> "a stringed instrument with four strings" names no word, yet is nearest to
    its own. The same descriptions given to the wrong words (a shift: no one keeps its own) all miss."""
    from sae_selfexplain_plugin.adapters.apps.evaluation import Embedder

    from sae_selfexplain_plugin.word_recovery import semantic_ranks

    embed = Embedder().embed
    candidates = embed(WORDS)
    assert not any(recovered(d, w) for d, w in zip(DESCRIPTIONS, WORDS))  # literal: all misses
    assert semantic_ranks(DESCRIPTIONS, range(5), candidates, embed).tolist() == [1, 1, 1, 1, 1]
    shifted = semantic_ranks(DESCRIPTIONS, [1, 2, 3, 4, 0], candidates, embed)
    assert (shifted > 1).all()
    # an empty or constant label ties with nothing in its favour: never rank 1 by luck
    assert semantic_ranks(
        ["", ""], [0, 1], candidates, lambda t: torch.zeros(len(t), candidates.shape[1])
    ).tolist() == [
        5,
        5,
    ]


def test_word_recovery_rows_carry_semantic_rates(gemma_backend):
    """With an embedder, each row has success@1 and MRR per scale and per policy, bounded by the criterion."""
    from sae_selfexplain_plugin.adapters.apps.evaluation import Embedder

    cfg = SelfExplainConfig(scales=(1.0, 4.0), max_new_tokens=3)
    (row,) = run_word_recovery(
        gemma_backend, templates=["test-open"], config=cfg, words=["cat", "dog", "sun"], embed=Embedder().embed,
        same_layer=True, source_layers=[],
    )  # fmt: skip
    assert set(row.semantic_by_scale) == set(row.mrr_by_scale) == {1.0, 4.0}
    assert set(row.semantic_by_policy) == set(row.rate_by_policy)
    for s in cfg.scales:
        assert 0 <= row.semantic_by_scale[s] <= row.mrr_by_scale[s] <= 1  # MRR >= success@1
    assert row.semantic_chance == pytest.approx(1 / row.n_words)
    assert row.to_dict()["semantic_by_scale"].keys() == {"1.0", "4.0"}
