"""SAELens on the real Gemma 3 270M: an SAE saved in SAELens's format whose decoder rows are the model's
own word directions (block-6 residuals), explained through every backend."""

from __future__ import annotations

import pytest
import torch
from sae_lens import SAE, HookedSAETransformer, StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata
from sae_selfexplain_plugin.adapters.backends.embedded import load_embedded
from transformer_lens.model_bridge import TransformerBridge

from sae_selfexplain_plugin import SelfExplainConfig
from sae_selfexplain_plugin.word_recovery import recovered, word_vectors

pytestmark = pytest.mark.real_model
WORDS = ["Paris", "banana", "dog", "winter"]
CFG = SelfExplainConfig(scales=(2.0, 4.0, 6.0), max_new_tokens=8)


@pytest.fixture(scope="module")
def word_sae(real_backend, tmp_path_factory):
    vecs = word_vectors(real_backend, WORDS, 6, in_context=True)
    meta = SAEMetadata(
        model_name="google/gemma-3-270m",
        hook_name="blocks.6.hook_resid_pre",
        hf_hook_name="model.layers.5.output",
        neuronpedia_id="gemma-3-270m/6-selfexplain-words",
    )
    sae = StandardSAE(StandardSAEConfig(d_in=640, d_sae=len(WORDS), metadata=meta))
    with torch.no_grad():
        sae.W_dec.copy_(vecs / vecs.norm(dim=-1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.T)
    folder = tmp_path_factory.mktemp("word_sae")
    sae.save_model(folder)
    return SAE.load_from_disk(folder)


@pytest.fixture(scope="module")
def hooked_sae_transformer():
    # Its own copy: TransformerLens and the bridge must not share modules with real_backend.
    model, tok = load_embedded("gemma-3-270m")
    return HookedSAETransformer.from_pretrained_no_processing(
        "google/gemma-3-270m", hf_model=model, tokenizer=tok, device="cpu", dtype=torch.float32
    )


def texts(records):
    return [c.text for r in records for c in r.candidates]


def test_self_explain_resolves_the_embedded_model_from_metadata(word_sae):
    explanations = word_sae.self_explain(range(len(WORDS)), config=CFG)
    assert [e.chosen.scale for e in explanations] == [4.0] * len(WORDS)
    assert sum(recovered(e.text, w) for e, w in zip(explanations, WORDS)) >= 3
    one = word_sae.self_explain(0, config=CFG)
    assert one.sae["neuronpedia_id"] == "gemma-3-270m/6-selfexplain-words"
    assert one.model_id == "google/gemma-3-270m"


@pytest.mark.parametrize("template", ["identity", "definition"])
def test_transformer_lens_equals_transformers(word_sae, real_backend, hooked_sae_transformer, template):
    cfg = CFG.replace(template=template)
    feats = list(range(len(WORDS)))
    via_hf = word_sae.self_explain(feats, model=real_backend, config=cfg)
    via_tl = word_sae.self_explain(feats, model=hooked_sae_transformer, config=cfg)
    assert texts(via_tl) == texts(via_hf)


def test_transformer_bridge_equals_transformers(word_sae, real_backend):
    model, tok = load_embedded("gemma-3-270m")
    bridge = TransformerBridge.boot_transformers("google/gemma-3-270m", hf_model=model, tokenizer=tok)
    cfg = CFG.replace(template="definition", scales=(4.0,))
    via_hf = word_sae.self_explain([0, 1], model=real_backend, config=cfg)
    via_bridge = word_sae.self_explain([0, 1], model=bridge, config=cfg)
    assert texts(via_bridge) == texts(via_hf)


def test_hooked_sae_transformer_with_an_attached_sae(word_sae, hooked_sae_transformer):
    before = word_sae.self_explain([0, 1], model=hooked_sae_transformer, config=CFG)
    hooked_sae_transformer.add_sae(word_sae)  # splices the SAE's reconstruction in at block 6
    try:
        attached = word_sae.self_explain([0, 1], model=hooked_sae_transformer, config=CFG)
    finally:
        hooked_sae_transformer.reset_saes()
    assert len(attached) == 2
    assert [e.text for e in word_sae.self_explain([0, 1], model=hooked_sae_transformer, config=CFG)] == [
        e.text for e in before
    ]


def test_from_pretrained_runs_the_real_registry_path_offline(real_backend):
    """SAE.from_pretrained with SAELens's own `converter=` hook: the registry lookup and metadata
    (neuronpedia id, model name) are real; only the download is replaced."""
    vec = word_vectors(real_backend, ["banana"], 6, in_context=True)
    seen = {}

    def converter(repo_id, folder_name, device, force_download, cfg_overrides):
        seen.update(repo_id=repo_id, folder_name=folder_name)
        cfg = {
            "architecture": "jumprelu", "d_in": 640, "d_sae": 1, "dtype": "float32", "device": device,
            "apply_b_dec_to_input": False, "normalize_activations": "none", "model_name": "google/gemma-3-270m",
            "hook_name": "blocks.12.hook_resid_post", "hf_hook_name": "model.layers.12.output",
            **(cfg_overrides or {}),
        }  # fmt: skip
        state = {
            "W_enc": vec.T.clone(), "W_dec": vec / vec.norm(), "b_enc": torch.zeros(1), "b_dec": torch.zeros(640),
            "threshold": torch.zeros(1),
        }  # fmt: skip
        return cfg, state, None

    sae = SAE.from_pretrained("gemma-scope-2-270m-pt-res", "layer_12_width_16k_l0_medium", converter=converter)
    assert seen == {
        "repo_id": "google/gemma-scope-2-270m-pt",
        "folder_name": "resid_post/layer_12_width_16k_l0_medium",
    }
    assert sae.cfg.metadata.neuronpedia_id == "gemma-3-270m/12-gemmascope-2-res-16k"
    explanation = sae.self_explain(0, config=CFG.replace(scales=(4.0,)))
    assert recovered(explanation.text, "banana")
