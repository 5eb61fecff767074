"""From a user's model object to the Backend that runs self-explanation on it.

One dispatch for every entry point (`sae.self_explain`, the CLI, nnsight's `model.self_explain`); nnsight
is imported only when it is already in use, so a user without it never pays for it."""

from __future__ import annotations

import sys
from typing import Any

from sae_selfexplain_plugin.backend import Backend
from sae_selfexplain_plugin.errors import InputError

from .transformers import TransformersBackend


def backend_for(model: Any, tokenizer: Any = None, remote: Any = False, **remote_options: Any) -> Backend:
    """A Backend for a HookedTransformer / HookedSAETransformer, a TransformerBridge, a transformers
    PreTrainedModel (with its tokenizer), an nnsight model, or a Backend (returned as is).
    `remote` (nnsight models only): True for NDIF, a host URL, or "local" for nnsight's simulation;
    `remote_options` (nnsight models only): repo_id, timeout_s, poll_s (see NNsightBackend)."""
    options = {k: v for k, v in remote_options.items() if v is not None}
    if "nnsight" in sys.modules:
        from .nnsight import NNsightBackend, is_nnsight_model

        if is_nnsight_model(model):
            return NNsightBackend(model, remote=remote, **options)
    if remote or options:
        named = ["remote"] * bool(remote) + sorted(options)
        raise InputError(f"{', '.join(named)}: only for nnsight models (TransformersModel); this model runs locally.")
    if isinstance(model, Backend):
        return model
    if "transformer_lens" in sys.modules:
        from transformer_lens import HookedTransformer
        from transformer_lens.model_bridge import TransformerBridge

        from .transformer_lens import TransformerBridgeBackend, TransformerLensBackend

        if isinstance(model, HookedTransformer):  # HookedSAETransformer too: attached SAEs stay active
            return TransformerLensBackend(model)
        if isinstance(model, TransformerBridge):
            return TransformerBridgeBackend(model)
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        if tokenizer is None:
            raise InputError(
                "a transformers model needs its tokenizer: pass tokenizer=AutoTokenizer.from_pretrained(...)."
            )
        return TransformersBackend(model, tokenizer)
    raise InputError(
        f"unsupported model type {type(model).__name__}: pass a HookedTransformer, HookedSAETransformer, "
        "TransformerBridge, a transformers PreTrainedModel (with tokenizer=), an nnsight TransformersModel, "
        "or a sae_selfexplain Backend."
    )
