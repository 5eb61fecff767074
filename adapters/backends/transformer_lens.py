"""TransformerLens backends: HookedTransformer / HookedSAETransformer, and TransformerBridge.

Injection goes through TL hook points (`blocks.{L}.hook_resid_pre`), attached with `model.hooks(...)`:
TL's `generate(fwd_hooks=...)` silently ignores hooks, so we run our own decode loop over TL's KV cache.
An SAE that a HookedSAETransformer attaches at that hook point replaces it with a wrapper; we then inject
at the wrapper's `hook_sae_output`, the value the later blocks read.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformer_lens.hook_points import HookPoint

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
from sae_selfexplain_plugin.ops import padded_positions

from .transformers import TransformersBackend, eos_token_ids


def residual_hook(model: HookedTransformer, layer: int) -> str:
    """The hook point whose value block `layer` reads: `blocks.{layer}.hook_resid_pre`, or, where a
    HookedSAETransformer has attached an SAE there, the output hook of the SAE's wrapper."""
    name = f"blocks.{layer}.hook_resid_pre"
    wrapped = f"{name}.hook_sae_output"
    if not isinstance(model.mod_dict.get(name), HookPoint) and wrapped in model.mod_dict:
        return wrapped
    return name


def attached_saes(model: HookedTransformer) -> tuple[tuple[str, int], ...]:
    """Which SAE wrappers a HookedSAETransformer has attached where (empty for other models): prefix caches
    computed with other SAEs attached are not reused."""
    return tuple((name, id(wrapper)) for name, wrapper in getattr(model, "_acts_to_saes", {}).items())


def _injection_hook(injection: Injection) -> Any:
    def hook(resid: torch.Tensor, hook: Any) -> torch.Tensor:
        return injection.apply(resid)

    return hook


class TransformerLensBackend:
    """Runs self-explanation on a HookedTransformer (SAEs attached to a HookedSAETransformer stay active)."""

    def __init__(self, model: HookedTransformer, model_id: str | None = None, *, reuse_prefix: bool = True) -> None:
        if model.tokenizer is None:
            raise InputError("this HookedTransformer has no tokenizer; load it with one (tokenizer=...).")
        self.model = model.eval()
        self._model_id = model_id or str(model.cfg.model_name)
        self.eos_token_ids = eos_token_ids(None, model.tokenizer)
        self.prefixes = PrefixCache(self._run_prefix, state=lambda: attached_saes(self.model))
        self.prefixes.enabled = reuse_prefix

    @property
    def tokenizer(self) -> Any:
        return self.model.tokenizer

    @property
    def n_layers(self) -> int:
        return int(self.model.cfg.n_layers)

    @property
    def d_model(self) -> int:
        return int(self.model.cfg.d_model)

    @property
    def context_length(self) -> int | None:
        return int(self.model.cfg.n_ctx)

    @property
    def device(self) -> torch.device:
        return torch.device(self.model.cfg.device or "cpu")

    @property
    def model_id(self) -> str:
        return self._model_id

    @torch.no_grad()
    def residual(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, layer: int) -> torch.Tensor:
        check_layer(layer, self.n_layers)
        captured: list[torch.Tensor] = []

        def hook(resid: torch.Tensor, hook: Any) -> None:
            captured.append(resid.detach())

        self.model.run_with_hooks(
            input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            fwd_hooks=[(residual_hook(self.model, layer), hook)],
            stop_at_layer=layer + 1,
        )
        return captured[0]

    @torch.no_grad()
    def _run_prefix(self, ids: torch.Tensor) -> TransformerLensKeyValueCache:
        """TL's KV cache of one row of prompt tokens (no injection)."""
        cache: TransformerLensKeyValueCache = TransformerLensKeyValueCache.init_cache(self.model.cfg, self.device, 1)
        ids = ids.to(self.device)
        self.model(ids, attention_mask=torch.ones_like(ids), past_kv_cache=cache)
        return cache

    @torch.no_grad()
    def prefill(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, injection: Injection
    ) -> tuple[torch.Tensor, Any]:
        check_layer(injection.layer, self.n_layers)
        batch = input_ids.shape[0]
        n, prefix = self.prefixes.lookup(input_ids, attention_mask, injection)  # before the injection hook
        if prefix is None:
            cache = TransformerLensKeyValueCache.init_cache(self.model.cfg, self.device, batch)
        else:  # every row views the one-row prefix; TL's append concatenates into new tensors
            cache = TransformerLensKeyValueCache(
                entries=[
                    replace(
                        e,
                        past_keys=e.past_keys.expand(batch, -1, -1, -1),
                        past_values=e.past_values.expand(batch, -1, -1, -1),
                    )
                    for e in prefix.entries
                ],
                previous_attention_mask=prefix.previous_attention_mask.expand(batch, -1),
            )
        injection = replace(injection, positions=injection.positions[:, n:])
        hook = residual_hook(self.model, injection.layer)
        with self.model.hooks(fwd_hooks=[(hook, _injection_hook(injection))]):
            logits = self.model(input_ids[:, n:], attention_mask=attention_mask[:, n:], past_kv_cache=cache)
        return logits[:, -1], cache

    @torch.no_grad()
    def step(self, token_ids: torch.Tensor, attention_mask: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
        # TL's cache keeps the mask so far and appends the mask of the new tokens only.
        logits = self.model(token_ids[:, None], attention_mask=attention_mask[:, -1:], past_kv_cache=cache)
        return logits[:, -1], cache

    def select_rows(self, cache: Any, rows: torch.Tensor) -> Any:
        for entry in cache.entries:
            entry.past_keys = entry.past_keys[rows.to(entry.past_keys.device)]
            entry.past_values = entry.past_values[rows.to(entry.past_values.device)]
        cache.previous_attention_mask = cache.previous_attention_mask[rows.to(cache.previous_attention_mask.device)]
        return cache

    def generate(self, request: GenerationRequest) -> GenerationResult:
        return decode(self, request, self.tokenizer, self.eos_token_ids)


@dataclass
class _Recompute:
    """Decode state without a KV cache: the whole sequence so far and the prompt's injection."""

    input_ids: torch.Tensor
    injection: Injection


class TransformerBridgeBackend(TransformersBackend):
    """A TransformerBridge wraps (and modifies in place) a Hugging Face model; we run that model and inject
    through the bridge's hook point, so SAEs attached to the bridge stay active.

    The bridge's attention does not fill Hugging Face's KV cache (TL 3.9), so each decode step recomputes
    the whole sequence (logits at the last position only), re-injecting at the prompt's placeholders.
    Slower than HookedTransformer or the plain model, same result."""

    def __init__(self, bridge: Any, model_id: str | None = None) -> None:
        self.bridge = bridge
        # no prefix cache: the bridge's attention does not fill Hugging Face's KV cache
        super().__init__(
            bridge.original_model, bridge.tokenizer, model_id or str(bridge.cfg.model_name), reuse_prefix=False
        )

    @contextmanager
    def injecting(self, injection: Injection) -> Iterator[None]:
        check_layer(injection.layer, self.n_layers)
        with self.bridge.hooks(fwd_hooks=[(f"blocks.{injection.layer}.hook_in", _injection_hook(injection))]):
            yield

    def _forward(self, state: _Recompute, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = padded_positions(state.injection.positions, state.input_ids.shape[1])
        injection = replace(state.injection, positions=positions)
        with self.injecting(injection):
            out = self.model(
                input_ids=state.input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids(attention_mask),
                use_cache=False,
                logits_to_keep=1,
            )
        logits: torch.Tensor = out.logits[:, -1]
        return logits

    @torch.no_grad()
    def prefill(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, injection: Injection
    ) -> tuple[torch.Tensor, Any]:
        check_layer(injection.layer, self.n_layers)
        state = _Recompute(input_ids, injection)
        return self._forward(state, attention_mask), state

    @torch.no_grad()
    def step(self, token_ids: torch.Tensor, attention_mask: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
        cache.input_ids = torch.cat([cache.input_ids, token_ids[:, None]], dim=1)
        return self._forward(cache, attention_mask), cache

    def select_rows(self, cache: Any, rows: torch.Tensor) -> Any:
        inj = cache.injection
        return _Recompute(cache.input_ids[rows], replace(inj, positions=inj.positions[rows], vectors=inj.vectors[rows]))
