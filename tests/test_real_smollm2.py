"""On the real embedded SmolLM2-135M-Instruct (chat, ChatML): the default model."""

from __future__ import annotations

import json

import pytest
from sae_selfexplain_plugin.adapters.apps.demo_sae import demo_examples, load_demo_sae
from sae_selfexplain_plugin.adapters.backends.embedded import DEFAULT_MODEL, EMBEDDED_MODELS, load_backend
from sae_selfexplain_plugin.adapters.cli import main

from sae_selfexplain_plugin import SelfExplainConfig, SelfExplainer, render
from sae_selfexplain_plugin.word_recovery import recovered, word_vectors

pytestmark = pytest.mark.real_model
WORDS = ["Paris", "banana", "music", "winter"]


@pytest.fixture(scope="module")
def smol():
    return load_backend("smollm2-135m-instruct")


def test_it_is_the_default_and_a_chat_model(smol):
    assert DEFAULT_MODEL == "smollm2-135m-instruct"
    assert (smol.n_layers, smol.d_model) == (30, 576)
    assert EMBEDDED_MODELS["smollm2-135m-instruct"].n_layers == smol.n_layers  # the registry's, used by export
    assert SelfExplainer(smol).template_name == "chat-meaning"
    prompt = render("chat-meaning", smol.tokenizer)
    assert prompt.text.count("<|im_start|>") == 3 and len(prompt.placeholder_positions) == 2


def test_mid_layer_words_are_recovered_through_chat_prompts(smol):
    vecs = word_vectors(smol, WORDS, 10, in_context=True)
    for template in ("identity", "chat-repeat"):
        records = SelfExplainer(smol, SelfExplainConfig(template=template, scales=(2.0,), max_new_tokens=6)).explain(
            vecs
        )
        assert sum(recovered(r.candidates[0].text, w) for r, w in zip(records, WORDS)) >= 3, template


def test_meaning_prompt_gives_meanings(smol):
    vecs = word_vectors(smol, ["music"], 10, in_context=True)
    cfg = SelfExplainConfig(template="chat-meaning", scales=(2.0,), max_new_tokens=16)
    (record,) = SelfExplainer(smol, cfg).explain(vecs)
    assert "sound" in record.candidates[0].text or "music" in record.candidates[0].text


def test_demo_explains_live_features_of_the_shipped_sae(tmp_path, capsys):
    examples = demo_examples()
    live = examples.live_features()[:2]
    args = ["--features", ",".join(map(str, live)), "--scales", "2,4", "--max-new-tokens", "6"]
    assert main(["demo", "--model", "smollm2-135m-instruct", *args, "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    for f in live:
        assert f"feature {f} " in printed
        assert repr(examples[f].top_tokens()[0]) in printed  # shown beside its explanations
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["feature_id"] for r in records] == live
    for r in records:
        assert len(r["candidates"]) == 2 and r["policy"] == "knee" and r["sweep"]["scale"] == [2.0, 4.0]
        chosen = r["chosen_index"]
        assert (chosen is None) == ("not_self_explainable" in r["flags"])
        assert chosen is None or r["candidates"][chosen]["scale"] == r["ranked_scales"][0]
        assert set(r["scores"]) == {"activation_check", "embedding"}
    assert (tmp_path / "dashboard.html").stat().st_size > 10_000
    assert records[0]["sae"]["neuronpedia_id"] == load_demo_sae().cfg.metadata.neuronpedia_id


def test_model_text_is_shown_verbatim_in_the_demo_table(monkeypatch, capsys, tmp_path):
    """An explanation that looks like rich markup must be printed as text, not swallowed."""
    from sae_selfexplain_plugin.results import Explanation, FeatureExplanations

    def fake_explain(self, directions, feature_ids=None, *, progress=None):
        cands = [Explanation(0, "[bold]Music[/bold] and [saelens]", s, 2, "chat-meaning") for s in self.config.scales]
        return [FeatureExplanations(0, cands, 0, model_id=self.backend.model_id, settings_hash=self.settings_hash)]

    monkeypatch.setattr(SelfExplainer, "explain", fake_explain)
    assert (
        main(["demo", "--model", "smollm2-135m-instruct", "--features", "0", "--scales", "1", "--out", str(tmp_path)])
        == 0
    )
    assert "[bold]Music[/bold] and [saelens]" in capsys.readouterr().out


def test_the_shipped_adapter_fits_the_demo_sae_and_is_chosen_automatically(smol):
    from sae_selfexplain_plugin.adapters.sae_lens import with_adapter

    from sae_selfexplain_plugin.direction_adapter import SHIPPED_DIR, DirectionAdapter

    (path,) = SHIPPED_DIR.glob("*.safetensors")
    assert path.stat().st_size <= 2e6
    sae = load_demo_sae()
    meta = DirectionAdapter.load(path).metadata
    assert (meta.source, meta.layer, meta.template) == (sae.cfg.metadata.hook_name, 2, "chat-meaning")
    assert meta.validation["best_loss"] < meta.validation["initial_loss"]
    assert with_adapter(SelfExplainConfig(), "auto", sae, smol).adapter == str(path)
    assert with_adapter(SelfExplainConfig(layer=3), "auto", sae, smol).adapter is None  # another layer: none
    explained = sae.self_explain(7, model=smol, max_new_tokens=4)
    chosen = explained.chosen
    assert chosen.scale_mode == "adapter" and chosen.adapter == DirectionAdapter.load(path).fingerprint


def test_the_shipped_adapter_names_held_out_token_latents_more_often(smol):
    from sae_selfexplain_plugin.adapters.apps.sae_latent import latent_recovery, token_latents

    from sae_selfexplain_plugin.direction_adapter import HELD_OUT_LATENTS, SHIPPED_DIR

    sae = load_demo_sae()
    latents = token_latents(demo_examples(), range(HELD_OUT_LATENTS))[:16]
    config = SelfExplainConfig(template="chat-meaning", scales=(4.0,), max_new_tokens=6)
    bare = latent_recovery(sae, smol, latents, config).rate_by_scale[4.0]
    (path,) = SHIPPED_DIR.glob("*.safetensors")
    adapted = latent_recovery(sae, smol, latents, config.replace(adapter=str(path))).rate_by_scale[1.0]
    assert adapted >= 0.25 and adapted > bare


def test_demo_uses_the_shipped_adapter(tmp_path, capsys):
    live = demo_examples().live_features()[:2]
    args = ["--features", ",".join(map(str, live)), "--max-new-tokens", "6", "--out", str(tmp_path)]
    assert main(["demo", "--model", "smollm2-135m-instruct", *args]) == 0
    status = " ".join(capsys.readouterr().err.split())  # the status line goes to stderr, wrapped
    assert "through the adapter smollm2-135m-instruct" in status
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    for r in records:
        (candidate,) = r["candidates"]
        assert candidate["scale_mode"] == "adapter" and candidate["adapter"]
