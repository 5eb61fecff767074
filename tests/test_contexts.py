"""Top-activating contexts for any SAE over a user's corpus, and their use by explain, dashboard and upload."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import CORPUS_WORDS, build_tokenizer, tiny_gemma
from fake_neuronpedia import FakeNeuronpedia
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata
from sae_selfexplain_plugin.adapters.apps.contexts import collect_contexts, corpus_texts, examples_beside
from sae_selfexplain_plugin.adapters.apps.demo_sae import DEMO_SAE_DIR
from sae_selfexplain_plugin.adapters.backends.transformers import TransformersBackend
from sae_selfexplain_plugin.adapters.cli import main
from test_resume_safety import plant_pickle

from sae_selfexplain_plugin import Explanation, FeatureExplanations, InputError
from sae_selfexplain_plugin.activation_examples import (
    EXAMPLES_FILE,
    ActivationExamples,
    score_split_of,
    score_split_path,
)
from sae_selfexplain_plugin.example_collector import window_pieces
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
    from sae_selfexplain_plugin.adapters.apps.demo_sae import demo_examples, load_demo_sae

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


def _interrupted(sae, backend, docs, out, **options):
    """A collection stopped by Ctrl-C after its first checkpoint: leaves OUT.partial."""

    def breaking():
        for n, doc in enumerate(docs):
            if n == 5:
                raise KeyboardInterrupt
            yield doc

    settings = {"max_tokens": 2000, "context": 32, "batch_size": 4, "checkpoint_rows": 8, **options}
    with pytest.raises(KeyboardInterrupt):
        collect_contexts(sae, backend, breaking(), out, **settings)
    partial = Path(f"{out}.partial")
    assert partial.is_file()
    return partial


def test_a_resume_checks_the_checkpoint_was_made_by_this_run(world, tmp_path):
    """The SAE (by its weights), the settings and the corpus (by its rows) must match; each mismatch names the
    file, the field and the fix, and leaves the checkpoint and the output alone."""
    _, sae, backend, docs = world
    out = tmp_path / "x.safetensors"
    partial = _interrupted(sae, backend, docs, out)
    before = partial.read_bytes()
    from safetensors import safe_open

    with safe_open(str(partial), framework="pt") as f:
        rows = json.loads(f.metadata()["info"])["rows"]
    assert rows >= 8 and rows % 8 == 0
    twin = StandardSAE(sae.cfg)  # the same cfg and name, other weights
    with torch.no_grad():
        for a, b in zip(twin.parameters(), sae.parameters()):
            a.copy_(b)
        twin.W_dec.mul_(-1)
    other_words = [d.upper() for d in docs]
    fix = rf"delete {re.escape(str(partial))} or rerun without --resume to start over\."
    cases = [
        (twin, docs, {}, rf"field 'sae' is tiny-gemma3/2-t \(weights [0-9a-f]{{16}}\), not this run's .*; {fix}"),
        (sae, docs, {"context": 40}, rf"field 'settings.context' is 32 in the checkpoint but 40 in this run; {fix}"),
        (sae, other_words, {}, rf"field 'corpus_rows_sha256' does not match the first {rows} rows.*{fix}"),
        (sae, docs[:1], {}, rf"field 'rows' is {rows} .* but this corpus gives only [1-9]\d*: .*; {fix}"),
        # oversized: more rows done than this run wants (once reported as "the corpus has fewer than 32 tokens")
        (sae, docs, {"max_tokens": 100}, rf"field 'rows' is {rows}: the checkpoint has read {rows * 32:,} tokens, "
                                         rf"more than this run's 96 \(--tokens\); pass --tokens {rows * 32} or more "
                                         rf"to continue it, or {fix}"),
    ]  # fmt: skip
    for model, texts, options, message in cases:
        settings = {"max_tokens": 2000, "context": 32, "batch_size": 4, "checkpoint_rows": 8, **options}
        with pytest.raises(InputError, match=message):
            collect_contexts(model, backend, iter(texts), out, resume=True, **settings)
        assert partial.read_bytes() == before and not out.exists()


def test_a_resume_refuses_garbage_foreign_or_damaged_checkpoints(world, tmp_path):
    from safetensors.torch import load_file, save_file

    _, sae, backend, docs = world
    out = tmp_path / "x.safetensors"
    partial = _interrupted(sae, backend, docs, out)
    good = {k: v.clone() for k, v in load_file(partial).items()}  # not mapped: the file is overwritten below
    from safetensors import safe_open

    with safe_open(str(partial), framework="pt") as f:
        meta = f.metadata()
    damaged = {
        "garbage": lambda: partial.write_bytes(b"\x00garbage" * 10),
        "foreign": lambda: save_file({"weight": torch.zeros(3)}, partial, metadata={"format": "pt"}),
        "missing": lambda: save_file({k: v for k, v in good.items() if k != "top_left"}, partial, metadata=meta),
        "shape": lambda: save_file({**good, "best": torch.zeros(3, 3)}, partial, metadata=meta),
        "info": lambda: save_file(good, partial, metadata={**meta, "info": "{not json"}),
    }
    messages = {
        "garbage": "is not a readable resume checkpoint",
        "foreign": "field 'format' is 'pt', not 'sae-selfexplain-contexts-checkpoint/1'",
        "missing": "tensor 'top_left' is missing",
        "shape": r"tensor 'best' is \(3, 3\) torch.float32, expected \[16x10\] torch.float32",
        "info": "field 'info': malformed or truncated JSON",
    }
    for case, plant in damaged.items():
        plant()
        with pytest.raises(
            InputError, match=rf"^{re.escape(str(partial))}:? .*{messages[case]}.*rerun without --resume"
        ):
            collect_contexts(sae, backend, iter(docs), out, max_tokens=2000, context=32, batch_size=4, resume=True)
        assert not out.exists()


def test_a_planted_pickle_checkpoint_runs_no_code(world, tmp_path, capsys):
    """`contexts --resume` once unpickled OUT.partial: a planted file ran code. Now it is one error line."""
    root, *_ = world
    out = tmp_path / "ex.safetensors"
    marker = tmp_path / "pwned"
    plant_pickle(Path(f"{out}.partial"), marker)
    argv = ["contexts", "--sae", str(root / "sae"), "--model", str(root / "tiny-gemma3"), "--corpus",
            str(root / "corpus.txt"), "--out", str(out), "--tokens", "1000", "--resume"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr()
    [line] = [x for x in (err.out + err.err).splitlines() if "error" in x.lower()]  # beside model-loading bars
    assert line.startswith("error: ") and "not a readable resume checkpoint" in line
    assert "rerun without --resume" in line and "Traceback" not in err.out + err.err
    assert not marker.exists() and not out.exists()


MULTILINGUAL = [
    "مرحبا بالعالم، هذه جملة عربية قصيرة للاختبار.",
    "שלום עולם, זה משפט קצר בעברית לבדיקה.",
    "Emoji 🎉🚀👍🏽 and 🇫🇷 flags, mixed with text ✨ and more 😀.",
    "漢字とかなの混じった日本語の文です。中文句子也在这里。",
]


def test_contexts_store_whole_characters_of_any_script(world, tmp_path):
    """A byte-level tokenizer splits every non-ASCII character of these scripts over 2-4 tokens. Decoded one
    token at a time they were U+FFFD; each context now holds exactly the text it covers, a character given
    whole to the token that completes it (with the tokens before the window, for one that starts inside)."""
    from safetensors.torch import load_file

    _, sae, backend, _ = world
    tok = backend.tokenizer
    docs = [" ".join(MULTILINGUAL[(i + j) % 4] for j in range(3)) for i in range(12)]
    source = "".join(docs)  # the rows are cut from the documents' tokens, back to back
    out = tmp_path / "multi.safetensors"
    collect_contexts(sae, backend, iter(docs), out, max_tokens=3000, context=32)
    examples = ActivationExamples.load(out)
    contexts = [c for f in range(examples.d_sae) for c in (examples[f].top + examples[f].random)]
    assert len(contexts) > 50
    after = sum("\ufffd" in t for c in contexts for t in c.tokens)
    assert after == 0
    for c in contexts:
        assert len(c.tokens) == 24 and c.text and c.text in source, c.tokens
    # the same windows decoded one token at a time, as files were written before
    raw = load_file(out)
    shown = raw["top_values"].float().amax(-1) > 0
    windows = [*raw["top_tokens"][shown].tolist(), *raw["pool_tokens"].tolist()]
    before = sum("\ufffd" in tok.decode([i]) for w in windows for i in w)
    starting_inside = sum("\ufffd" in tok.decode(w[:1]) for w in windows)
    assert before > len(windows) * 5 and starting_inside > 0  # the test exercises both problems
    print(f"U+FFFD tokens: {before} of {24 * len(windows)} decoded one by one, {after} now")


def test_window_pieces_give_each_character_to_the_token_that_completes_it():
    tok = build_tokenizer()
    text = "a🎉b"  # the emoji is 4 byte tokens

    def decode(ids):
        return tok.decode(ids, clean_up_tokenization_spaces=False)

    ids = tok(text, add_special_tokens=False)["input_ids"]
    plain = [decode([i]) for i in ids]
    assert len(ids) == 6 and plain[1:5] == ["\ufffd"] * 4
    assert window_pieces(ids, [], plain, decode) == ["a", "", "", "", "🎉", "b"]
    # a window starting inside the emoji: the tokens before it complete the character...
    assert window_pieces(ids[2:], ids[:2], plain[2:], decode) == ["", "", "🎉", "b"]
    # ...and without them its bytes are dropped, never shown as U+FFFD
    assert window_pieces(ids[2:], [], plain[2:], decode) == ["", "", "", "b"]
    # bytes that never complete a character (invalid text) stay U+FFFD at their own token, not the next one
    broken = [*ids[:3], ids[5]]
    assert window_pieces(broken, [], [plain[i] for i in (0, 1, 2, 5)], decode) == ["a", "", "\ufffd", "b"]
    ascii_ids = tok("plain text", add_special_tokens=False)["input_ids"]
    assert window_pieces(ascii_ids, [], [decode([i]) for i in ascii_ids], decode) is None  # nothing to store


@pytest.mark.real_model
def test_whole_characters_through_the_real_smollm2_tokenizer():
    """SmolLM2's byte-level BPE: every window of a multilingual text, starting at every token, keeps its text
    whole (tokenizer only: no model is run)."""
    from sae_selfexplain_plugin.adapters.backends.embedded import ensure_cached
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ensure_cached("smollm2-135m-instruct"))

    def decode(ids):
        return tok.decode(ids, clean_up_tokenization_spaces=False)

    source = " ".join(MULTILINGUAL)
    ids = tok(source, add_special_tokens=False)["input_ids"]
    plain = [decode([i]) for i in ids]
    before = after = 0
    for start in range(len(ids) - 24):
        window = slice(start, start + 24)
        pieces = window_pieces(ids[window], ids[max(0, start - 4) : start], plain[window], decode) or plain[window]
        before += sum("\ufffd" in t for t in plain[window])
        after += sum("\ufffd" in t for t in pieces)
        assert "".join(pieces) in source
    assert before > 100 and after == 0


def test_contexts_carry_the_identity_of_their_sae(world, tmp_path):
    from sae_selfexplain_plugin.adapters.apps.demo_sae import demo_examples
    from sae_selfexplain_plugin.adapters.sae_lens import sae_identity

    from sae_selfexplain_plugin.identity import decoder_fingerprint

    root, sae, backend, _ = world
    out = tmp_path / "ex.safetensors"
    made = collect_contexts(sae, backend, corpus_texts(root / "corpus.txt"), out, max_tokens=1000, context=32)
    loaded = ActivationExamples.load(out)
    assert made.sae == loaded.sae == sae_identity(sae)
    assert loaded.sae["fingerprint"] == decoder_fingerprint(sae.W_dec) and loaded.sae["d_sae"] == 16
    assert loaded.sae["neuronpedia_id"] == "tiny-gemma3/2-t" and loaded.sae["hook_name"] == "blocks.2.hook_resid_pre"
    loaded.sae["fingerprint"] = "changed"  # a copy: the examples' identity cannot be altered through it
    assert loaded.sae["fingerprint"] == decoder_fingerprint(sae.W_dec)
    # the shipped demo examples carry the demo SAE's identity
    from sae_selfexplain_plugin.adapters.apps.demo_sae import load_demo_sae

    assert demo_examples().sae["fingerprint"] == decoder_fingerprint(load_demo_sae().W_dec)
    # files of format /1 (written before identities and whole characters) still load, with no identity
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    old = tmp_path / "old.safetensors"
    tensors = {k: v for k, v in load_file(out).items() if not k.endswith("_pieces")}
    save_file(tensors, old, metadata={"format": "sae-selfexplain-activation-examples/1", "vocab": meta["vocab"]})
    assert ActivationExamples.load(old).sae is None and ActivationExamples.load(old)[0].frequency == made[0].frequency


def test_every_flaw_of_an_examples_file_is_named(world, tmp_path):
    """A file that is not what `save` writes: InputError naming the file, the field and the fix, never a
    KeyError or a type error later."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    root, sae, backend, _ = world
    good_path = tmp_path / "good.safetensors"
    collect_contexts(sae, backend, corpus_texts(root / "corpus.txt"), good_path, max_tokens=1000, context=32)
    tensors = {k: v.clone() for k, v in load_file(good_path).items()}
    with safe_open(str(good_path), framework="pt") as f:
        meta = f.metadata()
    unknown_id = json.dumps(
        {k: v for k, v in json.loads(meta["vocab"]).items() if k != str(int(tensors["top_tokens"][0, 0, 0]))}
    )
    cases = {
        "vocab: bad JSON": ({}, {"vocab": "{oops"}, r"field 'vocab': malformed or truncated JSON"),
        "vocab: empty": ({}, {"vocab": "{}"}, r"field 'vocab' must be a non-empty JSON object"),
        "vocab: a list": ({}, {"vocab": "[1, 2]"}, r"field 'vocab' must be a non-empty JSON object"),
        "vocab: bad entry": ({}, {"vocab": '{"x": 3}'}, r"field 'vocab' has entry 'x': 3"),
        "vocab: missing": ({}, {"vocab": None}, r"field 'vocab' \(the text of each token id\) is missing"),
        "vocab: unknown id": ({}, {"vocab": unknown_id}, r"field 'vocab' lacks token ids \["),
        "format": ({}, {"format": "pt"}, r"field 'format' is 'pt', not one of"),
        "sae": ({}, {"sae": "[1]"}, r"field 'sae' must be a JSON dict, got list"),
        "sae d_sae": ({}, {"sae": '{"d_sae": 99}'}, r"field 'sae' has d_sae 99 but the tensors cover 16"),
        "pieces": ({}, {"pieces": "[1]"}, r"field 'pieces' must be a JSON list of strings"),
        "missing tensor": ({"random_index": None}, {}, r"tensor 'random_index' is missing"),
        "dtype": ({"top_tokens": tensors["top_tokens"].float()}, {}, r"tensor 'top_tokens' is .* torch.float32, "
                  r"expected 3 dimensions of integer"),
        "shape": ({"top_values": tensors["top_values"][:, :2].contiguous()}, {}, r"tensor shapes do not fit together"),
        "NaN": ({"frequency": torch.full((16,), float("nan"))}, {}, r"tensor 'frequency' must hold fractions"),
        "index": ({"random_index": torch.full((16, 10), 999, dtype=torch.int32)}, {}, r"tensor 'random_index' must "
                  r"hold -1 or a row"),
        "pieces index": ({"top_pieces": torch.tensor([[0, 5]])}, {"pieces": '["x"]'}, r"tensor 'top_pieces' points "
                         r"outside 'top_tokens' or field 'pieces'"),
    }  # fmt: skip
    for case, (tensor_changes, meta_changes, message) in cases.items():
        path = tmp_path / f"{case}.safetensors"
        t = {k: v for k, v in {**tensors, **tensor_changes}.items() if v is not None}
        m = {k: v for k, v in {**meta, **meta_changes}.items() if v is not None}
        save_file(t, path, metadata=m)
        with pytest.raises(InputError, match=rf"^{re.escape(str(path))}: {message}.*; rebuild the file"):
            ActivationExamples.load(path)
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(good_path.read_bytes()[:100])
    with pytest.raises(InputError, match=rf"{re.escape(str(path))} is not a readable activation-examples file"):
        ActivationExamples.load(path)


def test_contexts_collects_an_explain_and_a_score_split_from_disjoint_documents(world, tmp_path, capsys):
    """The score split (for scorers, never for labellers) is read from other documents than the explain split;
    it keeps more contexts per feature, among them firing ones sampled across the feature's range. Each document
    here is one word repeated, so a window's words say which documents it came from."""
    root, *_ = world
    docs = {w: " ".join([w] * 60) for w in CORPUS_WORDS}
    (tmp_path / "corpus.txt").write_text("\n\n".join(docs.values()))
    score_words = {w for w, d in docs.items() if score_split_of(d)}
    assert 0 < len(score_words) < len(docs)  # both splits have documents
    out = tmp_path / "ex.safetensors"
    argv = ["contexts", "--sae", str(root / "sae"), "--model", str(root / "tiny-gemma3"), "--corpus",
            str(tmp_path / "corpus.txt"), "--tokens", "3000", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert "score split" in capsys.readouterr().out
    explain, score = ActivationExamples.load(out), ActivationExamples.load(score_split_path(out))

    def words(examples: ActivationExamples) -> set[str]:
        contexts = [c for f in examples.live_features() for c in examples[f].top + examples[f].sampled]
        texts = [c.text for c in contexts + examples[0].random]
        return {w for w in CORPUS_WORDS for t in texts if w in t}  # cut-off words at a window's edge name none

    assert words(score) and words(score) <= score_words
    assert words(explain) and not words(explain) & score_words
    # 10 top, 10 sampled and up to 20 non-firing contexts (the explain split: 10 and 10; few non-firing windows
    # exist in so little text)
    f = max(score.live_features(), key=lambda i: min(len(score[i].sampled), len(score[i].random)))
    assert len(score[f].top) == 10 and len(score[f].sampled) == 10 and len(score[f].random) >= 10
    assert all(c.max_value > 0 for c in score[f].sampled)
    assert explain[f].sampled == [] and len(explain[f].top) <= 10  # the explain split is today's layout
    ActivationExamples.load(DEMO_EXAMPLES)  # files written before the split still load


DEMO_EXAMPLES = DEMO_SAE_DIR / EXAMPLES_FILE
