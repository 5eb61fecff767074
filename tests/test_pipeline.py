"""The results store and the `explain` pipeline on a tiny saved model and SAE (offline)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import build_tokenizer, tiny_gemma
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata
from sae_selfexplain_plugin.adapters.backends import load_model
from sae_selfexplain_plugin.adapters.cli import main
from sae_selfexplain_plugin.adapters.cli.common import parse_features
from sae_selfexplain_plugin.adapters.sae_lens import load_sae, vocabulary_labels

from sae_selfexplain_plugin import FeatureExplanations, InputError
from sae_selfexplain_plugin.files import OutputError, atomic_writer
from sae_selfexplain_plugin.store import SCHEMA_VERSION, ResultsStore, StoreError

D_SAE = 48
FAST = ["--template", "test-open", "--scales", "1,4", "--max-new-tokens", "3", "--batch-size", "4"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny Gemma 3 checkpoint folder named like the SAE's model_name, and a saved SAE for it."""
    root = tmp_path_factory.mktemp("assets")
    tok = build_tokenizer()
    model_dir = root / "tiny-gemma3"
    tiny_gemma(len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    torch.manual_seed(0)
    meta = SAEMetadata(
        model_name="tiny-gemma3", hook_name="blocks.2.hook_resid_pre", neuronpedia_id="tiny-gemma3/2-test"
    )
    sae = StandardSAE(StandardSAEConfig(d_in=64, d_sae=D_SAE, metadata=meta))
    with torch.no_grad():
        sae.W_dec.copy_(torch.randn_like(sae.W_dec))
    sae_dir = root / "sae"
    sae.save_model(sae_dir)
    return model_dir, sae_dir


def explain_args(assets, out, *extra):
    model_dir, sae_dir = assets
    return ["explain", "--sae", str(sae_dir), "--model", str(model_dir), "--out", str(out), *FAST, *extra]


def read_jsonl(path):
    return [FeatureExplanations.from_json(line) for line in Path(path).read_text().splitlines()]


def test_explain_generates_every_scale_when_asked(assets, tmp_path):
    out = tmp_path / "r.jsonl"
    assert main(explain_args(assets, out, "--features", "0,1", "--generate", "all", "--metrics")) == 0
    (a, b) = read_jsonl(out)
    assert [c.scale for c in a.candidates] == [1.0, 4.0] and a.sweep["scale"] == [1.0, 4.0]
    one = tmp_path / "one.jsonl"
    assert main(explain_args(assets, one, "--features", "0,1")) == 0
    # the same chosen labels as generating every scale
    assert [r.chosen.text for r in read_jsonl(one)] == [a.chosen.text, b.chosen.text]


def test_explain_writes_every_feature_in_order(assets, tmp_path):
    out = tmp_path / "r.jsonl"
    assert main(explain_args(assets, out, "--features", "5-9,2")) == 0
    records = read_jsonl(out)
    assert [r.feature_id for r in records] == [2, 5, 6, 7, 8, 9]
    # explain's default: one generation per feature, at the fixed policy's scale
    assert all(len(r.candidates) == 1 and r.chosen.scale == 4.0 and not r.sweep for r in records)
    assert records[0].sae["neuronpedia_id"] == "tiny-gemma3/2-test" and records[0].package_version
    for r in records:  # the feature's own activations over its explanation: what a Neuronpedia upload needs
        if not r.chosen.text.strip():
            assert r.activations == []  # nothing to run through the SAE
            continue
        (act,) = r.activations
        assert act["source"] == "own explanation" and len(act["tokens"]) == len(act["values"]) > 0
    assert sum(bool(r.activations) for r in records) >= 3
    assert main(["upload", "--results", str(out), "--dry-run", "--source", "2-test"]) == 0
    assert (tmp_path / "r.db").exists()


def test_explain_records_the_vocabulary_probe_when_asked(assets, tmp_path):
    plain, probed = tmp_path / "plain.jsonl", tmp_path / "probed.jsonl"
    assert main(explain_args(assets, plain, "--features", "0-5")) == 0
    assert main(explain_args(assets, probed, "--features", "0-5", "--vocabulary")) == 0
    records = read_jsonl(probed)
    assert all(r.vocabulary == [] for r in read_jsonl(plain))
    assert [r.text for r in records] == [r.text for r in read_jsonl(plain)]  # the explanations do not change
    model_dir, sae_dir = assets
    sae, _ = load_sae(str(sae_dir))
    expected = vocabulary_labels(sae, load_model(str(model_dir)), list(range(6)))
    assert any(expected)
    for r, tokens in zip(records, expected):
        assert [v["token"] for v in r.vocabulary] == [t for t, _ in tokens]
        assert [v["activation"] for v in r.vocabulary] == pytest.approx([a for _, a in tokens], abs=1e-4)
    assert main(["validate", str(probed)]) == 0
    bad = tmp_path / "bad.jsonl"  # the record schema checks the field's items
    bad.write_text(probed.read_text().replace('"activation": ', '"activation": "high", "was": ', 1))
    assert main(["validate", str(bad)]) == 1


def test_resume_skips_what_is_done(assets, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    main(explain_args(assets, out, "--features", "0-5"))
    first = {r.feature_id: r.to_dict() for r in read_jsonl(out)}
    capsys.readouterr()
    assert main(explain_args(assets, out, "--features", "0-9", "--resume")) == 0
    printed = capsys.readouterr().out
    assert "4 features explained" in printed and "6 already in the store" in printed
    records = read_jsonl(out)
    assert [r.feature_id for r in records] == list(range(10))
    assert all(r.to_dict() == first[r.feature_id] for r in records if r.feature_id in first)  # reused, unchanged


def test_killed_run_loses_at_most_the_batch_in_flight(assets, tmp_path):
    out, db = tmp_path / "k.jsonl", tmp_path / "k.db"
    cli = [*explain_args(assets, out, "--store", str(db))]
    cli[cli.index("--template") + 1] = "identity"  # the child process does not have the tests' templates
    # One feature per committed batch, and enough work per feature that the kill lands mid-run.
    cli[cli.index("--scales") + 1] = "1,2,3,4,5,6,7,8"
    cli[cli.index("--max-new-tokens") + 1] = "16"
    cli[cli.index("--batch-size") + 1] = "8"
    log = tmp_path / "child.log"
    with log.open("w") as err:
        child = subprocess.Popen([sys.executable, "-m", "sae_selfexplain_plugin.adapters.cli", *cli], stderr=err)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if db.exists() and _count(db) >= 3:
                break
            time.sleep(0.01)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(30)
    finally:
        child.kill()
    kept = _count(db)
    assert 3 <= kept < D_SAE, f"the child should have been killed mid-run; its log: {log.read_text()[-2000:]}"
    assert not out.exists()  # the JSONL is only written, atomically, at the end
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert main([*cli, "--resume"]) == 0
    assert [r.feature_id for r in read_jsonl(out)] == list(range(D_SAE))
    fresh = tmp_path / "fresh.jsonl"
    assert main([*cli[: cli.index("--out")], "--out", str(fresh), *cli[cli.index("--out") + 2 :]]) == 0
    assert [c.text for r in read_jsonl(out) for c in r.candidates] == [
        c.text for r in read_jsonl(fresh) for c in r.candidates
    ]


def _count(db):
    try:
        with sqlite3.connect(db, timeout=5) as con:
            return con.execute("SELECT COUNT(*) FROM explanations").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def _write_records(path, worker, n):
    with ResultsStore(path) as store:
        for i in range(n):
            rec = FeatureExplanations(feature_id=worker * 1000 + i, candidates=[], model_id="m", settings_hash="h")
            store.put([rec], "sae")


def test_two_processes_write_one_store(tmp_path):
    import multiprocessing

    db = tmp_path / "shared.db"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_write_records, args=(db, w, 50)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    with ResultsStore(db) as store:
        assert len(store.done("m", "sae", "h")) == 100


def test_store_from_a_newer_schema_is_refused(tmp_path):
    db = tmp_path / "new.db"
    ResultsStore(db).close()
    with sqlite3.connect(db) as con:
        con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    with pytest.raises(StoreError, match="newer than this sae-selfexplain"):
        ResultsStore(db)


def test_unwritable_store_path(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="writable --store"):
        ResultsStore(blocker / "sub" / "runs.db")


def test_failed_batch_keeps_nothing(tmp_path):
    with ResultsStore(tmp_path / "s.db") as store:
        good = FeatureExplanations(feature_id=1, candidates=[], model_id="m", settings_hash="h")
        bad = FeatureExplanations(feature_id=2, candidates=[], model_id="m", settings_hash="h")
        bad.to_json = lambda: None  # NOT NULL violation inside the transaction  # type: ignore[method-assign]
        with pytest.raises(StoreError, match="nothing of this batch was kept"):
            store.put([good, bad], "sae")
        assert store.done("m", "sae", "h") == set()


def test_full_disk_leaves_no_partial_output(tmp_path, monkeypatch):
    target = tmp_path / "out.jsonl"
    target.write_text("previous\n")

    with pytest.raises(OutputError, match="previous file, if any, is unchanged"), atomic_writer(target) as f:
        f.write("half")
        raise OSError(28, "No space left on device")
    assert target.read_text() == "previous\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


@pytest.mark.parametrize(
    ("spec", "match"),
    [("0-48", "outside the SAE"), ("5-2", "low-high"), ("a-b", "cannot read feature"), ("", "no features")],
)
def test_bad_feature_specs(spec, match):
    with pytest.raises(InputError, match=match):
        parse_features(spec, D_SAE)


def test_feature_file(tmp_path):
    f = tmp_path / "feats.txt"
    f.write_text("3\n1, 2\n\n7-8\n3\n")
    assert parse_features(str(f), D_SAE) == [3, 1, 2, 7, 8]


def test_truncated_sae_weights_are_a_clear_error(assets, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for p in assets[1].iterdir():
        data = p.read_bytes()
        (broken / p.name).write_bytes(data[: len(data) // 2] if p.suffix == ".safetensors" else data)
    with pytest.raises(InputError, match=r"cannot read the SAE weights .*the file is corrupt or truncated"):
        load_sae(str(broken))


def test_cli_reports_bad_input(assets, tmp_path, capsys):
    assert main(explain_args(assets, tmp_path / "o.jsonl", "--features", "0-999")) == 2
    assert "outside the SAE" in capsys.readouterr().err
    assert main(["explain", "--sae", str(tmp_path), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "not a SAELens SAE folder" in capsys.readouterr().err


def test_explain_without_sae_lens_names_the_extra(monkeypatch, tmp_path, capsys):
    import builtins

    real_import = builtins.__import__

    def no_pipeline(name, *args, **kwargs):  # the whole-SAE application, as if it failed to import sae_lens
        if name.endswith("whole_sae"):
            raise ImportError("No module named 'sae_lens'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pipeline)
    assert main(["explain", "--sae", str(tmp_path), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "sae-selfexplain[saelens]" in capsys.readouterr().err


def test_claims_share_the_work_of_two_resuming_runs(tmp_path):
    with ResultsStore(tmp_path / "s.db") as store:
        key = ("m", "sae", "h")
        assert store.claim(*key, [0, 1, 2, 3], owner="a") == [0, 1, 2, 3]
        assert store.claim(*key, [0, 1, 2, 3, 4, 5], owner="b") == [4, 5]  # a's claims are live
        assert store.claim(*key, [0, 1], owner="a") == [0, 1]  # its own claims stay its own
        assert store.claim(*key, [0, 1], owner="b", lease_s=0.0) == [0, 1]  # a crashed run's claims expire
        rec = FeatureExplanations(2, [], None, model_id="m", settings_hash="h")
        store.put([rec], "sae")
        assert store.claim(*key, [2, 3], owner="c", lease_s=0.0) == [3]  # stored features are never claimed


def test_resume_leaves_features_another_run_claimed(assets, tmp_path, capsys):
    out = tmp_path / "o.jsonl"
    assert main(explain_args(assets, out, "--features", "0-1")) == 0
    store_path = out.with_suffix(".db")
    first = read_jsonl(out)[0]
    with ResultsStore(store_path) as store:
        key = (first.model_id, load_sae(str(assets[1]))[1], first.settings_hash)  # the run's store key
        assert store.claim(*key, [2, 3], owner="other run") == [2, 3]
    capsys.readouterr()
    assert main(explain_args(assets, out, "--features", "0-5", "--resume")) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "2 features explained" in said and "2 features were claimed by another run" in said
    assert [r.feature_id for r in read_jsonl(out)] == [0, 1, 4, 5]
