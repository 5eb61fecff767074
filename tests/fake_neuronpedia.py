"""Neuronpedia's `POST /api/feature/upload-batch`, offline, mirrored from its source (hijohnnylin/neuronpedia):
`apps/webapp/app/api/feature/upload-batch/route.tsx` (validation, checks, storage), `lib/with-user.ts` (the
API key), `lib/api-error.ts` (how errors become status codes), `prisma/schema.prisma` (what is stored).

Mirrored, in route.tsx's order:
- no or unknown `x-api-key`: 401 `{"error": "This endpoint requires authorization. ..."}`;
- a body that is not JSON (e.g. a bare NaN): `request.json()` throws, an unclassified error: opaque 500;
- the yup schema: 400 `{"error", "path"}` on the first problem. yup's rules as written there: strings
  `required()` (so not ""), `lowercase()` transforms modelId, source, methodName, modelName; `text` 1..512
  in JavaScript string length (UTF-16 code units); tokens 1..1024 non-empty strings, values 1..1024
  numbers; index an integer 0..10,000,000; density 0..1; at most 20 top/bottom logits; 1..128 features;
- every later check is a plain `throw new Error(...)`, which api-error.ts turns into the opaque
  `500 {"error": "Something went wrong on our end. ...", "message": ...}`: a source set that does not
  exist, one the caller did not create, a source not in it, tokens/values of different lengths, duplicate
  indices, an unknown methodName (ExplanationType), an unknown modelName (ExplanationModelType), and any
  modelName at all, since Explanation has no `modelName` column (Prisma rejects the unknown field);
- storage: Neuron rows by (modelId, layer, index), duplicates skipped; Explanation and Activation rows
  appended (their only unique key is a random id), so a re-send stores duplicates;
- 200 `{"message": "N features created."}`.
Also `POST /api/source-set/new` (source-set/new/route.tsx, lib/db/source.ts): the set-name rule, 400 for a
model that does not exist or a set name taken, else a set owned by the caller with one source per layer.
Not from its source: `rate_limit` (429 with Retry-After after N requests), a stand-in for a proxy's limit.
"""

from __future__ import annotations

import json
import math
import re
from http.server import BaseHTTPRequestHandler
from typing import Any

from loopback import LoopbackServer, send_json

AUTH_ERROR = (
    "This endpoint requires authorization. Specify your API key in the header x-api-key. Your API key is under "
    "Settings on neuronpedia.org."
)
SERVER_FAULT = "Something went wrong on our end. The error has been reported."


class ServerFault(Exception):
    """A plain `throw new Error(...)` in route.tsx: the client sees only the opaque 500."""


class Invalid(Exception):
    """A yup ValidationError: 400 with its message and path."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path


def _js_length(text: str) -> int:
    """JavaScript's string length: UTF-16 code units."""
    return len(text.encode("utf-16-le")) // 2


class FakeNeuronpedia:
    """One user (`api_key`) who created the source set `set_name` of `model_id` with `sources`."""

    def __init__(
        self,
        api_key: str = "secret-key-123",
        model_id: str = "gemma-3-270m",
        sources: tuple[str, ...] = ("6-test",),
        explanation_types: tuple[str, ...] = ("oai_token-act-pair", "sae-selfexplain"),
        explanation_model_types: tuple[str, ...] = ("gpt-4o-mini",),
        layers: int = 30,
    ) -> None:
        self.users = {api_key: "user-1", "other-users-key": "user-2"}
        self.api_key = api_key
        # (modelId, source set name) -> (creator, sources): one set of ours, one owned by Neuronpedia
        self.source_sets: dict[tuple[str, str], tuple[str, set[str]]] = {
            (model_id, set_name(s)): ("user-1", {x for x in sources if set_name(x) == set_name(s)}) for s in sources
        }
        self.source_sets[(model_id, "gemmascope-res-16k")] = ("neuronpedia", {"12-gemmascope-res-16k"})
        self.model_layers = {model_id: layers}  # models that exist, and their number of layers
        self.explanation_types = set(explanation_types)
        self.explanation_model_types = set(explanation_model_types)
        self.neurons: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.explanations: list[dict[str, Any]] = []
        self.activations: list[dict[str, Any]] = []
        self.received: list[dict[str, Any]] = []  # accepted bodies
        self.requests = 0
        self.fail_next: list[int] = []  # statuses to answer before anything else (503, 429, ...)
        self.rate_limit: int | None = None  # answer 429 once this many requests were served
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                server.requests += 1
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path == "/api/source-set/new":
                    return server.new_source_set(self, body)
                if self.path != "/api/feature/upload-batch":
                    return send_json(self, 404, {"error": "not found"})
                if server.fail_next:
                    status = server.fail_next.pop(0)
                    return send_json(self, status, {"error": f"injected {status}"}, {"Retry-After": "0"})
                if server.rate_limit is not None and server.requests > server.rate_limit:
                    return send_json(self, 429, {"error": "Too many requests."}, {"Retry-After": "0"})
                user = server.users.get(self.headers.get("x-api-key") or "")
                if user is None:
                    return send_json(self, 401, {"error": AUTH_ERROR})
                try:
                    created = server.handle(body, user)
                except Invalid as e:
                    return send_json(self, 400, {"error": str(e), "path": e.path})
                except ServerFault:
                    return send_json(self, 500, {"error": SERVER_FAULT, "message": SERVER_FAULT})
                send_json(self, 200, {"message": f"{created} features created."})

        self.server = LoopbackServer(Handler)
        self.url = self.server.url

    def new_source_set(self, handler: BaseHTTPRequestHandler, raw: bytes) -> None:
        """source-set/new/route.tsx and lib/db/source.ts (createSourceSetWithSources)."""
        user = self.users.get(handler.headers.get("x-api-key") or "")
        if user is None:
            return send_json(handler, 401, {"error": AUTH_ERROR})
        body = json.loads(raw)
        name, model_id = body.get("name") or "", body.get("modelId") or ""
        if not re.match(r"^[a-z][a-z0-9-]*[a-z0-9]$|^[a-z0-9]$", name) or name == "neurons" or "--" in name:
            return send_json(handler, 400, {"error": "Name must contain only lowercase letters, digits, and hyphens",
                                            "path": "name"})  # fmt: skip
        if model_id not in self.model_layers:
            return send_json(handler, 400, {"error": "Model not found"})
        if (model_id, name) in self.source_sets:
            return send_json(handler, 400, {"error": "Source set name already exists for this model."})
        sources = {f"{i}-{name}" for i in range(self.model_layers[model_id])}
        self.source_sets[(model_id, name)] = (user, sources)
        send_json(handler, 200, {"modelId": model_id, "name": name, "sources": [{"id": s} for s in sorted(sources)]})

    def handle(self, raw: bytes, user: str) -> int:
        try:
            body = json.loads(raw, parse_constant=_no_constant)  # JSON.parse: no NaN, no Infinity
        except ValueError as e:
            raise ServerFault(str(e)) from e
        body = validate_upload_batch(body)
        model_id, source = body["modelId"], body["source"]
        owner, sources = self.source_sets.get((model_id, set_name(source)), (None, set()))
        if owner is None:
            raise ServerFault("Source set not found.")
        if owner != user:
            raise ServerFault("User is not the creator of this source set.")
        if source not in sources:
            raise ServerFault("Source not found.")
        features = body["features"]
        for f in features:
            if any(len(a["tokens"]) != len(a["values"]) for a in f["activations"]):
                raise ServerFault("One of the activations tokens lengths does not match its values length.")
        if len({f["index"] for f in features}) != len(features):
            raise ServerFault("All indexes must be unique.")
        explanations = [e for f in features for e in f.get("explanations") or []]
        if {e["methodName"] for e in explanations if e.get("methodName")} - self.explanation_types:
            raise ServerFault("Invalid Explanation Method Names")
        if {e["modelName"] for e in explanations if e.get("modelName")} - self.explanation_model_types:
            raise ServerFault("Invalid Explanation Model Names")
        if any(e.get("modelName") for e in explanations):  # Explanation has no modelName column
            raise ServerFault("Unknown argument `modelName`.")
        for f in features:
            key = (model_id, source, str(f["index"]))
            values = [v for a in f["activations"] for v in a["values"]]
            self.neurons.setdefault(key, {"creatorId": user, "frac_nonzero": f.get("density", -1),
                                          "maxActApprox": max(0.0, *values)})  # fmt: skip
            for e in f.get("explanations") or []:
                self.explanations.append({"modelId": model_id, "layer": source, "index": key[2], "authorId": user,
                                          "description": e["text"], "typeName": e.get("methodName")})  # fmt: skip
            for a in f["activations"]:
                self.activations.append({"modelId": model_id, "layer": source, "index": key[2], **a})
        self.received.append(body)
        return len(features)

    def __enter__(self) -> FakeNeuronpedia:
        self.server.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.__exit__()


def set_name(source: str) -> str:
    """lib/utils/source.ts: getSourceSetNameFromSource ("6-res-jb" -> "res-jb")."""
    return source[source.index("-") + 1 :].split("__")[0] if "-" in source else source


def _no_constant(name: str) -> Any:
    raise ValueError(f"Unexpected token {name} in JSON")


def _number(value: Any, path: str, lo: float | None = None, hi: float | None = None, integer: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise Invalid(path, f"{path} must be a `number` type")
    if integer and value != int(value):
        raise Invalid(path, f"{path} must be an integer")
    if lo is not None and value < lo:
        raise Invalid(path, f"{path} must be greater than or equal to {lo}")
    if hi is not None and value > hi:
        raise Invalid(path, f"{path} must be less than or equal to {hi}")


def _string(value: Any, path: str, lo: int = 1, hi: int | None = None) -> str:
    """yup string().required(): a non-empty string (min and max in UTF-16 code units)."""
    if not isinstance(value, str) or value == "":
        raise Invalid(path, f"{path} is a required field")
    if _js_length(value) < lo:
        raise Invalid(path, f"{path} must be at least {lo} characters")
    if hi is not None and _js_length(value) > hi:
        raise Invalid(path, f"{path} must be at most {hi} characters")
    return value


def _array(value: Any, path: str, lo: int = 0, hi: int | None = None, required: bool = True) -> list[Any]:
    if value is None and not required:
        return []
    if not isinstance(value, list):
        raise Invalid(path, f"{path} is a required field" if value is None else f"{path} must be a `array` type")
    if len(value) < lo:
        raise Invalid(path, f"{path} field must have at least {lo} items")
    if hi is not None and len(value) > hi:
        raise Invalid(path, f"{path} field must have less than or equal to {hi} items")
    return value


def validate_upload_batch(body: Any) -> dict[str, Any]:
    """route.tsx's uploadBatchSchema (yup), with its lowercase transforms applied; Invalid on a problem."""
    if not isinstance(body, dict):
        raise Invalid("", "this must be a `object` type")
    out = {
        "modelId": _string(body.get("modelId"), "modelId").lower(),
        "source": _string(body.get("source"), "source").lower(),
    }
    features = _array(body.get("features"), "features", 1, 128)
    out["features"] = []
    for i, f in enumerate(features):
        p = f"features[{i}]"
        if not isinstance(f, dict):
            raise Invalid(p, f"{p} must be a `object` type")
        _number(f.get("index"), f"{p}.index", 0, 10_000_000, integer=True)
        if f.get("density") is not None:
            _number(f["density"], f"{p}.density", 0, 1)
        for side in ("topLogits", "bottomLogits"):
            for j, logit in enumerate(_array(f.get(side), f"{p}.{side}", 0, 20, required=False)):
                _string(logit.get("token"), f"{p}.{side}[{j}].token")
                _number(logit.get("value"), f"{p}.{side}[{j}].value")
        explanations = []
        for j, e in enumerate(_array(f.get("explanations"), f"{p}.explanations", required=False)):
            q = f"{p}.explanations[{j}]"
            item = {"text": _string(e.get("text"), f"{q}.text", 1, 512)}
            for name in ("methodName", "modelName"):
                if e.get(name) is not None:
                    item[name] = str(e[name]).lower()
            explanations.append(item)
        activations = _array(f.get("activations"), f"{p}.activations", 1)
        for j, a in enumerate(activations):
            q = f"{p}.activations[{j}]"
            for k, token in enumerate(_array(a.get("tokens"), f"{q}.tokens", 1, 1024)):
                _string(token, f"{q}.tokens[{k}]")
            for k, value in enumerate(_array(a.get("values"), f"{q}.values", 1, 1024)):
                _number(value, f"{q}.values[{k}]")
        out["features"].append({**f, "explanations": explanations, "activations": activations})
    return out
