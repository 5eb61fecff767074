"""NDIF, offline, running NDIF's own server code (PyPI `ndif` 0.1.2, the release serving nnsight 0.8) where it
runs here, on a loopback HTTP server.

Real (imported from the installed `ndif` package and run as is):
- the request schema and its deserialization: `ndif.common.schema.request.BackendRequestModel`
  (`model_validate_json` of the envelope, `deserialize` of the blob, `response()` for every status);
- the auth policy: `ndif.services.api.auth.validate_request` / `verify_api_key` (401 no key, 400 malformed
  key, 403 unknown key, 503 auth store down), with NDIF's Postgres provider answered from a dict of keys;
- the execution of a traced block: `ndif.services.ray.deployments.modeling.nns.prepare_traced_block` and
  `execute_traced_block` (NDIF's trace scope and autocast region), and the result pickling of
  `...modeling.util.cpu_pickle_module`, compressed with zstd level 3 as `base.py` does.

Mirrored from NDIF's source (FastAPI, Redis, Ray and the object store do not run here):
- the routes of `services/api/app.py`: `POST /request` (multipart `data` + `blob`; 503 while Ray is
  disconnected; errors as `{"detail": ...}`), `GET /response/{id}` (404 until the first status is stored:
  RECEIVED is only returned over HTTP, as in app.py), results behind a presigned-style URL
  (`base.py: upload_bytes`);
- the queue (`services/api/queue/`): RECEIVED -> QUEUED -> (PROVISIONING -> DEPLOYING, for a model's first
  request, with processor.py's texts) -> DISPATCHED -> RUNNING -> COMPLETED | ERROR, one worker; a model key
  the server does not serve fails as the processor's start does ("Error starting model..."); an execution
  time limit with base.py's message;
- NDIF loads models in bf16 (`dtype="bfloat16"` in base.py): `served_dtype=torch.bfloat16` serves a bf16 copy.

NDIF 0.1.2 has no module whitelist: it runs user code in a sandbox process (services/ray/sandbox/). The
sandbox is not mirrored; requests run in this process, as NDIF runs `trusted` requests.
"""

from __future__ import annotations

import asyncio
import copy
import io
import json
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from email.parser import BytesParser
from email.policy import default as email_policy
from http.server import BaseHTTPRequestHandler
from typing import Any

import torch
import zstandard
from fastapi import HTTPException
from loopback import LoopbackServer, send_json
from ndif.common.providers.postgres import PostgresProvider
from ndif.common.schema.request import BackendRequestModel
from ndif.common.schema.response import Status
from ndif.services.api.auth import validate_request
from ndif.services.ray.deployments.modeling.nns import execute_traced_block, prepare_traced_block
from ndif.services.ray.deployments.modeling.util import cpu_pickle_module
from nnsight.schema.request import RequestModel

RAY_DOWN = "Service temporarily unavailable: compute backend is reconnecting. Please try again in a few minutes."


def execute(model: Any, payload: bytes, compress: bool, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Run a serialized block against `model` as an NDIF model actor does (base.py: execute)."""
    tracer, _ = prepare_traced_block(model, payload, compress, deserialize=BackendRequestModel.deserialize)
    return execute_traced_block(tracer, dtype)


def result_blob(saved: dict[str, Any], compress: bool) -> bytes:
    buffer = io.BytesIO()
    torch.save(saved, buffer, pickle_module=cpu_pickle_module())
    data = buffer.getvalue()
    return zstandard.ZstdCompressor(level=3).compress(data) if compress else data


class NDIFBackend:
    """An nnsight Backend that runs a block through NDIF's deserialization and execution, in process."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def __call__(self, tracer: Any) -> None:
        from nnsight.tracing.tracer import push

        payload = RequestModel.serialize(tracer, compress=True)
        push(tracer.info.frame, execute(self.model, payload, compress=True))


@contextmanager
def keys_database(keys: set[str] | None, down: Any) -> Iterator[None]:
    """NDIF's Postgres provider answering from `keys` (None: auth off, as without NDIF_POSTGRES_URL);
    `down()` true makes every query fail, as an unreachable database does."""

    async def fetch(query: str, key_id: Any) -> list[dict[str, Any]]:
        if down():
            raise ConnectionError("postgres unreachable")
        if keys is not None and str(key_id) in keys:
            return [{"user_id": "u1", "email": "user@example.org", "user_tag": None}]
        return []

    saved = PostgresProvider.__dict__["enabled"], PostgresProvider.__dict__["fetch"]
    PostgresProvider.enabled = classmethod(lambda cls: keys is not None)  # type: ignore[method-assign,assignment]
    PostgresProvider.fetch = staticmethod(fetch)  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        PostgresProvider.enabled, PostgresProvider.fetch = saved  # type: ignore[method-assign]


class NDIFServer:
    """Loopback NDIF serving `models` ({model key: nnsight model}) to holders of `keys` (UUID strings).

    Knobs: `ray_connected` (False: 503 on POST), `auth_down` (503 from the auth policy), `queue_delay_s`
    (how long a job waits before its first stored status: early polls get 404), `hold` (a job stays RUNNING
    until `release()`), `fail_polls` / `fail_downloads` (the next N answers are 503), `execution_timeout_s`,
    `served_dtype` (torch.bfloat16 serves bf16 copies, as NDIF does)."""

    def __init__(
        self,
        models: dict[str, Any],
        keys: set[str] | None,
        *,
        served_dtype: torch.dtype = torch.float32,
        execution_timeout_s: float = 120.0,
        queue_delay_s: float = 0.05,
    ) -> None:
        self.models = {k: _served(m, served_dtype) for k, m in models.items()}
        self.keys, self.served_dtype = keys, served_dtype
        self.execution_timeout_s, self.queue_delay_s = execution_timeout_s, queue_delay_s
        self.ray_connected, self.auth_down = True, False
        self.fail_polls = self.fail_downloads = 0
        self.hold = False
        self._released = threading.Event()
        self.responses: dict[str, bytes] = {}  # GET /response/{id}: the latest stored status (JSON)
        self.objects: dict[str, bytes] = {}  # the object store: result blobs
        self.posts: list[dict[str, Any]] = []  # every POST's headers
        self.status_log: dict[str, list[str]] = {}
        self.early_404s = 0
        self._deployed: set[str] = set()  # model keys with a running replica
        self._jobs: queue.Queue[BackendRequestModel | None] = queue.Queue()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                server.posts.append({k.lower(): v for k, v in self.headers.items()})
                if self.path != "/request":
                    return send_json(self, 404, {"detail": "Not Found"})
                if not server.ray_connected:  # app.py: require_ray_connection
                    return send_json(self, 503, {"detail": RAY_DOWN})
                body = self.rfile.read(int(self.headers["Content-Length"]))
                data, blob = _multipart(self.headers["Content-Type"], body)
                try:
                    request = server.authenticate(data, self.headers.get("ndif-api-key"))
                except HTTPException as e:
                    return send_json(self, e.status_code, {"detail": e.detail})
                request.payload = blob
                response = request.response(Status.RECEIVED, "Your job has been received and is waiting to be queued.")
                server._jobs.put(request)
                send_json(self, 200, json.loads(response.model_dump_json()))

            def do_GET(self) -> None:
                kind, _, rest = self.path.strip("/").partition("/")
                if kind == "response":
                    if server.fail_polls > 0:
                        server.fail_polls -= 1
                        return send_json(self, 503, {"detail": "Could not retrieve response."})
                    if rest not in server.responses:
                        server.early_404s += 1
                        return send_json(self, 404, {"detail": f"No response for request {rest}."})
                    return self._raw(200, server.responses[rest], "application/json")
                if kind == "objects":
                    if server.fail_downloads > 0:
                        server.fail_downloads -= 1
                        return send_json(self, 503, {"detail": "SlowDown"})
                    key = rest.split("?")[0]
                    if key in server.objects:
                        return self._raw(200, server.objects[key], "application/octet-stream")
                return send_json(self, 404, {"detail": "Not Found"})

            def _raw(self, status: int, data: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = LoopbackServer(Handler)
        self.url = self.server.url
        self._worker = threading.Thread(target=self._work, daemon=True)

    def authenticate(self, data: str, api_key: str | None) -> BackendRequestModel:
        """NDIF's own envelope parsing and key check (auth.py: validate_request)."""
        with keys_database(self.keys, lambda: self.auth_down):
            request: BackendRequestModel = asyncio.run(validate_request(data=data, api_key=api_key))
        return request

    def release(self) -> None:
        self._released.set()

    def _store(self, request: BackendRequestModel, status: Status, description: str = "", data: Any = None) -> None:
        """What BackendRequestModel.respond does for a non-blocking request: store the latest status."""
        self.status_log.setdefault(request.id, []).append(status.value)
        self.responses[request.id] = request.response(status, description, data).model_dump_json().encode()

    def _work(self) -> None:
        while (request := self._jobs.get()) is not None:
            time.sleep(self.queue_delay_s)
            self._store(request, Status.QUEUED, "Your job has been queued.")
            model = self.models.get(request.model_key)
            if model is None:  # processor.py: start() fails for a model the controller cannot deploy
                self._store(request, Status.ERROR, "Error starting model. Please try again later. Sorry for the "
                                                   "inconvenience.")  # fmt: skip
                continue
            if request.model_key not in self._deployed:  # processor.py: the first request starts the model
                self._store(request, Status.PROVISIONING, "Model Provisioning...")
                self._store(request, Status.DEPLOYING, "Model Deploying...")
                self._deployed.add(request.model_key)
            self._store(request, Status.DISPATCHED, "Your job has been sent to the model.")
            self._store(request, Status.RUNNING, "Your job has started running.")
            if self.hold:
                self._released.wait()
            self._run(request, model)

    def _run(self, request: BackendRequestModel, model: Any) -> None:
        outcome: dict[str, Any] = {}

        def target() -> None:
            try:
                outcome["blob"] = result_blob(execute(model, request.payload or b"", request.compress,
                                                      self.served_dtype), request.compress)  # fmt: skip
            except Exception as e:  # base.py: format_error
                outcome["error"] = f"{type(e).__name__}: {e}"

        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        thread.join(self.execution_timeout_s)
        if thread.is_alive():
            self._store(
                request, Status.ERROR, f"Your job exceeded the execution timeout of {self.execution_timeout_s}s."
            )
        elif "error" in outcome:
            self._store(request, Status.ERROR, outcome["error"])
        else:
            key = f"{request.id}.pt"
            self.objects[key] = outcome["blob"]
            signature = uuid.uuid4().hex
            url = f"{self.url}/objects/{key}?X-Amz-Expires=3600&X-Amz-Signature={signature}"
            self._store(request, Status.COMPLETED, "Your job has been completed.", url)

    def __enter__(self) -> NDIFServer:
        self.server.__enter__()
        self._worker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
        self._jobs.put(None)
        self.server.__exit__()


def _served(model: Any, dtype: torch.dtype) -> Any:
    """The server's own copy of the model, in `dtype` (NDIF loads weights in bf16)."""
    if dtype == torch.float32:
        return model
    from nnsight.modeling.transformers import TransformersModel

    return TransformersModel(copy.deepcopy(model._module).to(dtype), tokenizer=model.tokenizer)


def _multipart(content_type: str, body: bytes) -> tuple[str, bytes]:
    message = BytesParser(policy=email_policy).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    parts = {part.get_param("name", header="content-disposition"): part for part in message.iter_parts()}
    return str(parts["data"].get_content()), bytes(parts["blob"].get_payload(decode=True))
