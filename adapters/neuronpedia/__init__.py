"""Upload explanations to Neuronpedia through `POST /api/feature/upload-batch`.

Neuronpedia's `/api/explanation/new` is switched off; upload-batch is the live path. It needs a source
set the caller created (`/api/model/new`, `/api/source-set/new`), at most 128 features a request, and at
least one activation record per feature: we send the feature's top-activating contexts and density from
its activation examples (`sae-selfexplain contexts`, or `explain --contexts`), else its activations over
its own explanation text (computed by `explain`). Re-runs are idempotent: a ledger in the results store
remembers what was sent. The API key is read from NEURONPEDIA_API_KEY and never printed, logged or written.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from sae_selfexplain_plugin.activation_examples import ActivationExamples, FeatureExamples
from sae_selfexplain_plugin.files import to_json
from sae_selfexplain_plugin.formats import cut_utf16, validate
from sae_selfexplain_plugin.identity import check_one_sae
from sae_selfexplain_plugin.results import FeatureExplanations
from sae_selfexplain_plugin.store import ResultsStore

from .api_key import API_KEY_ENV, UploadError, api_key_from_env, check_api_key, redact_api_key

DEFAULT_HOST = "https://www.neuronpedia.org"
MAX_BATCH = 128
# Answers a retry can fix. Not 500: Neuronpedia answers a bare 500 to requests that can never succeed (a
# source set that is not yours, an unknown method name: route.tsx throws, api-error.ts hides why).
_RETRY_STATUS = {429, 502, 503, 504}
DEFAULT_TIMEOUT_S = 60.0  # per request: connecting, and each wait for the answer's bytes
MAX_TIMEOUT_S = 600.0
# A server that lets --timeout pass this many times is given up on (more tries only multiply the wait), and
# a Retry-After above MAX_WAIT_S is reported rather than slept: a batch's total time stays bounded.
_SILENT_TRIES = 2
MAX_WAIT_S = 120.0
_MAX_ANSWER = 1 << 20
_CAUSES_OF_500 = (
    "Neuronpedia answered 500 (it does not say why). Its upload route fails this way when the source set does not "
    "exist or was not created by you (create one: POST /api/source-set/new, then pass --source), when --method-name "
    "is not an explanation type it knows, or on a fault of its own."
)
MODEL_NAME_REFUSED = (
    "--model-name cannot work: Neuronpedia's upload-batch route writes it to a column its Explanation table does not "
    "have (explanationModelName), so every such upload fails with a 500; drop --model-name."
)
_LOOPBACK = {"localhost", "127.0.0.1", "::1"}


def check_host(host: str, allow_http: bool = False) -> str:
    """The host as a base URL we may send the API key to: https only (plain http only for a loopback
    address, and only when allowed: a test server); no path, query, fragment or credentials."""
    parts = urllib.parse.urlsplit(host)
    loopback = parts.hostname in _LOOPBACK
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise UploadError(f"--host {host!r} is not an https:// URL (e.g. {DEFAULT_HOST}).")
    if parts.scheme == "http" and not (allow_http and loopback):
        hint = " (pass --allow-http for this loopback test server)" if loopback else ""
        raise UploadError(f"--host {host!r} is plain http: the API key would travel unencrypted; use https{hint}.")
    if parts.username or parts.password or parts.query or parts.fragment or parts.path.strip("/"):
        raise UploadError(f"--host {host!r} must be a bare origin such as {DEFAULT_HOST} (no path, query or '#').")
    return f"{parts.scheme}://{parts.netloc}"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Never follow a redirect: the request carries the API key, which must go to --host only."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def _accepted(status: int, body: bytes) -> bool:
    """Neuronpedia's upload-batch answers 200 with {"message": "N features created."} (route.tsx)."""
    if status != 200:
        return False
    try:
        doc = json.loads(body)
    except ValueError:
        return False
    return isinstance(doc, dict) and isinstance(doc.get("message"), str) and "created" in doc["message"]


@dataclass
class UploadSummary:
    sent: int = 0
    already: int = 0
    skipped: list[int] = field(default_factory=list)  # no explanation or no activation record
    batches: int = 0


def _text_sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def feature_payload(
    record: FeatureExplanations, method_name: str | None, examples: FeatureExamples | None = None
) -> dict[str, Any] | None:
    """One upload-batch feature, or None when there is no explanation or no activation to show.

    With `examples` (the feature's activation examples over a corpus), its top-activating contexts are the
    activations and its firing frequency the density; otherwise the record's own activations (over its
    explanation text). The text is cut at Neuronpedia's 512 UTF-16 code units; positions whose token decodes
    to "" (which Neuronpedia refuses) are dropped with their values."""
    chosen = record.chosen
    if chosen is None or not chosen.text.strip():
        return None
    explanation: dict[str, Any] = {"text": cut_utf16(chosen.text.strip())}
    if method_name:
        explanation["methodName"] = method_name
    sources: list[dict[str, Any]] = (
        [{"tokens": c.tokens, "values": c.values} for c in examples.top if c.max_value > 0]
        if examples is not None
        else list(record.activations)
    )
    activations = []
    for a in sources:
        kept = [(t, v) for t, v in zip(a["tokens"], a["values"]) if t != ""][:1024]
        if kept:
            activations.append({"tokens": [t for t, _ in kept], "values": [v for _, v in kept]})
    if not activations:
        return None
    payload: dict[str, Any] = {"index": record.feature_id, "explanations": [explanation], "activations": activations}
    if examples is not None:
        payload["density"] = min(1.0, max(0.0, examples.frequency))
    return payload


class _Redactor:
    def __init__(self, secret: str) -> None:
        self.secret = secret

    def __call__(self, text: str) -> str:
        return redact_api_key(text, self.secret)


def upload(
    records: Iterable[FeatureExplanations],
    *,
    model_id: str,
    source: str,
    ledger: ResultsStore,
    api_key: str | None = None,
    host: str = DEFAULT_HOST,
    allow_http: bool = False,
    method_name: str | None = None,
    examples: ActivationExamples | None = None,
    dry_run: bool = False,
    max_retries: int = 5,
    backoff_s: float = 1.0,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    log: Callable[[str], None] = print,
    sleep: Callable[[float], None] = time.sleep,
) -> UploadSummary:
    """Upload every record not yet in the ledger, in batches of at most 128 features. A batch counts as
    uploaded (and enters the ledger) only when the server answers with the JSON Neuronpedia sends on
    success. `host` must be https (see check_host); redirects are never followed. Records of more than one
    SAE or run are refused before anything is sent: they would all land in one source."""
    host = check_host(host, allow_http)
    if not 0 < timeout_s <= MAX_TIMEOUT_S:  # also refuses NaN
        raise UploadError(f"timeout {timeout_s!r} s: pass seconds above 0 and at most {MAX_TIMEOUT_S:g}.")
    if max_retries < 0:  # no try at all would mark every batch as uploaded
        raise UploadError(f"max_retries {max_retries}: pass 0 or more.")
    records = list(records)
    check_one_sae(((r.sae, r.model_id, r.settings_hash) for r in records), "the results to upload")
    model_id, source = model_id.lower(), source.lower()  # Neuronpedia lowercases both
    done = ledger.uploaded(host, model_id, source)
    summary = UploadSummary()
    pending: list[tuple[dict[str, Any], str]] = []
    for record in records:
        payload = feature_payload(record, method_name, None if examples is None else examples[record.feature_id])
        if payload is None:
            summary.skipped.append(record.feature_id)
            continue
        sha = _text_sha(payload["explanations"][0]["text"])
        if (record.feature_id, sha) in done:
            summary.already += 1
            continue
        pending.append((payload, sha))
    key = "" if dry_run or not pending else check_api_key(api_key or api_key_from_env())
    redact = _Redactor(key)
    for start in range(0, len(pending), MAX_BATCH):
        batch = pending[start : start + MAX_BATCH]
        body = {"modelId": model_id, "source": source, "features": [p for p, _ in batch]}
        problems = validate(body, "neuronpedia-upload-batch")
        if problems:
            raise UploadError(f"refusing to send an invalid batch: {problems[0]}")
        if dry_run:
            first, last, size = batch[0][0]["index"], batch[-1][0]["index"], len(to_json(body).encode())
            log(f"dry run: batch {summary.batches + 1}: would POST {len(batch)} features (indices {first}..{last}, "
                f"{size:,} bytes) to {host}/api/feature/upload-batch")  # fmt: skip
        else:
            _post(host, body, key, max_retries, backoff_s, timeout_s, redact, log, sleep)
            ledger.mark_uploaded(host, model_id, source, [(p["index"], sha) for p, sha in batch])
        summary.sent += len(batch)
        summary.batches += 1
    return summary


def _post(
    host: str,
    body: dict[str, Any],
    key: str,
    max_retries: int,
    backoff_s: float,
    timeout_s: float,
    redact: _Redactor,
    log: Callable[[str], None],
    sleep: Callable[[float], None],
) -> None:
    first = body["features"][0]["index"]
    request = _json_request(host, "/api/feature/upload-batch", body, key)  # serialized once, sent per try
    silent = 0
    for attempt in range(max_retries + 1):
        try:
            with _OPENER.open(request, timeout=timeout_s) as response:
                answer = _read_within(response, time.monotonic() + 2 * timeout_s)
                if _accepted(response.status, answer):
                    return
                raise UploadError(
                    f"unexpected answer to the batch starting at feature {first} (HTTP {response.status}: "
                    f"{redact(answer.decode('utf-8', 'replace'))[:200]!r}); is --host a Neuronpedia server? "
                    "Nothing of this batch was marked as uploaded."
                )
        except urllib.error.HTTPError as e:
            message = redact(e.read(_MAX_ANSWER).decode("utf-8", "replace"))[:300]
            if e.code == 500:
                raise UploadError(f"the batch starting at feature {first} failed: {_CAUSES_OF_500}") from None
            if 300 <= e.code < 400:
                raise UploadError(
                    f"{host} redirected the upload to {e.headers.get('Location')!r}; the API key is sent to --host "
                    "only, so pass the final address as --host."
                ) from None
            if e.code in (401, 403):
                raise UploadError(
                    f"Neuronpedia refused the API key ({e.code}); check {API_KEY_ENV} and that you own the source set."
                ) from None
            if e.code not in _RETRY_STATUS or attempt == max_retries:
                raise UploadError(
                    f"upload of the batch starting at feature {first} failed: HTTP {e.code} {message}"
                ) from None
            wait = _retry_after(e.headers.get("Retry-After"), backoff_s * 2**attempt)
            if wait > MAX_WAIT_S:
                raise UploadError(
                    f"{host} asks to wait {wait:.0f} s (HTTP {e.code}, Retry-After) before the batch starting at "
                    f"feature {first}; rerun later: the ledger skips the batches already sent."
                ) from None
        except (OSError, http.client.HTTPException) as e:
            # refused, reset or closed before an answer, a timeout, a malformed answer: a retry may succeed (as
            # after a 502-504, the server may have stored the batch already; the ledger cannot know)
            reason = e.reason if isinstance(e, urllib.error.URLError) else e
            if isinstance(reason, ssl.SSLCertVerificationError):
                raise UploadError(
                    f"{host}'s TLS certificate is not valid ({redact(str(reason))}); check --host."
                ) from None
            silent += isinstance(reason, TimeoutError)
            if attempt == max_retries or silent == _SILENT_TRIES:
                what, fix = _unreachable(reason, timeout_s, redact)
                tries = f"{attempt + 1} {'try' if attempt == 0 else 'tries'}"
                raise UploadError(
                    f"{host} {what} ({tries}): nothing of the batch starting at feature {first} was marked as "
                    f"uploaded. Fix: {fix}; a rerun skips the batches already sent."
                ) from None
            wait = backoff_s * 2**attempt
        log(f"batch starting at feature {first}: retrying in {wait:.1f}s (try {attempt + 2} of {max_retries + 1})")
        sleep(wait)


def _read_within(response: Any, deadline: float) -> bytes:
    """The answer's body, at most _MAX_ANSWER bytes, by `deadline` (time.monotonic()): `timeout=` bounds each
    wait for bytes, and a server sending one byte a second would otherwise hold a try open forever."""
    chunks: list[bytes] = []
    size = 0
    while size < _MAX_ANSWER:
        if time.monotonic() > deadline:
            raise TimeoutError("the answer did not arrive in time")
        chunk = response.read1(min(1 << 16, _MAX_ANSWER - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _unreachable(reason: object, timeout_s: float, redact: _Redactor) -> tuple[str, str]:
    """What the network did to a request that got no answer, and the fix."""
    if isinstance(reason, TimeoutError):
        return f"did not answer within {timeout_s:g} s (--timeout)", "check that it is up, or raise --timeout"
    if isinstance(reason, http.client.RemoteDisconnected):
        return "closed the connection without answering", "check that it is up, then rerun"
    if isinstance(reason, ConnectionResetError):
        return "reset the connection", "check that it is up, then rerun"
    if isinstance(reason, http.client.HTTPException):
        return f"sent a malformed answer ({type(reason).__name__})", "check that --host is a Neuronpedia server"
    return f"cannot be reached ({redact(str(reason))[:200]})", "check --host and your network, then rerun"


def _json_request(host: str, path: str, body: dict[str, Any], key: str) -> urllib.request.Request:
    """A POST of strict JSON (a NaN is an error here, not a body the server cannot parse) with the API key."""
    return urllib.request.Request(
        host + path, data=to_json(body).encode(), method="POST",
        headers={"Content-Type": "application/json", "x-api-key": key},
    )  # fmt: skip


def _retry_after(header: str | None, default: float) -> float:
    try:
        wait = float(header) if header is not None else default
    except ValueError:
        return default
    return max(0.0, wait) if wait == wait else default  # NaN: the default; inf: above MAX_WAIT_S, reported


SET_NAME = re.compile(r"^[a-z][a-z0-9-]*[a-z0-9]$|^[a-z0-9]$")  # source-set/new/route.tsx's rule


def create_source_set(
    model_id: str,
    source: str,
    *,
    api_key: str | None = None,
    host: str = DEFAULT_HOST,
    allow_http: bool = False,
    description: str = "self-explanations (sae-selfexplain)",
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> bool:
    """Create the source set that `source` ("15-my-set") belongs to, through `POST /api/source-set/new`;
    Neuronpedia then has one source per layer, `{layer}-{set}`. True if created, False if it existed."""
    host = check_host(host, allow_http)
    layer, _, name = source.partition("-")
    if not layer.isdigit() or not SET_NAME.match(name) or "--" in name or name == "neurons":
        raise UploadError(
            f"--source {source!r} is not LAYER-SETNAME with a set name Neuronpedia accepts (lower-case letters, "
            "digits and single hyphens, e.g. 15-selfexplain-res-4k)."
        )
    key = check_api_key(api_key or api_key_from_env())
    redact = _Redactor(key)
    body = {"modelId": model_id.lower(), "name": name, "description": description[:128]}
    request = _json_request(host, "/api/source-set/new", body, key)
    try:
        with _OPENER.open(request, timeout=timeout_s) as response:
            response.read(_MAX_ANSWER)
            return True
    except urllib.error.HTTPError as e:
        message = redact(e.read(_MAX_ANSWER).decode("utf-8", "replace"))[:300]
        if e.code == 400 and "already exists" in message:
            return False
        if e.code == 400 and "Model not found" in message:
            raise UploadError(
                f"Neuronpedia has no model {model_id.lower()!r}: create it first (POST /api/model/new with its id and "
                "number of layers), or pass the --model-id of one that exists."
            ) from None
        if e.code in (401, 403):
            raise UploadError(f"Neuronpedia refused the API key ({e.code}); check {API_KEY_ENV}.") from None
        raise UploadError(f"creating the source set {name!r} failed: HTTP {e.code} {message}") from None
    except (OSError, http.client.HTTPException) as e:  # one try: a rerun finds a set that was created
        reason = e.reason if isinstance(e, urllib.error.URLError) else e
        what, fix = _unreachable(reason, timeout_s, redact)
        raise UploadError(f"creating the source set {name!r} failed: {host} {what}. Fix: {fix}.") from None
