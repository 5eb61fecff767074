"""nnsight backend: self-explanation through nnsight's TransformersModel (or the deprecated LanguageModel),
locally or remotely on NDIF (`remote=True`, a host URL, or "local" for nnsight's local simulation).

Remote-safe by construction: inside a trace there are only envoys (sent by reference), plain tensors and
`patch_residual` from `sae_selfexplain_plugin.ops`, a pure-torch module registered with nnsight so that its
source travels with the request. Nothing from sae_lens, json or this adapter is referenced in a trace.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import nnsight
import torch
from nnsight.intervention.envoy import Envoy
from nnsight.modeling.huggingface import _ID_CACHE

import sae_selfexplain_plugin.ops as trace_ops
from sae_selfexplain_plugin.backend import GenerationRequest, GenerationResult, check_layer, position_ids
from sae_selfexplain_plugin.decoding import finish_rows
from sae_selfexplain_plugin.errors import InputError, SelfExplainError
from sae_selfexplain_plugin.ops import patch_residual

from .transformers import attribute_path, decoder_layers_path, eos_token_ids

nnsight.register(trace_ops)  # NDIF has no copy of our package: ship this module's source by value

Remote = Any  # False (local), True (NDIF), a host URL, "local" (nnsight's simulation), or an nnsight Backend


class RemoteExecutionError(SelfExplainError, RuntimeError):
    """A remote (NDIF) run failed, was refused, or did not finish in time."""


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
        if repo_id:
            model.repo_id = repo_id
            # An id given explicitly is taken as canonical: nnsight would otherwise ask the hub to canonicalise it.
            _ID_CACHE.setdefault(repo_id, repo_id)
        if _submits_to_server(remote) and not getattr(model, "repo_id", ""):
            raise InputError(
                "remote execution names the model by its hub repo id, but this nnsight model was built from an "
                "in-memory object and has none; pass repo_id='google/gemma-3-270m' (the id NDIF serves)."
            )
        self.model = model
        self.remote = remote
        self.timeout_s, self.poll_s = timeout_s, poll_s
        torch_model = model._module
        self._path = decoder_layers_path(torch_model)
        config: Any = torch_model.config
        self._d_model = int(getattr(config, "hidden_size", None) or config.n_embd)
        self._n_layers = len(attribute_path(torch_model, self._path))
        self._model_id = str(getattr(model, "repo_id", "") or getattr(config, "_name_or_path", "") or "nnsight-model")
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
    def device(self) -> torch.device:
        return torch.device("cpu") if self._submits else self.model.device

    @property
    def _submits(self) -> bool:
        return _submits_to_server(self.remote)

    def _trace_options(self) -> dict[str, Any]:
        if self._submits:  # submit, then poll GET /response/{id}: no websocket, and we own the timeout
            return {"remote": self.remote, "blocking": False}
        if self.remote in (False, None, "local"):
            return {"remote": self.remote or False}
        return {"backend": self.remote}  # any nnsight Backend, e.g. a whitelist-enforcing one in our tests

    def _saved(self, tracer: Any, name: str, local_value: Any) -> Any:
        """A saved value: from the caller's frame when the trace ran here, else polled from the server."""
        if not self._submits:
            return local_value
        backend = tracer.backend
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                result = backend()
            except Exception as e:  # nnsight's RemoteError: the server reported ERROR
                raise RemoteExecutionError(f"remote job {backend.job_id} failed: {_redact(str(e))}") from None
            if isinstance(result, dict):
                return result[name]
            if time.monotonic() > deadline:
                raise RemoteExecutionError(
                    f"remote job {backend.job_id} did not finish within {self.timeout_s:.0f}s (last status: "
                    f"{getattr(backend.status, 'value', backend.status)}); raise timeout_s, or poll the job later."
                )
            time.sleep(self.poll_s)

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
        with _submitting(), self.model.trace(inputs, **self._trace_options()) as tracer:
            hidden = block.input.detach().cpu().save()
            tracer.stop()  # skip the later blocks and the unembedding
        return torch.as_tensor(self._saved(tracer, "hidden", hidden))

    def _generate_options(self, request: GenerationRequest) -> dict[str, Any]:
        options: dict[str, Any] = {"max_new_tokens": request.max_new_tokens, "do_sample": request.temperature > 0}
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
        with _submitting(), self.model.generate(inputs, **self._trace_options(), **options) as tracer:
            for _ in tracer.iter[0:1]:  # the prompt pass only; the KV cache carries the patch forward
                block.input = patch_residual(block.input, positions, vectors, add)
            sequences = tracer.result.detach().cpu().save()
        return self._result(request, self._saved(tracer, "sequences", sequences))

    def generate_many(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Several batches; on a server they travel as one `session`, so a sweep is one request."""
        first = requests[0]
        same = all(
            (r.injection.layer, r.max_new_tokens, r.temperature)
            == (first.injection.layer, first.max_new_tokens, first.temperature)
            for r in requests
        )
        if not self._submits or len(requests) == 1 or not same:
            return [self.generate(r) for r in requests]
        block = self._block(first.injection.layer)
        options = self._generate_options(first)
        batches = [_trace_tensors(r) for r in requests]
        model = self.model  # the session body is shipped: it may name envoys and tensors, never this backend
        outs = None
        with _submitting(), model.session(**self._trace_options()) as session:
            outs = nnsight.save([])
            for ids, mask, positions, vectors, add in batches:
                with model.generate({"input_ids": ids, "attention_mask": mask}, **options) as tracer:
                    for _ in tracer.iter[0:1]:
                        block.input = patch_residual(block.input, positions, vectors, add)
                    outs.append(tracer.result.detach().cpu())
        outs = self._saved(session, "outs", outs)
        return [self._result(r, o) for r, o in zip(requests, outs)]


def _submits_to_server(remote: Remote) -> bool:
    """True when traces go to a server (NDIF or a host URL) and results are polled for."""
    return remote is True or (isinstance(remote, str) and remote != "local")


def _trace_tensors(request: GenerationRequest) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """What a trace needs from a request, as plain CPU tensors: ids, mask, placeholder mask, vectors, add."""
    inj = request.injection
    return (
        request.input_ids.cpu(),
        request.attention_mask.cpu(),
        inj.positions.cpu(),
        inj.vectors.detach().float().cpu(),
        inj.mode == "add",
    )


def _redact(text: str) -> str:
    """Remove the NDIF API key from a message, wherever a server might echo it."""
    key = nnsight.CONFIG.API.APIKEY or os.environ.get("NDIF_API_KEY") or ""
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
    `remote`: True (NDIF), a host URL, or "local"; options as for `sae.self_explain`."""
    if isinstance(sae, torch.Tensor):
        from sae_selfexplain_plugin import SelfExplainConfig, SelfExplainer

        config = options.pop("config", None) or SelfExplainConfig(**options)
        return SelfExplainer(NNsightBackend(self, remote=remote), config).explain(sae, features)
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
