"""On the real embedded Gemma 3 270M (base). Slower: the model loads once per session (~3 s cached)."""

from __future__ import annotations

import pytest
from sae_selfexplain_plugin.adapters.backends.embedded import EMBEDDED_MODELS
from sae_selfexplain_plugin.adapters.cli import main

from sae_selfexplain_plugin import SelfExplainConfig, SelfExplainer
from sae_selfexplain_plugin.word_recovery import recovered, run_word_recovery, word_vectors

pytestmark = pytest.mark.real_model
WORDS = ["Paris", "banana", "dog", "music", "winter", "king"]


def test_model_shape_and_default_template(real_backend):
    assert (real_backend.n_layers, real_backend.d_model) == (18, 640)
    assert EMBEDDED_MODELS["gemma-3-270m"].n_layers == real_backend.n_layers  # the registry's, used by export
    assert real_backend.model_id == "google/gemma-3-270m"
    assert SelfExplainer(real_backend).template_name == "identity"  # base model: no chat template


def test_identity_prompt_names_same_layer_words(real_backend):
    vecs = word_vectors(real_backend, WORDS, 2, in_context=False)
    records = SelfExplainer(real_backend, SelfExplainConfig(scales=(1.0,), max_new_tokens=4)).explain(vecs)
    assert [r.candidates[0].text for r in records] == WORDS


def test_scale_decides_cross_layer_recovery(real_backend):
    """A block-6 residual injected at block 2: lost at relative scale 1, found at scale 4."""
    vecs = word_vectors(real_backend, WORDS, 6, in_context=True)
    cfg = SelfExplainConfig(scales=(1.0, 4.0), max_new_tokens=4)
    records = SelfExplainer(real_backend, cfg).explain(vecs)
    hits = {s: sum(recovered(r.at_scale(s)[0].text, w) for r, w in zip(records, WORDS)) for s in (1.0, 4.0)}
    assert hits[1.0] <= 1 and hits[4.0] >= 5


def test_definition_prompt_explains_rather_than_repeats(real_backend):
    vecs = word_vectors(real_backend, ["banana"], 2, in_context=False)
    (record,) = SelfExplainer(real_backend, SelfExplainConfig(template="definition", scales=(1.0,))).explain(vecs)
    assert "fruit" in record.candidates[0].text


def test_injection_changes_real_output(real_backend):
    vecs = word_vectors(real_backend, ["dog", "winter"], 2, in_context=False)
    records = SelfExplainer(real_backend, SelfExplainConfig(scales=(0.0, 1.0), max_new_tokens=4)).explain(vecs)
    assert records[0].candidates[0].text == records[1].candidates[0].text  # zero vector: same text
    assert records[0].candidates[1].text != records[1].candidates[1].text


def test_batched_equals_unbatched_on_the_real_model(real_backend):
    vecs = word_vectors(real_backend, WORDS[:3], 6, in_context=True)
    cfg = SelfExplainConfig(template="definition", scales=(2.0, 4.0), max_new_tokens=10)
    batched = SelfExplainer(real_backend, cfg.replace(batch_size=6)).explain(vecs)
    single = SelfExplainer(real_backend, cfg.replace(batch_size=1)).explain(vecs)
    assert [c.text for r in batched for c in r.candidates] == [c.text for r in single for c in r.candidates]


def test_word_recovery_same_layer_is_near_perfect(real_backend):
    cfg = SelfExplainConfig(scales=(1.0,), max_new_tokens=4)
    rows = run_word_recovery(real_backend, templates=["identity"], config=cfg, source_layers=[], words=WORDS * 4)
    assert rows[0].source == "same-layer" and rows[0].rate_by_scale[1.0] == 1.0


def test_cli_reports_bad_input_without_a_traceback(capsys):
    assert main(["demo", "--model", "smollm2-135m-instruct", "--scales", "1,-4"]) == 2
    assert "negative scale" in capsys.readouterr().err
