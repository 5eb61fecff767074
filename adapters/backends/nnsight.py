"""nnsight backends: self-explanation through nnsight's TransformersModel (or the deprecated LanguageModel).

- `NNsightBackend` runs the traces here: on the model in memory, in nnsight's local simulation of the remote
  path (`remote="local"`), or through any nnsight Backend object passed as `remote`;
- `NDIFBackend` runs the same traces on NDIF (`remote=True`) or a host speaking its protocol (a URL), and
  sends a sweep's batches as sessions. `NNsightBackend(model, remote=True)` builds one. The protocol itself
  (model key, polling, retry, timeouts, payload caps, key redaction) is `ndif.py`.

Remote-safe by construction: inside a trace there are only envoys (sent by reference), plain tensors and
functions of `sae_selfexplain_plugin.ops`, a pure-torch module registered with nnsight so that its
source travels with the request. Nothing from sae_lens or this adapter is referenced in a trace.
"""

from __future__ import annotations

from typing import Any

import nnsight
import torch
from nnsight.intervention.envoy import Envoy

import sae_selfexplain_plugin.ops as trace_ops
from sae_selfexplain_plugin.backend import GenerationRequest, GenerationResult, check_layer, position_ids
from sae_selfexplain_plugin.decoding import finish_rows, word_tokens
from sae_selfexplain_plugin.errors import InputError
from sae_selfexplain_plugin.ops import ban_generated, mark_generated, patch_residual

from .ndif import (  # the public ones stay importable from here (__all__), their path before ndif.py
    MAX_REQUEST_BYTES,
    RemoteExecutionError,
    RemoteTimeout,
    check_repo_id,
    collect,
    fingerprint,
    remote_model_key,
    sessions,
    submits_to_server,
    submitting,
    trace_options,
)
from .transformers import (
    attribute_path,
    config_context_length,
    decoder_layers_path,
    eos_token_ids,
)

__all__ = [
    "MAX_REQUEST_BYTES",
    "NDIFBackend",
    "NNsightBackend",
    "RemoteExecutionError",
    "RemoteTimeout",
    "install",
    "is_nnsight_model",
    "remote_model_key",
    "uninstall",
]

nnsight.register(trace_ops)  # NDIF has no copy of our package: ship this module's source by value

Remote = Any  # False (local), True (NDIF), a host URL, "local" (nnsight's simulation), or an nnsight Backend


def is_nnsight_model(model: Any) -> bool:
    """An nnsight model wrapper (TransformersModel, LanguageModel, NNsight): all are Envoys in nnsight 0.8."""
    return isinstance(model, Envoy) and isinstance(getattr(model, "_module", None), torch.nn.Module)


class NNsightBackend:
    """Runs self-explanation through an nnsight model, tracing here; `remote` ("local" or an nnsight Backend)
    is passed to every trace. The trace bodies are written once, here: NDIFBackend changes only how a trace
    runs (`_trace_options`) and how its saved values come back (`_saved`)."""

    def __new__(cls, model: Any = None, remote: Remote = False, *args: Any, **kwargs: Any) -> NNsightBackend:
        # NNsightBackend(model, remote=True or a URL) has always meant NDIF: it builds an NDIFBackend
        if cls is NNsightBackend and submits_to_server(remote):
            cls = NDIFBackend
        return super().__new__(cls)

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
        return self.model.device  # type: ignore[no-any-return]

    @property
    def model_id(self) -> str:
        return self._model_id

    def _job_key(self, kind: str, *parts: Any) -> str:
        """What identifies a trace's job on a server; a trace run here has none."""
        return ""

    def _trace_options(self, key: str) -> dict[str, Any]:
        if self.remote in (False, None, "local"):
            return {"remote": self.remote or False}
        return {"backend": self.remote}  # any nnsight Backend, e.g. NDIF's server code in our tests

    def _saved(self, tracer: Any, name: str, local_value: Any, key: str) -> Any:
        """A saved value: here, the variable the trace filled in the caller's frame."""
        return local_value

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
        key = self._job_key("residual", layer, input_ids, attention_mask)
        # submitting(): a Backend object passed as `remote` may itself be a remote one
        with submitting(), self.model.trace(inputs, **self._trace_options(key)) as tracer:
            hidden = block.input.detach().cpu().save()
            tracer.stop()  # skip the later blocks and the unembedding
        return torch.as_tensor(self._saved(tracer, "hidden", hidden, key))

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
        key = self._job_key("generate", request.injection.layer, options, ids, mask, positions, vectors, add)
        ban = request.no_repeats  # then a per-step loop bans repeated word tokens, as decoding.decode does
        parts: tuple[Any, Any, Any] = self._ban_parts() if ban else (None, None, None)
        embed, head, words = parts
        # without a ban, the prompt pass only: the KV cache carries the patch forward
        steps = request.max_new_tokens if ban else 1
        with submitting(), self.model.generate(inputs, **self._trace_options(key), **options) as tracer:
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
        return self._result(request, self._saved(tracer, "sequences", sequences, key))

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
        """One trace per batch here (NDIFBackend groups them into sessions)."""
        return [self.generate(r) for r in requests]


class NDIFBackend(NNsightBackend):
    """The nnsight backend's traces, run on NDIF (`remote=True`) or a host speaking its protocol (a URL):
    submitted without blocking and polled for (`ndif.py`, `timeout_s`, `poll_s`). `repo_id` names the model
    there when the nnsight model was built from an in-memory object."""

    def __init__(
        self,
        model: Any,
        remote: Remote = True,
        repo_id: str | None = None,
        timeout_s: float = 1800.0,
        poll_s: float = 1.0,
    ) -> None:
        if not submits_to_server(remote):
            raise InputError(f"NDIFBackend runs on a server: remote=True or a host URL, not {remote!r}.")
        super().__init__(model, remote, repo_id, timeout_s, poll_s)
        check_repo_id(model, repo_id)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")  # where inputs are built; the server places them on its own devices

    def _job_key(self, kind: str, *parts: Any) -> str:
        return fingerprint(kind, self._model_id, *parts)

    def _trace_options(self, key: str) -> dict[str, Any]:
        return trace_options(self.model, self.remote, self.repo_id, key)

    def _saved(self, tracer: Any, name: str, local_value: Any, key: str) -> Any:
        return collect(tracer, name, key, self.timeout_s, self.poll_s)

    def generate_many(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Several batches as `session`s of at most `ndif.MAX_REQUEST_BYTES` of tensors each, so a sweep is
        one request (or a few, for large ones)."""
        first = requests[0]
        same = all(
            (r.injection.layer, r.max_new_tokens, r.temperature)
            == (first.injection.layer, first.max_new_tokens, first.temperature)
            for r in requests
        )
        # a session ships one trace body per batch; the no_repeats body (a per-step loop) goes one batch a request
        if len(requests) == 1 or not same or any(r.no_repeats for r in requests):
            return [self.generate(r) for r in requests]
        results: list[GenerationResult] = []
        for group in sessions([_trace_tensors(r) for r in requests]):
            chunk = requests[len(results) : len(results) + len(group)]
            results += self._session(chunk, group) if len(group) > 1 else [self.generate(chunk[0])]
        return results

    def _session(self, requests: list[GenerationRequest], batches: list[_Tensors]) -> list[GenerationResult]:
        first = requests[0]
        block = self._block(first.injection.layer)
        options = self._generate_options(first)
        key = self._job_key("session", first.injection.layer, options, *(t for b in batches for t in b))
        model = self.model  # the session body is shipped: it may name envoys and tensors, never this backend
        outs = None
        with submitting(), model.session(**self._trace_options(key)) as session:
            outs = nnsight.save([])
            for ids, mask, positions, vectors, add in batches:
                with model.generate({"input_ids": ids, "attention_mask": mask}, **options) as tracer:
                    for _ in tracer.iter[0:1]:
                        block.input = patch_residual(block.input, positions, vectors, add)
                    outs.append(tracer.result.detach().cpu())
        outs = self._saved(session, "outs", outs, key)
        return [self._result(r, o) for r, o in zip(requests, outs)]


_Tensors = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, bool]


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
