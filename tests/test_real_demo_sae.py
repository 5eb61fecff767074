"""The shipped demo SAE against real activations of the embedded default model."""

from __future__ import annotations

import pytest
import torch
from conftest import needs_embedded
from sae_lens import SAE
from sae_selfexplain_plugin.adapters.apps.demo_sae import DEMO_SAE_DIR, demo_examples, load_demo_sae, training_report
from sae_selfexplain_plugin.adapters.backends.embedded import DEFAULT_MODEL, EMBEDDED_MODELS, load_backend
from sae_selfexplain_plugin.adapters.sae_lens import check_compatible, sae_input_layer

from sae_selfexplain_plugin.vocabulary import word_start_tokens

pytestmark = pytest.mark.real_model

# Not from the training corpus (dictionary, WordNet, fortunes, Python docs): everyday prose.
TEXTS = [
    "The train to the city leaves at seven, so we packed our bags the night before and went to bed early.",
    "She opened the window and the smell of rain and cut grass filled the small kitchen.",
    "To install the package, run pip install and then import it at the top of your script.",
    "After the match the players shook hands, and the coach said he was proud of the whole team.",
]


@pytest.fixture(scope="module")
def residuals() -> torch.Tensor:
    backend = load_backend(DEFAULT_MODEL)
    sae = load_demo_sae()
    check_compatible(sae, backend)  # same model, d_model and a residual hook
    layer = sae_input_layer(sae)
    assert layer is not None
    tok = backend.tokenizer
    rows = []
    for text in TEXTS:
        ids = torch.tensor([[tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"]]])
        rows.append(backend.residual(ids, torch.ones_like(ids), layer)[0, 1:])  # BOS excluded, as in training
    return torch.cat(rows)


def explained_variance(sae: SAE, x: torch.Tensor) -> float:
    with torch.no_grad():
        recon = sae.decode(sae.encode(x))
    return float(1 - ((x - recon) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def test_it_is_a_saelens_sae_of_the_default_model() -> None:
    sae = SAE.load_from_disk(DEMO_SAE_DIR)
    meta = sae.cfg.metadata
    assert meta.model_name == EMBEDDED_MODELS[DEFAULT_MODEL].hf_id
    assert (sae.cfg.d_in, meta.hook_name, meta.hf_hook_name) == (576, "blocks.15.hook_resid_post", "model.layers.15")
    assert meta.prepend_bos is True and meta.context_size == 128
    assert meta.neuronpedia_id == "smollm2-135m-instruct/15-selfexplain-res-4k"
    assert 4096 <= sae.cfg.d_sae <= 16384
    # weights 9.4 MB, explain split 4.6 MB, score split 8.7 MB (token ids stored as uint16)
    assert sum(f.stat().st_size for f in DEMO_SAE_DIR.iterdir()) < 24e6


def test_it_reconstructs_real_activations_as_recorded(residuals: torch.Tensor) -> None:
    report = training_report()
    assert report["explained_variance"] >= 0.7
    assert explained_variance(load_demo_sae(), residuals) >= report["explained_variance"] - 0.15


def test_random_weights_would_fail_that_check(residuals: torch.Tensor) -> None:
    sae = load_demo_sae()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in (sae.W_enc, sae.W_dec):
            p.copy_(torch.randn(p.shape, generator=g) * p.std() + p.mean())
    assert explained_variance(sae, residuals) < 0.3


def test_examples_cover_the_live_features() -> None:
    examples = demo_examples()
    sae = load_demo_sae()
    assert examples.d_sae == sae.cfg.d_sae
    live = examples.live_features()
    assert len(live) >= 0.9 * sae.cfg.d_sae
    first = examples[live[0]]
    assert len(first.top) == 10 and len(first.random) == 10


@pytest.mark.parametrize("model", [pytest.param(m, marks=needs_embedded(m)) for m in sorted(EMBEDDED_MODELS)])
def test_vocabulary_probe_reads_word_starts_of_the_real_tokenizers(model):
    """Byte-level BPE marks a word start with "Ġ" (SmolLM2), SentencePiece with "▁" (Gemma): the probe reads
    the tokens that begin a word, not the pieces inside one."""
    tok = load_backend(model).tokenizer
    starts = set(word_start_tokens(tok))
    assert len(tok) // 4 < len(starts) < len(tok)
    for word in ("house", "river", "music"):
        (start,) = tok(" " + word, add_special_tokens=False)["input_ids"][-1:]
        assert start in starts and tok.decode([start]).strip() == word
    inner = tok("unhappiness", add_special_tokens=False)["input_ids"]
    assert len(inner) > 1 and inner[-1] not in starts  # a piece inside a word
