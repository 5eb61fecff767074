"""Neuronpedia upload against a loopback server that implements the upload-batch contract."""

from __future__ import annotations

import pytest
from fake_neuronpedia import FakeNeuronpedia
from sae_selfexplain_plugin.adapters.cli import main
from sae_selfexplain_plugin.adapters.neuronpedia import UploadError, upload

from sae_selfexplain_plugin import Explanation, FeatureExplanations
from sae_selfexplain_plugin.export import export_jsonl
from sae_selfexplain_plugin.store import ResultsStore

KEY = "secret-key-123"


def record(i, text="a fruit"):
    chosen = Explanation(i, text, 4.0, 2, "identity")
    act = {"source": "own explanation", "tokens": [" a", " fruit"], "values": [0.0, 1.5]}
    return FeatureExplanations(i, [chosen], 0, model_id="m", settings_hash="h",
                               sae={"neuronpedia_id": "gemma-3-270m/6-test"}, activations=[act])  # fmt: skip


@pytest.fixture
def server():
    with FakeNeuronpedia(KEY) as s:
        yield s


@pytest.fixture
def ledger(tmp_path):
    with ResultsStore(tmp_path / "ledger.db") as store:
        yield store


def go(records, server, ledger, logs=None, **kw):
    kw = {"model_id": "Gemma-3-270m", "source": "6-test", "ledger": ledger, "api_key": KEY, "host": server.url,
          "allow_http": True, "backoff_s": 0.0, "log": (logs.append if logs is not None else lambda m: None),
          **kw}  # fmt: skip
    return upload(records, **kw)


def test_batches_of_at_most_128_and_idempotent(server, ledger):
    summary = go([record(i) for i in range(300)], server, ledger)
    assert (summary.sent, summary.batches) == (300, 3)
    assert [len(b["features"]) for b in server.received] == [128, 128, 44]
    assert server.received[0]["modelId"] == "gemma-3-270m"  # lowercased, as Neuronpedia does
    feature = server.received[0]["features"][0]
    assert feature["explanations"] == [{"text": "a fruit"}] and feature["activations"][0]["values"] == [0.0, 1.5]
    again = go([record(i) for i in range(300)], server, ledger)
    assert (again.sent, again.already, len(server.received)) == (0, 300, 3)
    changed = go([record(5, "a yellow fruit")], server, ledger)  # a new explanation is a new upload
    assert changed.sent == 1


def test_records_without_activations_or_text_are_skipped(server, ledger):
    bare = record(1)
    bare.activations = []
    summary = go([bare, record(2, "  "), record(3)], server, ledger)
    assert summary.skipped == [1, 2] and summary.sent == 1


def test_retries_429_and_500_then_succeeds(server, ledger):
    server.fail_next = [429, 500]
    logs = []
    summary = go([record(1)], server, ledger, logs)
    assert summary.sent == 1 and server.requests == 3
    assert len(logs) == 2 and "retrying" in logs[0]


def test_persistent_5xx_fails_clearly_and_keeps_earlier_batches(server, ledger):
    records = [record(i) for i in range(200)]
    go(records[:128], server, ledger)
    server.fail_next = [503] * 10
    with pytest.raises(UploadError, match="batch starting at feature 128 failed: HTTP 503"):
        go(records, server, ledger, max_retries=2)
    assert len(ledger.uploaded(server.url, "gemma-3-270m", "6-test")) == 128


def test_bad_key_is_reported_without_the_key(server, ledger, capsys):
    with pytest.raises(UploadError, match="refused the API key") as err:
        go([record(1)], server, ledger, api_key="wrong-key-xyz")
    assert "wrong-key-xyz" not in str(err.value) and "wrong-key-xyz" not in capsys.readouterr().out


def test_dry_run_sends_nothing_and_records_nothing(server, ledger):
    logs = []
    summary = go([record(i) for i in range(130)], server, ledger, logs, dry_run=True, api_key=None)
    assert summary.sent == 130 and server.requests == 0 and len(logs) == 2
    assert ledger.uploaded(server.url, "gemma-3-270m", "6-test") == set()


def test_cli_upload_reads_the_key_from_the_environment(server, tmp_path, monkeypatch, capsys):
    results = tmp_path / "r.jsonl"
    export_jsonl([record(1), record(2)], results)
    monkeypatch.delenv("NEURONPEDIA_API_KEY", raising=False)
    assert main(["upload", "--results", str(results), "--host", server.url, "--allow-http"]) == 2
    assert "NEURONPEDIA_API_KEY" in capsys.readouterr().err
    monkeypatch.setenv("NEURONPEDIA_API_KEY", KEY)
    assert main(["upload", "--results", str(results), "--host", server.url, "--allow-http"]) == 0
    out = capsys.readouterr()
    assert "sent 2 features in 1 batches to gemma-3-270m/6-test" in out.out
    assert KEY not in out.out + out.err
    assert all(KEY.encode() not in p.read_bytes() for p in tmp_path.iterdir())  # nor in any file
    assert main(["upload", "--results", str(results), "--host", server.url, "--allow-http"]) == 0
    assert "2 already uploaded" in capsys.readouterr().out
