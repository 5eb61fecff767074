"""A loopback HTTP server implementing Neuronpedia's upload-batch contract, with failures on demand."""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler
from typing import Any

from loopback import LoopbackServer, send_json


class FakeNeuronpedia:
    def __init__(self, api_key: str = "secret-key-123") -> None:
        self.api_key = api_key
        self.received: list[dict[str, Any]] = []  # accepted bodies
        self.fail_next: list[int] = []  # statuses to answer before accepting again
        self.requests = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def do_POST(self) -> None:
                server.requests += 1
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path != "/api/feature/upload-batch":
                    return self._answer(404, {"message": "not found"})
                if self.headers.get("x-api-key") != server.api_key:
                    return self._answer(401, {"message": "invalid api key"})
                if server.fail_next:
                    status = server.fail_next.pop(0)
                    return self._answer(status, {"message": f"injected {status}"}, {"Retry-After": "0"})
                try:
                    data = json.loads(body)
                    problem = server.check(data)
                except ValueError as e:
                    problem = str(e)
                if problem:
                    return self._answer(400, {"message": problem})
                server.received.append(data)
                self._answer(200, {"message": f"{len(data['features'])} features created."})

            def _answer(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
                send_json(self, status, payload, headers)

        self.server = LoopbackServer(Handler)
        self.url = self.server.url

    @staticmethod
    def check(data: dict[str, Any]) -> str | None:
        """The endpoint's validation (yup schema in upload-batch/route.tsx)."""
        features = data.get("features")
        if not isinstance(data.get("modelId"), str) or not isinstance(data.get("source"), str):
            return "modelId and source are required"
        if not isinstance(features, list) or not 1 <= len(features) <= 128:
            return "features must hold 1 to 128 items"
        indices = [f.get("index") for f in features]
        if len(set(indices)) != len(indices):
            return "indices must be unique"
        for f in features:
            if not isinstance(f.get("index"), int) or not 0 <= f["index"] <= 10_000_000:
                return "index must be an integer in 0..10000000"
            acts = f.get("activations")
            if not acts:
                return "activations are required"
            for a in acts:
                if len(a["tokens"]) != len(a["values"]) or not 1 <= len(a["tokens"]) <= 1024:
                    return "tokens and values must have equal lengths of 1..1024"
            for e in f.get("explanations") or []:
                if not 1 <= len(e.get("text", "")) <= 512:
                    return "explanation text must have 1..512 characters"
        return None

    def __enter__(self) -> FakeNeuronpedia:
        self.server.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.__exit__()
