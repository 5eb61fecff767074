"""Neuronpedia upload against a loopback server mirroring Neuronpedia's upload-batch route (fake_neuronpedia.py)."""

from __future__ import annotations

import contextlib
import functools
import json
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from typing import Any

import pytest
from fake_neuronpedia import FakeNeuronpedia
from loopback import LoopbackServer, send_json
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


# --- the network policy: drops, silence, long waits; the key's format and redaction; one SAE a source ---


class Flaky(LoopbackServer):
    """In front of the double: each request first meets the next of `faults` ("close": the connection closed
    before any answer, http.client's RemoteDisconnected; "reset": a TCP reset, ConnectionResetError); once
    they are used up, requests pass through to `target` unchanged."""

    def __init__(self, target: FakeNeuronpedia | None, faults: list[str]) -> None:
        self.faults, self.seen = list(faults), 0
        flaky = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                flaky.seen += 1
                if flaky.faults or target is None:
                    if (flaky.faults.pop(0) if flaky.faults else "close") == "reset":
                        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        self.connection.close()  # linger 0: close sends RST, not FIN
                    self.close_connection = True
                    return
                assert target is not None
                forward = urllib.request.Request(target.url + self.path, data=body, method="POST",
                                                 headers=dict(self.headers.items()))  # fmt: skip
                try:
                    with urllib.request.urlopen(forward, timeout=10) as r:
                        status, answer = r.status, r.read()
                except urllib.error.HTTPError as e:
                    status, answer = e.code, e.read()
                send_json(self, status, json.loads(answer))

        super().__init__(Handler)


class Silent:
    """A loopback server that accepts connections (counted) and never answers: a server that hangs."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.held: list[socket.socket] = []

    def _accept(self) -> None:
        for _ in range(64):  # bounded; ends when the listening socket is closed
            try:
                self.held.append(self.sock.accept()[0])
            except OSError:
                return

    def __enter__(self) -> Silent:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


class Answering(LoopbackServer):
    """Answers every POST with `answer(handler)`."""

    def __init__(self, answer: Callable[[BaseHTTPRequestHandler], None]) -> None:
        self.seen = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.seen += 1
                answer(self)

        super().__init__(Handler)


@pytest.mark.parametrize("fault", ["close", "reset"])
def test_connection_drops_are_retried_like_a_503(server, ledger, fault):
    logs = []
    with Flaky(server, [fault, fault]) as front:
        summary = go([record(1)], front, ledger, logs)
    assert summary.sent == 1 and front.seen == 3 and len(server.received) == 1
    assert len(logs) == 2 and "retrying" in logs[0]
    assert len(ledger.uploaded(front.url, "gemma-3-270m", "6-test")) == 1


@pytest.mark.parametrize(("fault", "said"), [("close", "closed the connection without answering"),
                                             ("reset", "reset the connection")])  # fmt: skip
def test_persistent_drops_fail_naming_the_host_and_the_fix(server, ledger, fault, said):
    records = [record(i) for i in range(200)]
    with Flaky(server, []) as front:
        go(records[:128], front, ledger)  # the first batch gets through
        front.faults = [fault] * 10
        with pytest.raises(UploadError) as err:
            go(records, front, ledger, max_retries=2)
    message = str(err.value)
    assert f"{front.url} {said} (3 tries)" in message and "batch starting at feature 128" in message
    assert "Fix: check that it is up, then rerun" in message and front.seen == 1 + 3
    assert len(ledger.uploaded(front.url, "gemma-3-270m", "6-test")) == 128  # the first batch is kept


def test_a_silent_server_is_given_up_on_promptly(ledger):
    logs: list[str] = []
    with Silent() as silent:
        start = time.monotonic()
        with pytest.raises(UploadError, match=r"did not answer within 0\.3 s \(--timeout\) \(2 tries\)") as err:
            upload([record(1)], model_id="m", source="6-test", ledger=ledger, api_key=KEY, host=silent.url,
                   allow_http=True, timeout_s=0.3, backoff_s=0.0, log=logs.append)  # fmt: skip
        took = time.monotonic() - start
    # two tries of 0.3 s; before, six tries of the timeout plus 31 s of backoff (6.5 min at 60 s)
    assert took < 3 and len(silent.held) == 2, (took, len(silent.held))
    assert "raise --timeout" in str(err.value) and len(logs) == 1
    assert ledger.uploaded(silent.url, "m", "6-test") == set()


def test_a_server_dripping_its_answer_is_given_up_on_too(ledger):
    """Each byte arrives within --timeout, the whole answer never does: a try ends after 2 x --timeout."""

    def drip(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", "100")
        h.end_headers()
        with contextlib.suppress(OSError):  # the client hangs up: stop
            for _ in range(40):  # at most 8 s of drops, then the handler ends by itself
                h.wfile.write(b" ")
                h.wfile.flush()
                time.sleep(0.2)

    with Answering(drip) as dripping:
        start = time.monotonic()
        with pytest.raises(UploadError, match=r"did not answer within 0\.5 s \(--timeout\) \(2 tries\)"):
            upload([record(1)], model_id="m", source="6-test", ledger=ledger, api_key=KEY, host=dripping.url,
                   allow_http=True, timeout_s=0.5, backoff_s=0.0)  # fmt: skip
        took = time.monotonic() - start
    assert took < 4 and dripping.seen == 2, (took, dripping.seen)  # before: each try held for the whole drip
    assert ledger.uploaded(dripping.url, "m", "6-test") == set()


@pytest.mark.parametrize("bad", ["0", "-1", "nan", "inf", "601", "soon"])
def test_cli_timeout_must_be_sane_seconds(bad, tmp_path, capsys):
    results = tmp_path / "r.jsonl"
    export_jsonl([record(1)], results)
    with pytest.raises(SystemExit) as exit_:
        main(["upload", "--results", str(results), "--source", "6-test", "--timeout", bad])
    assert exit_.value.code == 2
    assert "--timeout: expected seconds above 0 and at most 600" in " ".join(capsys.readouterr().err.split())


@pytest.mark.parametrize("header", ["99999", "inf"])
def test_a_retry_after_beyond_the_cap_is_reported_not_slept(ledger, header):
    slept: list[float] = []
    busy = Answering(lambda h: send_json(h, 429, {"error": "slow down"}, {"Retry-After": header}))
    with busy, pytest.raises(UploadError, match=r"asks to wait .* \(HTTP 429, Retry-After\).*rerun later"):
        go([record(1)], busy, ledger, sleep=slept.append)
    assert slept == [] and busy.seen == 1


def test_a_retry_after_of_nan_waits_the_backoff(ledger):
    slept: list[float] = []
    busy = Answering(lambda h: send_json(h, 503, {"error": "busy"}, {"Retry-After": "nan"}))
    with busy, pytest.raises(UploadError, match="HTTP 503"):
        go([record(1)], busy, ledger, sleep=slept.append, backoff_s=0.5, max_retries=2)
    assert slept == [0.5, 1.0]


BAD_KEYS = [("SECRET-a1b2\r\nX-Injected: 1", "a line break at position 12"),
            ("SECRET-a1b2\nSECRET-c3d4", "a line break at position 12"),
            ("SECRET-клю-ч", "a non-ASCII character at position 8"),  # not latin-1: UnicodeEncodeError before
            ("SECRET-é-a1b2", "a non-ASCII character at position 8"),  # latin-1: would have been sent as is
            ("SECRET a1b2", "a space or control character at position 7")]  # fmt: skip


@pytest.mark.parametrize(("key", "said"), BAD_KEYS, ids=["crlf", "lf", "cyrillic", "latin-1", "space"])
def test_a_key_that_cannot_be_a_header_is_refused_before_use(server, ledger, tmp_path, monkeypatch, capsys, key,
                                                             said):  # fmt: skip
    with pytest.raises(UploadError, match=said) as err:
        go([record(1)], server, ledger, api_key=key)
    assert "SECRET" not in str(err.value) and server.requests == 0
    results = tmp_path / "r.jsonl"
    export_jsonl([record(1)], results)
    monkeypatch.setenv("NEURONPEDIA_API_KEY", key)
    base = ["upload", "--results", str(results), "--host", server.url, "--allow-http", "--source", "6-mine"]
    for argv in (base, [*base, "--create-source"], ["--debug", *base]):
        assert main(argv) == 2
        out = capsys.readouterr()
        assert "SECRET" not in out.out + out.err and said in " ".join(out.err.split())
    assert server.requests == 0


def leaks(key: str, said: str) -> list[str]:
    """Every 6-character piece of `key` (of each of its lines) found in `said`."""
    return [p for part in key.splitlines() for i in range(len(part) - 5) if (p := part[i : i + 6]) in said]


def test_the_key_is_redacted_in_every_error_path(server, tmp_path, monkeypatch, capsys):
    """The key planted in each failure; all output is searched for any piece of it."""
    from sae_selfexplain_plugin.adapters import neuronpedia

    key = "SECRET-planted-4f2a9c"
    results = tmp_path / "r.jsonl"
    export_jsonl([record(1)], results)
    monkeypatch.setenv("NEURONPEDIA_API_KEY", key)
    monkeypatch.setattr(neuronpedia, "upload", functools.partial(neuronpedia.upload, backoff_s=0.0))  # no waits

    def run(url, *extra, debug=False, key=key):
        flags = ["--allow-http", "--source", "6-test", "--ledger", str(tmp_path / "ledger.db"), *extra]
        code = main([*(["--debug"] if debug else []), "upload", "--results", str(results), "--host", url, *flags])
        out = capsys.readouterr()
        said = out.out + out.err
        assert leaks(key, said) == [], said
        return code, " ".join(said.split())

    # the key at the start, and across the 200th and 300th characters of the body (where messages are cut)
    quoted = (key + "x" * 200)[: 190 - len('{"error": "')] + (key + "x" * 100)[:100] + key
    echo = lambda status: lambda h: send_json(h, status, {"error": quoted})  # noqa: E731
    for status, verdict in ((400, "HTTP 400 "), (503, "HTTP 503 "), (200, "unexpected answer")):
        with Answering(echo(status)) as echoing:  # a server quoting the key
            code, said = run(echoing.url, "--timeout", "5")
        assert code == 2 and verdict in said and "***" in said
    with Flaky(None, []) as dropping:  # every try dropped: the last error names the host
        code, said = run(dropping.url)
    assert code == 2 and "closed the connection without answering (6 tries)" in said

    class Opener:  # an exception whose message quotes the key: the generic handler, and --debug's traceback
        def __init__(self, error: Exception) -> None:
            self.error = error

        def open(self, *args: Any, **kwargs: Any) -> None:
            raise self.error

    for error, code in ((ValueError("Invalid header value " + repr(key.encode())), 1),
                        (ValueError("y" * 290 + key), 1),  # the key across the 300-character cut
                        (OSError(f"socket says {key}"), 2)):  # fmt: skip
        monkeypatch.setattr(neuronpedia, "_OPENER", Opener(error))
        assert run(server.url, "--timeout", "1")[0] == code
        assert run(server.url, "--timeout", "1", debug=True)[0] == code

    # a key holding a line break, quoted by a bug as http.client would (bytes repr), as JSON, or one line of it
    crlf = "SECRET-a1b2c3\r\nSECRET-d4e5f6"
    monkeypatch.setenv("NEURONPEDIA_API_KEY", crlf)
    for message in (f"Invalid header value {crlf.encode()!r}", json.dumps(crlf), f"first line {crlf.split()[0]}"):

        def bug(*args: Any, message: str = message, **kwargs: Any) -> None:
            raise ValueError(message)

        monkeypatch.setattr(neuronpedia, "check_host", bug)
        for debug in (False, True):
            code, said = run(server.url, debug=debug, key=crlf)
            assert code == 1 and "***" in said


def test_a_server_echoing_an_altered_key_never_prints_it(server, tmp_path, monkeypatch, capsys):
    """A server may quote the key JSON-escaped ("\\/"), URL-encoded, or only its start: none of it is printed."""
    import urllib.parse

    from sae_selfexplain_plugin.adapters import neuronpedia

    key = "SECRET/slash+plus=eq/9z8y"
    results = tmp_path / "r.jsonl"
    export_jsonl([record(1)], results)
    monkeypatch.setenv("NEURONPEDIA_API_KEY", key)
    monkeypatch.setattr(neuronpedia, "upload", functools.partial(neuronpedia.upload, backoff_s=0.0))
    forms = {
        "json": json.dumps(key).strip('"').replace("/", "\\/"),
        "url": urllib.parse.quote(key, safe=""),
        "prefix": key[:12] + "...",
    }
    for name, form in forms.items():
        with Answering(lambda h, form=form: send_json(h, 400, {"error": f"bad key {form} (revoked)"})) as echoing:
            code = main(["upload", "--results", str(results), "--host", echoing.url, "--allow-http", "--source",
                         "6-test", "--ledger", str(tmp_path / "ledger.db"), "--timeout", "5"])  # fmt: skip
        out = capsys.readouterr()
        said = out.out + out.err
        assert code == 2 and "HTTP 400" in said and "***" in said, (name, said)
        assert leaks(form, said) == [] and leaks(key, said) == [], (name, said)


def test_an_upload_mixing_saes_or_settings_sends_nothing(server, ledger, tmp_path, monkeypatch, capsys):
    from sae_selfexplain_plugin import InputError

    other = record(2)
    other.sae = {"neuronpedia_id": "gemma-3-270m/6-test", "fingerprint": "0123456789abcdef"}
    mine = record(1)
    mine.sae = {**mine.sae, "fingerprint": "fedcba9876543210"}
    rerun = record(3)
    rerun.settings_hash = "other-settings"
    both = "mixes SAEs: gemma-3-270m/6-test (weights fedcba9876543210) and gemma-3-270m/6-test (weights 0123"
    for mixed, said in (([mine, other], both), ([record(1), rerun], "mixes runs with different settings")):
        with pytest.raises(InputError) as err:
            go(mixed, server, ledger)
        assert said in str(err.value)
        results = tmp_path / "mixed.jsonl"
        export_jsonl(mixed, results)
        monkeypatch.setenv("NEURONPEDIA_API_KEY", KEY)
        ledger_file = tmp_path / "cli-ledger.db"
        argv = ["upload", "--results", str(results), "--host", server.url, "--allow-http", "--source", "6-new",
                "--create-source", "--ledger", str(ledger_file)]  # fmt: skip
        assert main(argv) == 2
        assert said in " ".join(capsys.readouterr().err.split())
        assert not ledger_file.exists()
    assert server.requests == 0 and ("gemma-3-270m", "new") not in server.source_sets
    assert ledger.uploaded(server.url, "gemma-3-270m", "6-test") == set()


def test_create_source_set_fails_clearly_on_a_dropped_or_silent_server(monkeypatch):
    from sae_selfexplain_plugin.adapters.neuronpedia import create_source_set

    monkeypatch.setenv("NEURONPEDIA_API_KEY", KEY)
    with Flaky(None, []) as dropping, pytest.raises(UploadError) as err:
        create_source_set("gemma-3-270m", "6-mine", host=dropping.url, allow_http=True)
    assert f"creating the source set 'mine' failed: {dropping.url} closed the connection without answering" in str(
        err.value
    )
    with Silent() as silent, pytest.raises(UploadError, match=r"did not answer within 0\.3 s .*raise --timeout"):
        create_source_set("gemma-3-270m", "6-mine", host=silent.url, allow_http=True, timeout_s=0.3)


def test_redaction_leaves_short_pieces_alone():
    from sae_selfexplain_plugin.adapters.neuronpedia import redact_api_key

    assert redact_api_key("marked as uploaded", "k") == "marked as uploaded"  # a 1-character "key" hides nothing
    assert redact_api_key("a b'SECRET-1\\r\\nSECRET-2' c SECRET-2", "SECRET-1\r\nSECRET-2") == "a b'***' c ***"


@pytest.mark.parametrize(("kw", "said"), [({"timeout_s": 0.0}, "timeout 0.0 s"), ({"timeout_s": float("nan")}, "nan"),
                                          ({"max_retries": -1}, "max_retries -1")])  # fmt: skip
def test_library_limits_are_checked(server, ledger, kw, said):
    with pytest.raises(UploadError, match=said):
        go([record(1)], server, ledger, **kw)
    assert server.requests == 0 and ledger.uploaded(server.url, "gemma-3-270m", "6-test") == set()
