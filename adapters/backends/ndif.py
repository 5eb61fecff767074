"""NDIF's remote protocol, the part nnsight's RemoteBackend leaves to its caller: the model key, a
non-blocking submission, polling `GET /response/{id}` with retry and a timeout, jobs a timeout left
running, sessions capped by payload size, and an API key that never appears in an error.

Remote runs submit without blocking and poll (NDIF's non-blocking protocol): a poll or download that fails
transiently is retried with backoff until `timeout_s`; a job still running at `timeout_s` raises
RemoteTimeout naming its id and stays collectable (the same call again polls that job instead of
submitting it twice). Neither the user's model nor nnsight's state is modified: the model key is built from
`repo_id` when one is given.

This module knows no trace body: `nnsight.NDIFBackend` runs the nnsight backend's traces through it."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import nnsight
import torch

from sae_selfexplain_plugin.errors import InputError, SelfExplainError

# Our cap on the tensors one remote request carries (ids, masks, injected vectors): NDIF 0.1.2 sets none
# (services/api/app.py: "the payload size is measured downstream but never enforced"), so a sweep is split
# into sessions of at most this size rather than sent as one request of unbounded size.
MAX_REQUEST_BYTES = 32 * 2**20
_PENDING: dict[str, str] = {}  # request fingerprint -> id of a remote job a timeout left running
_TRANSIENT_STATUS = {429, 500, 502, 503, 504}


class RemoteExecutionError(SelfExplainError, RuntimeError):
    """A remote (NDIF) run failed, was refused, or did not finish in time."""


class RemoteTimeout(RemoteExecutionError):
    """A remote job did not finish within timeout_s. It keeps running on the server; the same call again
    (same model, host and inputs) collects it instead of submitting it twice."""

    def __init__(self, message: str, job_id: str) -> None:
        super().__init__(message)
        self.job_id = job_id


def submits_to_server(remote: Any) -> bool:
    """True when traces go to a server (NDIF or a host URL) and results are polled for."""
    return remote is True or (isinstance(remote, str) and remote != "local")


def check_repo_id(model: Any, repo_id: str | None) -> None:
    if not (repo_id or getattr(model, "repo_id", "")):
        raise InputError(
            "remote execution names the model by its hub repo id, but this nnsight model was built from an "
            "in-memory object and has none; pass repo_id='google/gemma-3-270m' (the id NDIF serves)."
        )


def remote_model_key(model: Any, repo_id: str | None) -> str:
    """The key NDIF serves the model under: nnsight's own (`model.to_model_key()`, which asks the hub to
    canonicalise the repo id) or, with `repo_id` given, the same format built from it without the hub and
    without touching the model or nnsight's cache."""
    if repo_id is None:
        return str(model.to_model_key())
    from nnsight.util import to_import_path

    # nnsight 0.8's format (huggingface.py and transformers.py: _remoteable_model_key), pinned by a test
    data: dict[str, Any] = {"repo_id": repo_id, "revision": getattr(model, "revision", None)}
    if getattr(model, "kwargs", {}).get("trust_remote_code"):
        data["trust_remote_code"] = True
    if getattr(model, "task", None) is not None:
        from transformers.pipelines import TASK_ALIASES

        data["task"] = TASK_ALIASES.get(model.task, model.task)
    return f"{to_import_path(model._remoteable_class())}:{json.dumps(data)}"


def fingerprint(*parts: Any) -> str:
    """Identifies a remote request by what it computes, so a rerun finds a job a timeout left running."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            h.update(str((part.dtype, tuple(part.shape))).encode())
            h.update(part.detach().cpu().contiguous().numpy().tobytes())
        else:
            h.update(repr(part).encode())
    return h.hexdigest()


def trace_options(model: Any, host: Any, repo_id: str | None, key: str) -> dict[str, Any]:
    """Options for `model.trace`/`generate`/`session`: nnsight's RemoteBackend, non-blocking (submit, then
    poll: no websocket, and we own the timeout); for a job a timeout left running, a backend that polls it."""
    from nnsight.intervention.backends.remote import RemoteBackend

    backend = RemoteBackend(
        remote_model_key(model, repo_id),
        host=None if host is True else host,
        api_key=_api_key() or None,
        env=getattr(model, "_remoteable_get_env", dict)(),
        blocking=False,
        job_id=_PENDING.get(key),
    )
    return {"backend": backend}


def collect(tracer: Any, name: str, key: str, timeout_s: float, poll_s: float) -> Any:
    """The saved value `name` of the job `tracer` submitted, polled for until `timeout_s`. Transient poll and
    download failures are retried with backoff."""
    backend = tracer.backend
    deadline = time.monotonic() + timeout_s
    failures = 0
    while True:
        try:
            result = backend()
            failures = 0
        except Exception as e:
            if type(e).__name__ == "RemoteError":  # the server reported ERROR for this job
                _PENDING.pop(key, None)
                raise RemoteExecutionError(f"remote job {backend.job_id} failed: {_redact(str(e))}") from None
            if not _is_transient(e):
                raise
            failures += 1
            result = None
        if isinstance(result, dict):
            _PENDING.pop(key, None)
            return result[name]
        if time.monotonic() > deadline:
            _PENDING[key] = backend.job_id
            raise RemoteTimeout(
                f"remote job {backend.job_id} did not finish within {timeout_s:.0f}s (last status: "
                f"{getattr(backend.status, 'value', backend.status)}); it is still running on the server: "
                "run the same call again to collect it (raise timeout_s to wait longer).",
                backend.job_id,
            )
        time.sleep(min(poll_s * 2**failures, 30.0))


Batch = TypeVar("Batch", bound=tuple[Any, ...])


def sessions(batches: list[Batch]) -> list[list[Batch]]:
    """The batches of a sweep grouped into requests of at most MAX_REQUEST_BYTES of tensors."""
    return _by_size(batches, MAX_REQUEST_BYTES)


def _by_size(batches: list[Batch], cap: int) -> list[list[Batch]]:
    """Consecutive groups of batches whose tensors add up to at most `cap` bytes (a larger batch alone)."""
    groups: list[list[Batch]] = []
    size = cap + 1
    for batch in batches:
        n = sum(t.numel() * t.element_size() for t in batch if isinstance(t, torch.Tensor))
        if size + n > cap:
            groups.append([])
            size = 0
        groups[-1].append(batch)
        size += n
    return groups


def _is_transient(error: Exception) -> bool:
    """A poll or download failure worth retrying: the connection, or a 429/5xx answer."""
    import httpx

    if isinstance(error, httpx.HTTPStatusError):
        return error.response.status_code in _TRANSIENT_STATUS
    return isinstance(error, httpx.TransportError)


def _api_key() -> str:
    return str(nnsight.CONFIG.API.APIKEY or os.environ.get("NDIF_API_KEY") or "")


def _redact(text: str) -> str:
    """Remove the NDIF API key from a message, wherever a server might echo it."""
    key = _api_key()
    return text.replace(key, "***") if key else text


@contextmanager
def submitting() -> Iterator[None]:
    """Turn nnsight's failures to submit a request (bad key, unreachable host) into clear errors."""
    try:
        yield
    except Exception as e:
        if type(e).__name__ != "RemoteError":
            raise
        message = _redact(str(e))
        hint = (
            " Check the API key (NDIF_API_KEY or nnsight.CONFIG.API.APIKEY)."
            if "401" in message or "key" in message.lower()
            else ""
        )
        raise RemoteExecutionError(f"the remote server refused the request: {message}.{hint}") from None
