"""nnsight on the real Gemma 3 270M: the same greedy explanations as the transformers backend."""

from __future__ import annotations

import pytest
from nnsight.modeling.transformers import TransformersModel
from sae_selfexplain_plugin.adapters.backends.embedded import load_embedded
from sae_selfexplain_plugin.adapters.backends.nnsight import NNsightBackend

from sae_selfexplain_plugin import SelfExplainConfig, SelfExplainer
from sae_selfexplain_plugin.word_recovery import word_vectors

pytestmark = pytest.mark.real_model


@pytest.mark.parametrize("template", ["identity", "definition"])
def test_nnsight_equals_transformers_on_gemma(real_backend, template):
    model, tok = load_embedded("gemma-3-270m")  # its own copy: nnsight wraps the modules it is given
    nn_backend = NNsightBackend(TransformersModel(model, tokenizer=tok))
    vecs = word_vectors(real_backend, ["Paris", "banana", "winter"], 6, in_context=True)
    cfg = SelfExplainConfig(template=template, scales=(2.0, 4.0), max_new_tokens=10)
    via_hf = SelfExplainer(real_backend, cfg).explain(vecs)
    via_nn = SelfExplainer(nn_backend, cfg).explain(vecs)
    assert [c.text for r in via_nn for c in r.candidates] == [c.text for r in via_hf for c in r.candidates]
