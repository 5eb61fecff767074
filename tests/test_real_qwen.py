"""Qwen2.5-Coder-1.5B-Instruct, the model big enough to explain itself (marked large_model: skipped where `make
qwen-1.5b` has not installed its packages). An SAE whose decoder rows are centred word residuals (as decoder
rows carry no mean component) self-explains through `sae.self_explain`, the model resolved from its metadata."""

from __future__ import annotations

import torch
from conftest import needs_embedded
from sae_lens import SAE, StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata
from sae_selfexplain_plugin.adapters.apps.evaluation import Embedder
from sae_selfexplain_plugin.adapters.backends.embedded import load_backend

from sae_selfexplain_plugin import SelfExplainConfig
from sae_selfexplain_plugin.word_recovery import semantic_ranks, word_vectors

MODEL = "qwen2.5-coder-1.5b-instruct"
pytestmark = needs_embedded(MODEL)
WORDS = ["violin", "calculus", "turbine", "volcano"]


def test_the_1_5b_model_describes_word_directions_through_sae_self_explain(tmp_path):
    backend = load_backend(MODEL)
    assert (backend.n_layers, backend.d_model) == (28, 1536)
    vecs = word_vectors(backend, WORDS, 14, in_context=True)
    vecs = vecs - vecs.mean(0)
    meta = SAEMetadata(model_name="Qwen/Qwen2.5-Coder-1.5B-Instruct", hook_name="blocks.13.hook_resid_post")
    sae = StandardSAE(StandardSAEConfig(d_in=1536, d_sae=len(WORDS), metadata=meta))
    with torch.no_grad():
        sae.W_dec.copy_(vecs / vecs.norm(dim=-1, keepdim=True))
    sae.save_model(tmp_path)
    loaded = SAE.load_from_disk(tmp_path)
    cfg = SelfExplainConfig(template="chat-meaning", scales=(0.5, 1.0, 2.0), max_new_tokens=8, policy="knee")
    explanations = loaded.self_explain(range(len(WORDS)), config=cfg)  # no model: the embedded one, by metadata
    assert {e.model_id for e in explanations} == {"Qwen/Qwen2.5-Coder-1.5B-Instruct"}
    embed = Embedder().embed
    ranks = semantic_ranks([e.text for e in explanations], range(len(WORDS)), embed(WORDS), embed)
    assert int((ranks == 1).sum()) >= 3, [e.text for e in explanations]


def test_demo_explains_the_1_5b_models_own_sae(tmp_path, capsys):
    """`demo --model` on the SAE shipped for the 1.5B: labels beside the top contexts, and the dashboard."""
    from sae_selfexplain_plugin.adapters.apps.demo_sae import demo_examples
    from sae_selfexplain_plugin.adapters.cli import main

    live = demo_examples(MODEL).live_features()[:2]
    args = ["--model", MODEL, "--features", ",".join(map(str, live)), "--max-new-tokens", "8", "--out", str(tmp_path)]
    assert main(["demo", *args]) == 0
    printed = capsys.readouterr().out
    assert all(f"feature {f} " in printed for f in live)
    assert (tmp_path / "dashboard.html").is_file() and (tmp_path / "results.jsonl").is_file()
