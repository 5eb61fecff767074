"""nnsight backend: self-explanation through nnsight's TransformersModel (or the deprecated LanguageModel),
locally or remotely on NDIF (`remote=True`, a host URL, or "local" for nnsight's local simulation).

Remote-safe by construction: inside a trace there are only envoys (sent by reference), plain tensors and
functions of `sae_selfexplain_plugin.ops`, a pure-torch module registered with nnsight so that its
source travels with the request. Nothing from sae_lens or this adapter is referenced in a trace.

Remote runs submit without blocking and poll `GET /response/{id}` (NDIF's non-blocking protocol): a poll
or download that fails transiently is retried with backoff until `timeout_s`; a job still running at
`timeout_s` raises RemoteTimeout naming its id and stays collectable (the same call again polls that job
instead of submitting it twice). Neither the user's model nor nnsight's state is modified: the model key
is built from `repo_id` when one is given.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import nnsight
import torch
from nnsight.intervention.envoy import Envoy

import sae_selfexplain_plugin.ops as trace_ops
from sae_selfexplain_plugin.backend import GenerationRequest, GenerationResult, check_layer, position_ids
from sae_selfexplain_plugin.decoding import finish_rows, word_tokens
from sae_selfexplain_plugin.errors import InputError, SelfExplainError
from sae_selfexplain_plugin.ops import ban_generated, mark_generated, patch_residual

from .transformers import (
    attribute_path,
    config_context_length,
    decoder_layers_path,
    eos_token_ids,
)

nnsight.register(trace_ops)  # NDIF has no copy of our package: ship this module's source by value

Remote = Any  # False (local), True (NDIF), a host URL, "local" (nnsight's simulation), or an nnsight Backend

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


def _fingerprint(*parts: Any) -> str:
    """Identifies a remote request by what it computes, so a rerun finds a job a timeout left running."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            h.update(str((part.dtype, tuple(part.shape))).encode())
            h.update(part.detach().cpu().contiguous().numpy().tobytes())
        else:
            h.update(repr(part).encode())
    return h.hexdigest()


def _is_transient(error: Exception) -> bool:
    """A poll or download failure worth retrying: the connection, or a 429/5xx answer."""
    import httpx

    if isinstance(error, httpx.HTTPStatusError):
        return error.response.status_code in _TRANSIENT_STATUS
    return isinstance(error, httpx.TransportError)


def is_nnsight_model(model: Any) -> bool:
    """An nnsight model wrapper (TransformersModel, LanguageModel, NNsight): all are Envoys in nnsight 0.8."""
    return isinstance(model, Envoy) and isinstance(getattr(model, "_module", None), torch.nn.Module)


class NNsightBackend:
    """Runs self-explanation through an nnsight model; `remote` is passed to every trace."""

    def __init__(
        self,
        model: Any,
        remote: Remote = False,
        repo_id: str | None = None,
        timeout_s: float = 1800.0,
        poll_s: float = 1.0,
    ) -> None:
        if not is_nnsight_model(model):
            raise InputError(f"expected an nnsight model (TransformersModel), got {type(model).__name__}.")
        if model.tokenizer is None:
            raise InputError(
                "this nnsight model has no tokenizer; build it with TransformersModel(model, tokenizer=tok)."
            )
        if _submits_to_server(remote) and not (repo_id or getattr(model, "repo_id", "")):
            raise InputError(
                "remote execution names the model by its hub repo id, but this nnsight model was built from an "
                "in-memory object and has none; pass repo_id='google/gemma-3-270m' (the id NDIF serves)."
            )
        self.repo_id = repo_id
        self.model = model
        self.remote = remote
        self.timeout_s, self.poll_s = timeout_s, poll_s
        torch_model = model._module
        self._path = decoder_layers_path(torch_model)
        config: Any = torch_model.config
        self._d_model = int(getattr(config, "hidden_size", None) or config.n_embd)
        self._n_layers = len(attribute_path(torch_model, self._path))
        self._model_id = str(
            repo_id or getattr(model, "repo_id", "") or getattr(config, "_name_or_path", "") or "nnsight-model"
        )
        self.eos_token_ids = eos_token_ids(torch_model, model.tokenizer)

    @property
    def tokenizer(self) -> Any:
        return self.model.tokenizer

    @property
    def n_layers(self) -> int:
        return self._n_layers

    @property
    def d_model(self) -> int:
        return self._d_model

    @property
    def context_length(self) -> int | None:
        return config_context_length(self.model._module.config)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu") if self._submits else self.model.device

    @property
    def _submits(self) -> bool:
        return _submits_to_server(self.remote)

    def _trace_options(self, fingerprint: str) -> dict[str, Any]:
        if self._submits:  # submit, then poll GET /response/{id}: no websocket, and we own the timeout
            return {"backend": self._remote_backend(_PENDING.get(fingerprint))}
        if self.remote in (False, None, "local"):
            return {"remote": self.remote or False}
        return {"backend": self.remote}  # any nnsight Backend, e.g. NDIF's server code in our tests

    def _remote_backend(self, job_id: str | None) -> Any:
        """nnsight's RemoteBackend, non-blocking; with `job_id` it polls that job instead of submitting."""
        from nnsight.intervention.backends.remote import RemoteBackend

        return RemoteBackend(
            remote_model_key(self.model, self.repo_id),
            host=None if self.remote is True else self.remote,
            api_key=_api_key() or None,
            env=getattr(self.model, "_remoteable_get_env", dict)(),
            blocking=False,
            job_id=job_id,
        )

    def _saved(self, tracer: Any, name: str, local_value: Any, fingerprint: str) -> Any:
        """A saved value: from the caller's frame when the trace ran here, else polled from the server.
        Transient poll and download failures are retried with backoff until `timeout_s`."""
        if not self._submits:
            return local_value
        backend = tracer.backend
        deadline = time.monotonic() + self.timeout_s
        failures = 0
        while True:
            try:
                result = backend()
                failures = 0
            except Exception as e:
                if type(e).__name__ == "RemoteError":  # the server reported ERROR for this job
                    _PENDING.pop(fingerprint, None)
                    raise RemoteExecutionError(f"remote job {backend.job_id} failed: {_redact(str(e))}") from None
                if not _is_transient(e):
                    raise
                failures += 1
                result = None
            if isinstance(result, dict):
                _PENDING.pop(fingerprint, None)
                return result[name]
            if time.monotonic() > deadline:
                _PENDING[fingerprint] = backend.job_id
                raise RemoteTimeout(
                    f"remote job {backend.job_id} did not finish within {self.timeout_s:.0f}s (last status: "
                    f"{getattr(backend.status, 'value', backend.status)}); it is still running on the server: "
                    "run the same call again to collect it (raise timeout_s to wait longer).",
                    backend.job_id,
                )
            time.sleep(min(self.poll_s * 2**failures, 30.0))

    @property
    def model_id(self) -> str:
        return self._model_id

    def _block(self, layer: int) -> Any:
        """The envoy of decoder block `layer`."""
        check_layer(layer, self._n_layers)
        return attribute_path(self.model, self._path)[layer]

    def residual(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, layer: int) -> torch.Tensor:
        block = self._block(layer)
        inputs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids(attention_mask),
        }
        hidden = None
        fingerprint = _fingerprint("residual", self._model_id, layer, input_ids, attention_mask)
        with _submitting(), self.model.trace(inputs, **self._trace_options(fingerprint)) as tracer:
            hidden = block.input.detach().cpu().save()
            tracer.stop()  # skip the later blocks and the unembedding
        return torch.as_tensor(self._saved(tracer, "hidden", hidden, fingerprint))

    def _generate_options(self, request: GenerationRequest) -> dict[str, Any]:
        options: dict[str, Any] = {"max_new_tokens": request.max_new_tokens, "do_sample": request.temperature > 0}
        if request.no_repeats:
            # every row runs all max_new_tokens steps, so the trace's per-step loop always completes (rows are
            # cut at their first EOS afterwards, as always, so the texts do not change)
            options["eos_token_id"] = None
        if request.temperature > 0:  # plain ancestral sampling, as the original work did
            options.update(temperature=request.temperature, top_k=0, top_p=1.0)
            torch.manual_seed(request.seed)
        pad = getattr(self.tokenizer, "pad_token_id", None)
        if pad is not None:
            options["pad_token_id"] = pad
        return options

    def _result(self, request: GenerationRequest, sequences: Any) -> GenerationResult:
        generated = torch.as_tensor(sequences)[:, request.input_ids.shape[1] :].tolist()
        return finish_rows(generated, self.tokenizer, request.stop_strings, self.eos_token_ids)

    def generate(self, request: GenerationRequest) -> GenerationResult:
        block = self._block(request.injection.layer)
        ids, mask, positions, vectors, add = _trace_tensors(request)
        options = self._generate_options(request)
        inputs = {"input_ids": ids, "attention_mask": mask}
        sequences = None
        fingerprint = _fingerprint("generate", self._model_id, request.injection.layer, options, ids, mask, positions,
                                   vectors, add)  # fmt: skip
        ban = request.no_repeats  # then a per-step loop bans repeated word tokens, as decoding.decode does
        parts: tuple[Any, Any, Any] = self._ban_parts() if ban else (None, None, None)
        embed, head, words = parts
        # without a ban, the prompt pass only: the KV cache carries the patch forward
        steps = request.max_new_tokens if ban else 1
        with _submitting(), self.model.generate(inputs, **self._trace_options(fingerprint), **options) as tracer:
            for step in tracer.iter[0:steps]:
                if step == 0:
                    block.input = patch_residual(block.input, positions, vectors, add)
                if ban:
                    # read before the unembedding: a trace reaches envoys in the order their modules run
                    if step > 0:
                        last = embed.input[:, -1]  # the token generated at the previous step
                    logits = head.output
                    if step == 0:
                        banned = torch.zeros_like(logits[:, -1], dtype=torch.bool)
                    else:
                        mark_generated(banned, last, words)
                    head.output = ban_generated(logits, banned[:, None])
            sequences = tracer.result.detach().cpu().save()
        return self._result(request, self._saved(tracer, "sequences", sequences, fingerprint))

    def _ban_parts(self) -> tuple[Any, Any, torch.Tensor]:
        """For no_repeats: the envoys of the token embedding (its input at each step is the token just
        generated) and of the unembedding (its output is where the ban applies), and the word-token mask.
        Looked up only when a ban is asked for."""
        torch_model = self.model._module
        embed, head = torch_model.get_input_embeddings(), torch_model.get_output_embeddings()
        paths = {m: name for name, m in torch_model.named_modules() if m is embed or m is head}
        words = word_tokens(self.tokenizer, head.weight.shape[0])
        return attribute_path(self.model, paths[embed]), attribute_path(self.model, paths[head]), words

    def generate_many(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Several batches; on a server they travel as `session`s of at most MAX_REQUEST_BYTES of tensors
        each, so a sweep is one request (or a few, for large ones)."""
        first = requests[0]
        same = all(
            (r.injection.layer, r.max_new_tokens, r.temperature)
            == (first.injection.layer, first.max_new_tokens, first.temperature)
            for r in requests
        )
        # a session ships one trace body per batch; the no_repeats body (a per-step loop) goes one batch a request
        if not self._submits or len(requests) == 1 or not same or any(r.no_repeats for r in requests):
            return [self.generate(r) for r in requests]
        results: list[GenerationResult] = []
        for group in _by_size([_trace_tensors(r) for r in requests], MAX_REQUEST_BYTES):
            chunk = requests[len(results) : len(results) + len(group)]
            results += self._session(chunk, group) if len(group) > 1 else [self.generate(chunk[0])]
        return results

    def _session(self, requests: list[GenerationRequest], batches: list[_Tensors]) -> list[GenerationResult]:
        first = requests[0]
        block = self._block(first.injection.layer)
        options = self._generate_options(first)
        fingerprint = _fingerprint(
            "session", self._model_id, first.injection.layer, options, *(t for b in batches for t in b)
        )
        model = self.model  # the session body is shipped: it may name envoys and tensors, never this backend
        outs = None
        with _submitting(), model.session(**self._trace_options(fingerprint)) as session:
            outs = nnsight.save([])
            for ids, mask, positions, vectors, add in batches:
                with model.generate({"input_ids": ids, "attention_mask": mask}, **options) as tracer:
                    for _ in tracer.iter[0:1]:
                        block.input = patch_residual(block.input, positions, vectors, add)
                    outs.append(tracer.result.detach().cpu())
        outs = self._saved(session, "outs", outs, fingerprint)
        return [self._result(r, o) for r, o in zip(requests, outs)]


_Tensors = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, bool]


def _by_size(batches: list[_Tensors], cap: int) -> list[list[_Tensors]]:
    """Consecutive groups of batches whose tensors add up to at most `cap` bytes (a larger batch alone)."""
    groups: list[list[_Tensors]] = []
    size = cap + 1
    for batch in batches:
        n = sum(t.numel() * t.element_size() for t in batch[:4])
        if size + n > cap:
            groups.append([])
            size = 0
        groups[-1].append(batch)
        size += n
    return groups


def _submits_to_server(remote: Remote) -> bool:
    """True when traces go to a server (NDIF or a host URL) and results are polled for."""
    return remote is True or (isinstance(remote, str) and remote != "local")


def _trace_tensors(request: GenerationRequest) -> _Tensors:
    """What a trace needs from a request, as plain CPU tensors: ids, mask, placeholder mask, vectors, add."""
    inj = request.injection
    return (
        request.input_ids.cpu(),
        request.attention_mask.cpu(),
        inj.positions.cpu(),
        inj.vectors.detach().float().cpu(),
        inj.mode == "add",
    )


def _api_key() -> str:
    return str(nnsight.CONFIG.API.APIKEY or os.environ.get("NDIF_API_KEY") or "")


def _redact(text: str) -> str:
    """Remove the NDIF API key from a message, wherever a server might echo it."""
    key = _api_key()
    return text.replace(key, "***") if key else text


@contextmanager
def _submitting() -> Iterator[None]:
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


def _model_method(self: Any, sae: Any, features: Any = None, remote: Any = False, **options: Any) -> Any:
    """Explain features of a SAELens `sae` (or rows of a [n, d_model] tensor) through this nnsight model.
    `remote`: True (NDIF), a host URL, or "local"; `repo_id`, `timeout_s`, `poll_s` for remote runs;
    other options as for `sae.self_explain`."""
    if isinstance(sae, torch.Tensor):
        from sae_selfexplain_plugin import SelfExplainConfig, SelfExplainer

        remote_options = {k: options.pop(k) for k in ("repo_id", "timeout_s", "poll_s") if options.get(k) is not None}
        config = options.pop("config", None) or SelfExplainConfig(**options)
        backend = NNsightBackend(self, remote=remote, **remote_options)
        return SelfExplainer(backend, config).explain(sae, features)
    explain = getattr(sae, "self_explain", None)  # the SAELens integration's method: no import of it here
    if explain is None:
        raise InputError(
            f"expected a SAELens SAE (with sae_selfexplain_plugin installed) or a [n, d_model] tensor, got "
            f"{type(sae).__name__}; call sae_selfexplain_plugin.install() if you uninstalled it."
        )
    return explain(features, self, remote=remote, **options)


_model_method.__name__ = "self_explain"


def install() -> None:
    """Give nnsight's TransformersModel (and LanguageModel, its subclass) a `self_explain` method."""
    from nnsight.modeling.transformers import TransformersModel

    if TransformersModel.__dict__.get("self_explain") not in (None, _model_method):
        raise InputError("TransformersModel already has a self_explain attribute that is not ours; not overwriting.")
    TransformersModel.self_explain = _model_method


def uninstall() -> None:
    from nnsight.modeling.transformers import TransformersModel

    if TransformersModel.__dict__.get("self_explain") is _model_method:
        del TransformersModel.self_explain
