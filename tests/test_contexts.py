"""Top-activating contexts for any SAE over a user's corpus, and their use by explain, dashboard and upload."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CORPUS_WORDS, build_tokenizer, tiny_gemma
from fake_neuronpedia import FakeNeuronpedia
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata
from sae_selfexplain_plugin.adapters.cli import main
from sae_selfexplain_plugin.adapters.contexts import collect_contexts, corpus_texts, examples_beside
from sae_selfexplain_plugin.adapters.transformers import TransformersBackend

from sae_selfexplain_plugin import Explanation, FeatureExplanations, InputError
from sae_selfexplain_plugin.activation_examples import ActivationExamples
from sae_selfexplain_plugin.export import export_jsonl


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("contexts")
    tok = build_tokenizer()
    model = tiny_gemma(len(tok))
    (root / "tiny-gemma3").mkdir()
    model.save_pretrained(root / "tiny-gemma3")
    tok.save_pretrained(root / "tiny-gemma3")
    torch.manual_seed(0)
    meta = SAEMetadata(model_name="tiny-gemma3", hook_name="blocks.2.hook_resid_pre", neuronpedia_id="tiny-gemma3/2-t")
    sae = StandardSAE(StandardSAEConfig(d_in=64, d_sae=16, metadata=meta))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn_like(sae.W_enc))
        sae.b_enc.fill_(-1.0)
    sae.save_model(root / "sae")
    g = torch.Generator().manual_seed(1)
    docs = [
        " ".join(CORPUS_WORDS[int(i)] for i in torch.randint(len(CORPUS_WORDS), (40,), generator=g)) for _ in range(40)
    ]
    (root / "corpus.txt").write_text("\n\n".join(docs))
    return root, sae, TransformersBackend(model, tok, model_id="tiny-gemma3"), docs


def test_contexts_hold_real_activations_and_density(world, tmp_path):
    root, sae, backend, _ = world
    out = tmp_path / "ex.safetensors"
    examples = collect_contexts(sae, backend, corpus_texts(root / "corpus.txt"), out, max_tokens=2000, context=32)
    loaded = ActivationExamples.load(out)
    live = loaded.live_features()
    assert loaded.d_sae == 16 and live == examples.live_features() and len(live) >= 8
    feature = loaded[live[0]]
    assert 0 < feature.frequency <= 1 and feature.top and feature.top[0].max_value > 0
    assert all(len(c.tokens) == 24 for c in feature.top)
    # the stored values are the SAE's activations over that very text
    ids = backend.tokenizer(feature.top[0].text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert len(ids[0]) == 24


def test_an_interrupted_collection_resumes_to_the_same_examples(world, tmp_path):
    _, sae, backend, docs = world
    full = collect_contexts(sae, backend, iter(docs), tmp_path / "a.safetensors", max_tokens=2000, context=32,
                            batch_size=4, checkpoint_rows=8)  # fmt: skip

    def breaking():
        for n, doc in enumerate(docs):
            if n == 5:
                raise KeyboardInterrupt
            yield doc

    out = tmp_path / "b.safetensors"
    with pytest.raises(KeyboardInterrupt):
        collect_contexts(sae, backend, breaking(), out, max_tokens=2000, context=32, batch_size=4, checkpoint_rows=8)
    assert (tmp_path / "b.safetensors.partial").exists() and not out.exists()
    resumed = collect_contexts(sae, backend, iter(docs), out, max_tokens=2000, context=32, batch_size=4,
                               checkpoint_rows=8, resume=True)  # fmt: skip
    assert not (tmp_path / "b.safetensors.partial").exists()
    for f in range(16):
        a, b = full[f], resumed[f]
        assert a.frequency == pytest.approx(b.frequency) and [c.tokens for c in a.top] == [c.tokens for c in b.top]


def test_an_sae_not_on_a_blocks_input_is_named_before_any_corpus_is_read(world, tmp_path):
    _, sae, backend, docs = world
    meta = SAEMetadata(model_name="tiny-gemma3", hook_name="blocks.1.hook_mlp_out")
    other = StandardSAE(StandardSAEConfig(d_in=sae.cfg.d_in, d_sae=8, metadata=meta))
    named = r"collecting activation examples reads the residual .* 'blocks\.1\.hook_mlp_out'"
    with pytest.raises(InputError, match=named):
        collect_contexts(other, backend, iter(docs), tmp_path / "x.safetensors", max_tokens=100, context=32)
    assert not (tmp_path / "x.safetensors.partial").exists()


def test_corpus_formats(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("one\n\ntwo")
    (tmp_path / "d" / "b.txt").write_text("three")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "x y"}) + "\n" + json.dumps("z") + "\n")
    assert list(corpus_texts(tmp_path / "d")) == ["one", "two", "three"]
    assert list(corpus_texts(tmp_path / "c.jsonl")) == ["x y", "z"]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"txt": 1}) + "\n")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
    for spec, match in [(tmp_path / "nope", "does not exist"), (tmp_path / "bad.jsonl", "'text' string"),
                        (tmp_path / "bin.txt", "not UTF-8")]:  # fmt: skip
        with pytest.raises(InputError, match=match):
            list(corpus_texts(spec))


def test_explain_collects_contexts_beside_its_results_and_the_dashboard_uses_them(world, tmp_path, capsys):
    root, *_ = world
    out = tmp_path / "r.jsonl"
    args = ["explain", "--sae", str(root / "sae"), "--model", str(root / "tiny-gemma3"), "--features", "0-3",
            "--out", str(out), "--template", "test-open", "--scales", "1", "--max-new-tokens", "3",
            "--contexts", str(root / "corpus.txt"), "--context-tokens", "1500"]  # fmt: skip
    assert main(args) == 0
    assert examples_beside(out).is_file() and "activation examples of" in capsys.readouterr().out
    page = tmp_path / "d.html"
    assert main(["dashboard", str(out), "--out", str(page)]) == 0
    assert '"freq":' in page.read_text() and '"top":' in page.read_text()  # contexts and density shown
    np_out = tmp_path / "np"
    assert main(["export", "--results", str(out), "--format", "neuronpedia", "--out", str(np_out), "--author-id",
                 "u1", "--model-layers", "4"]) == 0  # fmt: skip
    from neuronpedia_db import database, import_dataset

    db = database()
    import_dataset(db, np_out / "v1" / "tiny-gemma3" / "2-t")
    rows = db.execute('SELECT frac_nonzero, "maxActApprox" FROM "Neuron"').fetchall()
    examples = ActivationExamples.load(examples_beside(out))
    assert len(rows) == 4 and sorted(r[0] for r in rows) == sorted(round(examples[f].frequency, 8) for f in range(4))
    examples_beside(out).unlink()
    assert main(["dashboard", str(out), "--out", str(page)]) == 0
    assert '"freq":' not in page.read_text()  # without the file, none (this SAE is not the demo's)


def test_upload_of_the_demo_features_sends_their_top_contexts_and_density(tmp_path, monkeypatch):
    from sae_selfexplain_plugin.adapters.demo_sae import demo_examples, load_demo_sae

    np_id = load_demo_sae().cfg.metadata.neuronpedia_id
    records = [
        FeatureExplanations(
            f,
            [Explanation(f, f"label {f}", 1.0, 2, "chat-meaning")],
            0,
            model_id="m",
            settings_hash="h",
            sae={"neuronpedia_id": np_id},
        )
        for f in range(16)
    ]
    results = tmp_path / "r.jsonl"
    export_jsonl(records, results)
    monkeypatch.setenv("NEURONPEDIA_API_KEY", "secret-key-123")
    with FakeNeuronpedia(model_id="smollm2-135m-instruct", sources=("15-mine",)) as server:
        argv = ["upload", "--results", str(results), "--host", server.url, "--allow-http", "--source", "15-mine"]
        assert main(argv) == 0
    sent = server.received[0]["features"]
    examples = demo_examples()
    assert [f["index"] for f in sent] == list(range(16))
    for f in sent:
        assert f["density"] == pytest.approx(examples[f["index"]].frequency) and 0 < f["density"] <= 1
        assert all(max(a["values"]) > 0 for a in f["activations"]) and len(f["activations"]) >= 1
        assert f["activations"][0]["tokens"] == examples[f["index"]].top[0].tokens
    assert all(n["maxActApprox"] > 0 for n in server.neurons.values())  # the feature page shows real maxima
