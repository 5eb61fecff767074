"""Neuronpedia upload against a loopback server mirroring Neuronpedia's upload-batch route (fake_neuronpedia.py)."""

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


def test_retries_429_and_503_then_succeeds(server, ledger):
    server.fail_next = [429, 503]
    logs = []
    summary = go([record(1)], server, ledger, logs)
    assert summary.sent == 1 and server.requests == 3
    assert len(logs) == 2 and "retrying" in logs[0]


def test_a_500_is_reported_once_with_its_likely_causes(server, ledger):
    server.fail_next = [500]
    with pytest.raises(UploadError, match=r"answered 500.*source set does not exist or was not created by you"):
        go([record(1)], server, ledger)
    assert server.requests == 1  # no retry storm: a 500 here is a request that cannot succeed


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
    assert "batch 1: would POST 128 features (indices 0..127" in logs[0] and "bytes" in logs[0]
    assert "batch 2: would POST 2 features (indices 128..129" in logs[1]
    assert ledger.uploaded(server.url, "gemma-3-270m", "6-test") == set()


def test_cli_upload_reads_the_key_from_the_environment(server, tmp_path, monkeypatch, capsys):
    results = tmp_path / "r.jsonl"
    export_jsonl([record(1), record(2)], results)
    monkeypatch.delenv("NEURONPEDIA_API_KEY", raising=False)
    assert main(["upload", "--results", str(results), "--host", server.url, "--allow-http", "--source", "6-test"]) == 2
    assert "NEURONPEDIA_API_KEY" in capsys.readouterr().err
    monkeypatch.setenv("NEURONPEDIA_API_KEY", KEY)
    assert main(["upload", "--results", str(results), "--host", server.url, "--allow-http", "--source", "6-test"]) == 0
    out = capsys.readouterr()
    assert "sent 2 features in 1 batches to gemma-3-270m/6-test" in out.out
    assert KEY not in out.out + out.err
    assert all(KEY.encode() not in p.read_bytes() for p in tmp_path.iterdir())  # nor in any file
    assert main(["upload", "--results", str(results), "--host", server.url, "--allow-http", "--source", "6-test"]) == 0
    assert "2 already uploaded" in capsys.readouterr().out


# --- what the real server refuses, and what our client does about it (route.tsx, mirrored) ---


def raw_post(server, body, key=KEY):
    """POST a body as is, bypassing our client: what the server itself answers."""
    import json
    import urllib.error
    import urllib.request

    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(server.url + "/api/feature/upload-batch", data=data, method="POST",
                                     headers={"Content-Type": "application/json", "x-api-key": key})  # fmt: skip
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def body(**feature_changes):
    feature = {"index": 1, "explanations": [{"text": "a fruit"}], "activations": [{"tokens": [" a"], "values": [1.0]}]}
    return {"modelId": "Gemma-3-270m", "source": "6-test", "features": [{**feature, **feature_changes}]}


# Bodies and what Neuronpedia answers, read from its route.tsx / api-error.ts (the real server cannot run here).
# The double must agree with each, and our `validate` must flag each one the real server refuses.
ANSWERS = [
    ("accepted", body(), 200),
    ("empty-token", body(activations=[{"tokens": [""], "values": [1.0]}]), 400),
    ("text-513-utf16-units", body(explanations=[{"text": "😀" * 256 + "a"}]), 400),  # 256 emoji = 512 units
    ("text-512-utf16-units", body(explanations=[{"text": "😀" * 256}]), 200),
    ("no-activations", body(activations=[]), 400),
    ("index-too-large", body(index=10_000_001), 400),
    ("density-above-1", body(density=1.5), 400),
    ("length-mismatch", body(activations=[{"tokens": [" a", " b"], "values": [1.0]}]), 500),
    ("model-name", body(explanations=[{"text": "a fruit", "modelName": "gpt-4o-mini"}]), 500),
]


@pytest.mark.parametrize(("name", "doc", "status"), ANSWERS, ids=[a[0] for a in ANSWERS])
def test_the_double_answers_as_neuronpedia_and_validate_agrees(server, name, doc, status):
    from sae_selfexplain_plugin.formats import validate

    assert raw_post(server, doc)[0] == status
    assert (validate(doc, "neuronpedia-upload-batch") == []) == (status == 200), name


@pytest.mark.parametrize(
    ("doc", "key", "status"),
    [(body(), "nope", 401), ({**body(), "source": "12-gemmascope-res-16k"}, KEY, 500),  # Neuronpedia's own set
     ({**body(), "source": "6-other"}, KEY, 500), (body(), "other-users-key", 500),
     ({**body(), "features": [body()["features"][0]] * 2}, KEY, 500),  # duplicate index
     (body(explanations=[{"text": "x", "methodName": "unknown-method"}]), KEY, 500),
     (b'{"modelId": "m", "source": "6-test", "features": [{"index": NaN}]}', KEY, 500)],
    ids=["bad-key", "not-your-source-set", "no-such-source-set", "another-users-set", "duplicate-index",
         "unknown-method", "nan"],
)  # fmt: skip
def test_the_double_refuses_what_neuronpedia_refuses(server, doc, key, status):
    code, answer = raw_post(server, doc, key)
    assert code == status
    if status == 500:  # api-error.ts: the reason is never told
        assert answer["error"] == "Something went wrong on our end. The error has been reported."


def test_the_client_repairs_what_it_can(server, ledger):
    r = record(1, "😀" * 300)  # 600 UTF-16 units: cut to 512 (256 emoji), never half a surrogate pair
    r.activations = [{"source": "s", "tokens": ["", " a", " b"], "values": [0.5, 1.0, 2.0]}]  # "" dropped
    assert go([r], server, ledger).sent == 1
    sent = server.received[0]["features"][0]
    assert sent["explanations"][0]["text"] == "😀" * 256
    assert sent["activations"] == [{"tokens": [" a", " b"], "values": [1.0, 2.0]}]


def test_nan_is_refused_before_sending(server, ledger):
    r = record(1)
    r.activations[0]["values"] = [float("nan"), 1.0]
    with pytest.raises(Exception, match="non-finite"):
        go([r], server, ledger)
    assert server.requests == 0


def test_a_resend_without_the_ledger_stores_duplicates(server, tmp_path):
    with ResultsStore(tmp_path / "a.db") as a, ResultsStore(tmp_path / "b.db") as b:
        go([record(1)], server, a)
        go([record(1)], server, b)  # a lost ledger: the server stores the explanation again
    assert len(server.neurons) == 1 and len(server.explanations) == 2


def test_rate_limited_uploads_wait_and_finish(server, ledger):
    server.rate_limit = 1
    with pytest.raises(UploadError, match="HTTP 429"):
        go([record(i) for i in range(200)], server, ledger, max_retries=2)
    assert len(ledger.uploaded(server.url, "gemma-3-270m", "6-test")) == 128  # the first batch is kept


def test_cli_refuses_model_name_and_needs_a_source(server, tmp_path, monkeypatch, capsys):
    results = tmp_path / "r.jsonl"
    export_jsonl([record(1)], results)
    monkeypatch.setenv("NEURONPEDIA_API_KEY", KEY)
    base = ["upload", "--results", str(results), "--host", server.url, "--allow-http"]
    assert main([*base, "--source", "6-test", "--model-name", "gpt-4o-mini"]) == 2
    assert "--model-name cannot work" in " ".join(capsys.readouterr().err.split())
    assert main(base) == 2
    assert "upload needs --source" in " ".join(capsys.readouterr().err.split())
    assert server.requests == 0


@pytest.mark.parametrize(
    ("changes", "what"),
    [({"source": "12-gemmascope-res-16k"}, "a source set Neuronpedia owns"), ({"source": "6-nope"}, "no such set"),
     ({"method_name": "unknown-method"}, "an unknown method name")],
)  # fmt: skip
def test_requests_that_cannot_succeed_fail_once_with_the_causes(server, ledger, changes, what):
    with pytest.raises(UploadError, match=r"answered 500.*not created by you.*--method-name"):
        go([record(1)], server, ledger, **changes)
    assert server.requests == 1, what  # reported at once: no retry storm
    assert ledger.uploaded(server.url, "gemma-3-270m", changes.get("source", "6-test")) == set()


def test_create_source_then_upload(server, tmp_path, monkeypatch, capsys):
    results = tmp_path / "r.jsonl"
    export_jsonl([record(1), record(2)], results)
    monkeypatch.setenv("NEURONPEDIA_API_KEY", KEY)
    base = ["upload", "--results", str(results), "--host", server.url, "--allow-http"]
    assert main([*base, "--source", "6-mine"]) == 2  # no such set yet: the route's bare 500, reported
    assert main([*base, "--source", "6-mine", "--create-source"]) == 0
    out = capsys.readouterr()
    said = " ".join((out.out + out.err).split())
    assert "created the source set of 6-mine" in said and "sent 2 features" in said
    assert server.source_sets[("gemma-3-270m", "mine")][0] == "user-1"
    assert main([*base, "--source", "6-mine", "--create-source"]) == 0  # exists: found, nothing new to send
    out = capsys.readouterr()
    assert "found the source set" in " ".join((out.out + out.err).split())


def test_create_source_errors(server, monkeypatch):
    from sae_selfexplain_plugin.adapters.neuronpedia import create_source_set

    monkeypatch.setenv("NEURONPEDIA_API_KEY", KEY)
    with pytest.raises(UploadError, match="no model 'nope'"):
        create_source_set("nope", "6-mine", host=server.url, allow_http=True)
    with pytest.raises(UploadError, match="not LAYER-SETNAME"):
        create_source_set("gemma-3-270m", "6-Bad--Name", host=server.url, allow_http=True)
