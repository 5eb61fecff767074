"""Hugging Face transformers backend: forward pre-hooks for injection, the core decode loop for generation."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from sae_selfexplain_plugin.backend import (
    GenerationRequest,
    GenerationResult,
    Injection,
    PrefixCache,
    check_layer,
    position_ids,
)
from sae_selfexplain_plugin.decoding import decode
from sae_selfexplain_plugin.errors import InputError

# Where decoder blocks live, by architecture family (first match wins).
_LAYER_PATHS = (
    "model.layers",
    "model.language_model.layers",
    "transformer.h",
    "gpt_neox.layers",
    "model.decoder.layers",
)


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass once the residual is read."""


def attribute_path(obj: Any, path: str) -> Any:
    """`obj.a.b.c` for path "a.b.c", or None where an attribute is missing (works on nnsight envoys too)."""
    for attr in path.split("."):
        obj = getattr(obj, attr, None)
        if obj is None:
            return None
    return obj


def decoder_layers_path(model: nn.Module) -> str:
    """Where the model keeps its list of transformer blocks, e.g. "model.layers"."""
    for path in _LAYER_PATHS:
        if isinstance(attribute_path(model, path), nn.ModuleList):
            return path
    raise InputError(
        f"cannot find the decoder blocks of {type(model).__name__} (looked at {', '.join(_LAYER_PATHS)}); "
        "this architecture is not supported by the transformers backend yet."
    )


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks."""
    layers: nn.ModuleList = attribute_path(model, decoder_layers_path(model))
    return layers


def _hidden_arg(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    hidden: torch.Tensor = args[0] if args else kwargs["hidden_states"]
    return hidden


def _with_hidden(
    args: tuple[Any, ...], kwargs: dict[str, Any], hidden: torch.Tensor
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _cache_of(output: Any) -> Any:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def _expanded(prefix: Any, batch: int) -> Any:
    """A new KV cache whose every row views the one-row `prefix` (no per-row copy; the first update
    concatenates into new tensors, so the stored prefix is never written)."""
    cache = copy.deepcopy(prefix)
    for layer in cache.layers:
        layer.keys = layer.keys.expand(batch, -1, -1, -1)
        layer.values = layer.values.expand(batch, -1, -1, -1)
    return cache


def config_context_length(config: Any) -> int | None:
    """The longest sequence a transformers config admits (max_position_embeddings; GPT-2 maps its n_positions
    there), from the text model's config for a multimodal one; None where it states none."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(text, "max_position_embeddings", None)
    return n if isinstance(n, int) and n > 0 else None


class TransformersBackend:
    """Runs self-explanation on a `transformers` causal LM (Gemma, Llama, GPT-2, ...)."""

    def __init__(
        self, model: nn.Module, tokenizer: Any, model_id: str | None = None, *, reuse_prefix: bool = True
    ) -> None:
        self.model = model.eval()
        self.prefixes = PrefixCache(self._run_prefix)
        self.prefixes.enabled = reuse_prefix
        self._tokenizer = tokenizer
        self.layers = find_decoder_layers(model)
        config: Any = model.config
        self._d_model = int(getattr(config, "hidden_size", None) or config.n_embd)
        self._model_id = model_id or str(getattr(config, "_name_or_path", "") or type(model).__name__)
        self.eos_token_ids = eos_token_ids(model, tokenizer)

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def d_model(self) -> int:
        return self._d_model

    @property
    def context_length(self) -> int | None:
        return config_context_length(self.model.config)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def model_id(self) -> str:
        return self._model_id

    @torch.no_grad()
    def residual(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, layer: int) -> torch.Tensor:
        check_layer(layer, self.n_layers)
        captured: list[torch.Tensor] = []

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            captured.append(_hidden_arg(args, kwargs).detach())
            raise _Captured

        handle = self.layers[layer].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            mask = attention_mask.to(self.device)
            self.model(
                input_ids=input_ids.to(self.device),
                attention_mask=mask,
                position_ids=position_ids(mask),
                use_cache=False,
            )
        except _Captured:
            pass
        finally:
            handle.remove()
        return captured[0]

    @contextmanager
    def injecting(self, injection: Injection) -> Iterator[None]:
        """Patch the residual entering block `injection.layer` for the forward passes inside the block."""
        check_layer(injection.layer, self.n_layers)

        def hook(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
        ) -> tuple[tuple[Any, ...], dict[str, Any]]:
            return _with_hidden(args, kwargs, injection.apply(_hidden_arg(args, kwargs)))

        handle = self.layers[injection.layer].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    @torch.no_grad()
    def _run_prefix(self, ids: torch.Tensor) -> Any:
        """The KV cache of one row of prompt tokens (no injection)."""
        ids = ids.to(self.device)
        ones = torch.ones_like(ids)
        out = self.model(input_ids=ids, attention_mask=ones, position_ids=position_ids(ones), use_cache=True)
        return _cache_of(out)

    def _prompt_pass(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, injection: Injection, *, use_cache: bool
    ) -> Any:
        """The injected forward over whole prompts; logits at the last position only."""
        return self._injected_forward(input_ids, attention_mask, injection, use_cache=use_cache, logits_to_keep=1)[1]

    def _injected_forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        injection: Injection,
        *,
        use_cache: bool,
        logits_to_keep: int,
    ) -> tuple[int, Any]:
        """The injected forward over whole (left-padded) sequences, from the cached shared prefix where there
        is one: (the prefix's length, the model's output for the positions after it)."""
        n, prefix = self.prefixes.lookup(input_ids, attention_mask, injection)
        cache = None if prefix is None else _expanded(prefix, input_ids.shape[0])
        with self.injecting(replace(injection, positions=injection.positions[:, n:])):
            out = self.model(
                input_ids=input_ids[:, n:],
                attention_mask=attention_mask,
                position_ids=position_ids(attention_mask)[:, n:],
                cache=cache,
                use_cache=use_cache,
                logits_to_keep=logits_to_keep,
            )
        return n, out

    # StepModel
    def prefill(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, injection: Injection
    ) -> tuple[torch.Tensor, Any]:
        out = self._prompt_pass(input_ids, attention_mask, injection, use_cache=True)
        return out.logits[:, -1], _cache_of(out)

    def step(self, token_ids: torch.Tensor, attention_mask: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
        out = self.model(
            input_ids=token_ids[:, None],
            attention_mask=attention_mask,
            position_ids=position_ids(attention_mask)[:, -1:],
            cache=cache,
            use_cache=True,
        )
        return out.logits[:, -1], _cache_of(out)

    def select_rows(self, cache: Any, rows: torch.Tensor) -> Any:
        cache.batch_select_indices(rows)
        return cache

    def generate(self, request: GenerationRequest) -> GenerationResult:
        self.prefixes.lookup(request.input_ids, request.attention_mask, request.injection)  # before our hooks
        if not request.probe_layers:
            return decode(self, request, self._tokenizer, self.eos_token_ids)
        with self._reading_prompt(request.probe_layers) as captured:
            result = decode(self, request, self._tokenizer, self.eos_token_ids)
        result.prompt_residuals = torch.stack([captured[i] for i in request.probe_layers], dim=1).float().cpu()
        return result

    @contextmanager
    def _reading_prompt(self, layers: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
        """Read the residual entering each of `layers` at the last position, on the first (prompt) pass only."""
        captured: dict[int, torch.Tensor] = {}

        def hook(layer: int) -> Any:
            def read(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                if layer not in captured:
                    captured[layer] = _hidden_arg(args, kwargs)[:, -1].detach()

            return read

        for layer in layers:
            check_layer(layer, self.n_layers)
        handles = [self.layers[layer].register_forward_pre_hook(hook(layer), with_kwargs=True) for layer in layers]
        try:
            yield captured
        finally:
            for handle in handles:
                handle.remove()

    # ProbeModel
    @torch.no_grad()
    def probe(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, injection: Injection, layers: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.prefixes.lookup(input_ids, attention_mask, injection)  # before our hooks
        with self._reading_prompt(layers) as captured:
            out = self._prompt_pass(input_ids, attention_mask, injection, use_cache=False)
        return torch.stack([captured[layer] for layer in layers], dim=1), out.logits[:, -1]

    def mean_token_embedding(self) -> torch.Tensor:
        model: Any = self.model  # a transformers PreTrainedModel
        weight: torch.Tensor = model.get_input_embeddings().weight
        return weight.detach().float().mean(0)

    @torch.no_grad()
    def token_logprobs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, injection: Injection
    ) -> torch.Tensor:
        with self.injecting(injection):
            logits = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids(attention_mask),
                use_cache=False,
            ).logits[:, :-1]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        return logprobs.gather(-1, input_ids[:, 1:, None]).squeeze(-1)

    # TrainableModel (direction_adapter/training.py)
    def continuation_logprobs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, injection: Injection, start: int
    ) -> torch.Tensor:
        keep = input_ids.shape[1] - start + 1  # logits at start - 1 .. T - 1 predict tokens start .. T (dropped)
        n, out = self._injected_forward(input_ids, attention_mask, injection, use_cache=False, logits_to_keep=keep)
        if n >= start:
            raise InputError(f"the scored continuation starts at {start}, inside the shared prefix ({n} tokens).")
        logprobs = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)
        return logprobs.gather(-1, input_ids[:, start:, None]).squeeze(-1)


def eos_token_ids(model: nn.Module | None, tokenizer: Any) -> set[int]:
    """End-of-sequence ids from the tokenizer and the model's generation config."""
    ids: set[int] = set()
    for value in (
        getattr(tokenizer, "eos_token_id", None),
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
    ):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids
