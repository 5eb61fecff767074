"""NDIF, offline: a whitelist-enforcing unpickler, an in-process strict backend, and a loopback HTTP server
speaking NDIF's non-blocking protocol (POST /request, GET /response/{id}, GET /result/{id}).

The whitelist follows NDIF's server (protected_environment.py): execution may use builtins, torch, collections,
time, numpy, sympy, math, einops, typing, operator, enum; deserialization also pickle, cloudpickle, copyreg and
nnsight. Anything else in a request (json, sae_lens, this package's adapters) is rejected, as NDIF would.
"""

from __future__ import annotations

import io
import json
import uuid
from email.parser import BytesParser
from email.policy import default as email_policy
from http.server import BaseHTTPRequestHandler
from typing import Any

import torch
from loopback import LoopbackServer, send_json
from nnsight.intervention.serialization import CustomCloudUnpickler
from nnsight.schema.request import RequestModel
from nnsight.tracing.tracer import _saves, dec, inc

ALLOWED_ROOTS = {
    "builtins", "torch", "collections", "time", "numpy", "sympy", "math", "einops", "typing", "operator",
    "_operator", "enum", "pickle", "_pickle", "cloudpickle", "copyreg", "nnsight", "_codecs",
}  # fmt: skip


class NotWhitelisted(Exception):
    pass


def _check(module: str) -> None:
    if module.split(".")[0] not in ALLOWED_ROOTS:
        raise NotWhitelisted(f"Module {module} is not whitelisted")


class GuardedUnpickler(CustomCloudUnpickler):
    """Refuses any class or module import outside the whitelist, including cloudpickle's `subimport`."""

    def find_class(self, module: str, name: str) -> Any:
        _check(module)
        found = super().find_class(module, name)
        if name in ("subimport", "dynamic_subimport") and module.startswith("cloudpickle"):

            def guarded(modname: str, *args: Any) -> Any:
                _check(modname)
                return found(modname, *args)

            return guarded
        return found


def run_request(model: Any, blob: bytes, compress: bool) -> dict[str, Any]:
    """Deserialize under the whitelist and execute against `model`, as an NDIF worker does; the saved values."""
    tracer = RequestModel.deserialize(blob, model._remoteable_persistent_objects(), compress, GuardedUnpickler)
    inc()
    try:
        tracer.execute(tracer.info.code)
        saves = _saves()
        return {k: v for k, v in tracer.info.frame.f_locals.items() if id(v) in saves}
    finally:
        dec()


class StrictBackend:
    """An nnsight Backend: serialize like RemoteBackend, deserialize under the whitelist, run, push results."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def __call__(self, tracer: Any) -> None:
        from nnsight.tracing.tracer import push

        blob = RequestModel.serialize(tracer, compress=True)
        push(tracer.info.frame, run_request(self.model, blob, compress=True))


class FakeNDIF:
    """Loopback NDIF. Modes: 'ok', 'error' (job fails), 'hang' (never completes), 'unauthorized' (401)."""

    def __init__(self, model: Any, api_key: str = "ndif-test-key") -> None:
        self.model, self.api_key, self.mode = model, api_key, "ok"
        self.jobs: dict[str, dict[str, Any]] = {}
        self.results: dict[str, bytes] = {}
        self.seen_keys: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                server.seen_keys.append(self.headers.get("ndif-api-key", ""))
                if self.path != "/request":
                    return self._json(404, {"detail": "not found"})
                if server.mode == "unauthorized" or self.headers.get("ndif-api-key") != server.api_key:
                    return self._json(401, {"detail": "401: invalid api key"})
                body = self.rfile.read(int(self.headers["Content-Length"]))
                envelope, blob = server.parse_multipart(self.headers["Content-Type"], body)
                job = uuid.uuid4().hex
                server.jobs[job] = {"id": job, "status": "RECEIVED", "description": ""}
                server.execute(job, envelope, blob)
                self._json(200, {"id": job, "status": "RECEIVED", "description": "received"})

            def do_GET(self) -> None:
                kind, _, job = self.path.strip("/").partition("/")
                if kind == "response" and job in server.jobs:
                    return self._json(200, server.jobs[job])
                if kind == "result" and job in server.results:
                    raw = server.results[job]
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(raw)))
                    self.end_headers()
                    self.wfile.write(raw)
                    return None
                return self._json(404, {"detail": "no such job"})

            def _json(self, status: int, payload: dict[str, Any]) -> None:
                send_json(self, status, payload)

        self.server = LoopbackServer(Handler)
        self.url = self.server.url

    @staticmethod
    def parse_multipart(content_type: str, body: bytes) -> tuple[dict[str, Any], bytes]:
        message = BytesParser(policy=email_policy).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
        parts = {part.get_param("name", header="content-disposition"): part for part in message.iter_parts()}
        return json.loads(parts["data"].get_content()), parts["blob"].get_payload(decode=True)

    def execute(self, job: str, envelope: dict[str, Any], blob: bytes) -> None:
        if self.mode == "hang":
            self.jobs[job].update(status="RUNNING")
            return
        if self.mode == "error":
            self.jobs[job].update(status="ERROR", description="CUDA out of memory (injected)")
            return
        try:
            saves = run_request(self.model, blob, envelope.get("compress", False))
        except Exception as e:
            self.jobs[job].update(status="ERROR", description=f"{type(e).__name__}: {e}")
            return
        buffer = io.BytesIO()
        torch.save(saves, buffer)
        raw = buffer.getvalue()
        if envelope.get("compress"):
            import zstandard

            raw = zstandard.ZstdCompressor().compress(raw)
        self.results[job] = raw
        self.jobs[job].update(status="COMPLETED", data=f"{self.url}/result/{job}")

    def __enter__(self) -> FakeNDIF:
        self.server.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.__exit__()
