"""Adapters end to end on tiny models: the train-adapter and sae-latent commands, the automatic choice of
a shipped adapter, and the centred word-recovery vectors."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import load_script
from sae_selfexplain_plugin.adapters.apps.sae_latent import token_latents
from sae_selfexplain_plugin.adapters.apps.train_direction_adapter import (
    LATENT_LABEL_TOKENS,
    latent_directions,
    peak_label,
    train_for_sae,
)
from sae_selfexplain_plugin.adapters.backends import load_model
from sae_selfexplain_plugin.adapters.cli import main
from sae_selfexplain_plugin.adapters.sae_lens import decoder_rows, load_sae, load_sae_folder, with_adapter

from sae_selfexplain_plugin import AdapterMetadata, DirectionAdapter, SelfExplainConfig, SelfExplainer
from sae_selfexplain_plugin.activation_examples import EXAMPLES_FILE, ActivationExamples
from sae_selfexplain_plugin.errors import InputError
from sae_selfexplain_plugin.word_recovery import run_word_recovery


def _tiny(tiny_sae):
    return ["--sae", str(tiny_sae), "--model", str(tiny_sae.parent / "tiny-model")]


def test_train_adapter_command(tiny_sae, tmp_path):
    out = tmp_path / "adapter.safetensors"
    args = ["train-adapter", *_tiny(tiny_sae), "--out", str(out), "--template", "test-open", "--layer", "1"]
    args += ["--steps", "6", "--eval-every", "3", "--batch-size", "4", "--words", "12", "--held-out", "64"]
    assert main(args) == 0
    adapter = DirectionAdapter.load(out)
    sae, _ = load_sae(str(tiny_sae))
    meta = adapter.metadata
    assert (meta.source, meta.layer, meta.template, meta.d_model) == (sae.cfg.metadata.hook_name, 1, "test-open", 64)
    assert meta.validation["steps"] == 6 and meta.validation["best_loss"] <= meta.validation["initial_loss"]
    assert "latents >= 64" in meta.trained_on
    assert meta.trained_latents == [[64, 127]]  # what eval refuses to score it on
    assert not out.with_suffix(".safetensors.ckpt").exists()  # removed once the run completed
    # an interrupted run's checkpoint is never overwritten silently
    out.with_suffix(".safetensors.ckpt").write_bytes(b"earlier run")
    assert main(args) == 2


def test_train_adapter_needs_at_least_one_word(tiny_sae, tmp_path, capsys):
    """--words 0 once meant the whole vocabulary (a run of more than 600 s): refused by the CLI and the library."""
    out = tmp_path / "adapter.safetensors"
    args = ["train-adapter", *_tiny(tiny_sae), "--out", str(out), "--template", "test-open", "--layer", "1"]
    for words in ("0", "-3"):
        with pytest.raises(SystemExit) as exit_:
            main([*args, "--words", words])
        assert exit_.value.code == 2 and "--words: expected a whole number >= 1" in capsys.readouterr().err
    sae, _ = load_sae(str(tiny_sae))
    backend = load_model(str(tiny_sae.parent / "tiny-model"))
    config = SelfExplainConfig(template="test-open", layer=1)
    with pytest.raises(InputError, match=r"n_words \(--words\) must be >= 1, got 0"):
        train_for_sae(sae, backend, None, out, config=config, n_words=0)
    assert not out.exists()


def test_train_adapter_with_one_vector_per_placeholder(tiny_sae, tmp_path, capsys):
    args = ["train-adapter", *_tiny(tiny_sae), "--layer", "1", "--steps", "2", "--eval-every", "2"]
    args += ["--batch-size", "4", "--words", "12", "--held-out", "64", "--slots", "2"]
    one = tmp_path / "one.safetensors"
    assert main([*args, "--template", "test-open", "--out", str(one)]) == 2  # one placeholder: told at once
    assert "template 'test-open' has 1; use slots=1." in " ".join(capsys.readouterr().err.split())
    assert not one.exists()
    two = tmp_path / "two.safetensors"
    assert main([*args, "--template", "test-two", "--out", str(two)]) == 0
    adapter = DirectionAdapter.load(two)
    assert adapter.metadata.slots == 2 and adapter(torch.randn(3, 64)).shape == (3, 2, 64)


def test_sae_latent_command(tiny_sae, tmp_path):
    report = tmp_path / "latent.json"
    args = ["bench", "sae-latent", *_tiny(tiny_sae), "--latents", "0-127", "--min-peaks", "2"]
    args += ["--template", "test-open", "--scales", "1,4", "--max-new-tokens", "3", "--json", str(report)]
    assert main(args) == 0
    row = json.loads(report.read_text())
    examples = ActivationExamples.load(tiny_sae / EXAMPLES_FILE)
    expected = token_latents(examples, range(128), 2)
    assert row["qualified"] == len(expected) and row["n_words"] == min(64, len(expected))
    assert set(row["rate_by_scale"]) == {"1.0", "4.0"} and row["adapter"] == "none"
    for key in row["examples"]:
        latent, word = key.split(":")
        assert (int(latent), word) in expected


def test_token_latents_need_one_word_peaking_often(tiny_sae):
    examples = ActivationExamples.load(tiny_sae / EXAMPLES_FILE)
    for latent, word in token_latents(examples, range(128), 5):
        peaks = [t.lower() for t in examples[latent].peak_tokens()]
        assert peaks.count(word) >= 5 and word.isalpha() and len(word) >= 3


def test_training_latents_and_their_labels(tiny_sae):
    sae, _ = load_sae(str(tiny_sae))
    examples = ActivationExamples.load(tiny_sae / EXAMPLES_FILE)
    live = set(examples.live_features())
    tokens = latent_directions(sae, examples, range(32, 128), "tokens")
    labelled = [f for f in range(32, 128) if f in live and peak_label(examples, f)]
    assert len(tokens) == len(labelled) > 0
    assert torch.equal(tokens.directions, decoder_rows(sae, labelled))
    for f, label in zip(labelled, tokens.labels):
        parts = label.split(", ")
        peaks = examples[f].peak_tokens()
        assert 1 <= len(parts) <= LATENT_LABEL_TOKENS and len({p.lower() for p in parts}) == len(parts)
        assert all(p in peaks and '"' not in p for p in parts)
        assert parts[0] == next(t for t in peaks if t and '"' not in t)  # strongest first
    word = latent_directions(sae, examples, range(32, 128), "word", min_peaks=2)
    assert word.labels == [w for _, w in token_latents(examples, range(32, 128), 2)]
    with pytest.raises(InputError, match="latent labels must be one of tokens, word"):
        latent_directions(sae, examples, range(32, 128), "gloss")


def test_adapter_choice(tiny_sae, tmp_path):
    sae, _ = load_sae(str(tiny_sae))
    backend = load_model(str(tiny_sae.parent / "tiny-model"))
    config = SelfExplainConfig(template="test-open", layer=1)
    assert with_adapter(config, "auto", sae, backend).adapter is None  # nothing shipped for this model
    assert with_adapter(config, "none", sae, backend).adapter is None
    hook = str(sae.cfg.metadata.hook_name)
    fields = dict(model_id=backend.model_id, d_model=backend.d_model, layer=1, template="test-open")
    path = str(tmp_path / "a.safetensors")
    DirectionAdapter(AdapterMetadata(source=hook, **fields)).save(path)
    assert with_adapter(config, path, sae, backend).adapter == path  # a path stays a path (the settings hash)
    other = DirectionAdapter(AdapterMetadata(source="blocks.99.hook_resid_pre", **fields))
    with pytest.raises(
        InputError, match=rf"trained on directions of 'blocks.99.hook_resid_pre', but this SAE's are at '{hook}'"
    ):
        with_adapter(config, other, sae, backend)
    with pytest.raises(InputError, match=r"no adapter file at .*missing\.safetensors"):
        with_adapter(config, str(tmp_path / "missing.safetensors"), sae, backend)


def test_centred_vectors_change_what_is_injected(gemma_backend):
    words = ["cat", "dog", "sun", "tree", "blue"]
    config = SelfExplainConfig(template="test-open", scales=(1.0, 4.0), max_new_tokens=4)
    rows = {
        kind: run_word_recovery(
            gemma_backend, templates=["test-open"], config=config, source_layers=[2], words=words, vectors=kind,
            same_layer=False,
        )[0]
        for kind in ("raw", "centred")
    }  # fmt: skip
    assert rows["raw"].vectors == "raw" and rows["centred"].vectors == "centred"
    assert rows["raw"].examples != rows["centred"].examples
    with pytest.raises(Exception, match="raw' or 'centred"):
        run_word_recovery(gemma_backend, templates=["test-open"], config=config, words=words, vectors="mean")


def test_self_explain_takes_an_adapter(tiny_sae):
    import test_direction_adapter

    sae, _ = load_sae(str(tiny_sae))
    backend = load_model(str(tiny_sae.parent / "tiny-model"))
    adapter = test_direction_adapter.make_adapter(backend, source=str(sae.cfg.metadata.hook_name))
    explained = sae.self_explain([0, 1], model=backend, template="test-open", layer=1, adapter=adapter)
    d = sae.W_dec.detach()[[0, 1]].float()
    by_hand = test_direction_adapter.by_hand(backend, adapter, d, (1.0,), SelfExplainConfig().max_new_tokens)
    assert [e.text for e in explained] == [row[0] for row in by_hand]
    plain = sae.self_explain([0, 1], model=backend, template="test-open", layer=1, adapter=None)
    assert {e.chosen.scale_mode for e in explained} == {"adapter"}
    assert {e.chosen.scale_mode for e in plain} == {"relative"}
    assert SelfExplainer(backend, SelfExplainConfig(template="test-open", layer=1)).adapter is None
    assert torch.is_tensor(d)


def test_explain_repeats_option(tiny_sae, tmp_path):
    import test_direction_adapter

    sae, _ = load_sae(str(tiny_sae))
    backend = load_model(str(tiny_sae.parent / "tiny-model"))
    adapter = test_direction_adapter.make_adapter(backend, source=str(sae.cfg.metadata.hook_name))
    path = adapter.save(tmp_path / "a.safetensors")
    d = sae.W_dec.detach()[:8].float()
    texts = {}
    for repeats in ("auto", "ban", "allow"):
        out = tmp_path / f"{repeats}.jsonl"
        args = ["explain", *_tiny(tiny_sae), "--features", "0-7", "--out", str(out), "--template", "test-open",
                "--layer", "1", "--adapter", str(path), "--max-new-tokens", "12", "--repeats", repeats]  # fmt: skip
        assert main(args) == 0
        texts[repeats] = [json.loads(line)["candidates"][0]["text"] for line in out.read_text().splitlines()]
    for repeats, no_repeats in (("ban", True), ("allow", False)):
        by_hand = test_direction_adapter.by_hand(backend, adapter, d, (1.0,), 12, no_repeats=no_repeats)
        assert texts[repeats] == [row[0] for row in by_hand]
    assert texts["auto"] == texts["ban"] != texts["allow"]  # an adapter bans by default; the ban matters here


def test_fit_ceiling_script_fits_the_latents_it_is_then_scored_on(tiny_sae, tmp_path):
    """scripts/fit_ceiling.py (a diagnostic upper bound, docs/adapters.md): trains on the first live latents
    themselves, lowers the loss on them, and marks its file as never to ship."""
    out = tmp_path / "fit.safetensors"
    args = ["--sae", str(tiny_sae), "--model", str(tiny_sae.parent / "tiny-model"), "--template", "test-open"]
    args += ["--layer", "1", "--limit", "12", "--steps", "12", "--batch-size", "4", "--out", str(out)]
    assert load_script("fit_ceiling", "research").main(args) == 0
    meta = DirectionAdapter.load(out).metadata
    assert meta.trained_on.startswith("DIAGNOSTIC") and "never ship" in meta.trained_on
    assert meta.validation["steps"] == 12
    assert meta.validation["fitted_loss"] < meta.validation["initial_loss"]


def test_lens_anchored_script_scores_each_labeller_on_two_held_out_sets(tiny_sae, tmp_path, capsys):
    """scripts/lens_anchored.py (a diagnostic, docs/adapters.md): runs end to end on a tiny SAE and adapter and
    prints every labeller (the lens after further contexts too) for both latent sets; its label join keeps
    distinct items in order."""
    script = load_script("lens_anchored", "research")
    assert script.joined(["idea, Idea, ideas", "ideas, plan", "x"], 3) == "idea, ideas, plan"
    assert script.joined(["", ","], 3) == ""
    backend_dir = tiny_sae.parent / "tiny-model"
    sae = load_sae_folder(tiny_sae)
    backend = load_model(str(backend_dir))
    meta = AdapterMetadata(
        backend.model_id, backend.d_model, str(sae.cfg.metadata.hook_name), 1, "test-open", "scalar-affine"
    )
    adapter = tmp_path / "tiny.safetensors"
    DirectionAdapter(meta, init_scale=4.0).save(adapter)
    args = ["--sae", str(tiny_sae), "--model", str(backend_dir), "--adapter", str(adapter), "--template", "test-open"]
    options = ["--layer", "1", "--limit", "3", "--anchors", "2", "--items", "3", "--lens-contexts", " a| my"]
    assert script.main([*args, *options]) == 0
    printed = capsys.readouterr().out
    assert "eval: 3 latents" in printed and "next: 3 latents" in printed
    labellers = ["adapter", "anchored", "direction lens k3", "direction lens k5", "direction lens ' a'"]
    for labeller in [*labellers, "direction lens ' my'", "direction lens, mean"]:
        assert len(re.findall(rf"  {re.escape(labeller)} +act [01]\.\d{{3}}  AUROC", printed)) == 2
