"""`sae.self_explain(feature)`: the method `install()` adds to SAELens's base class `SAE`, and its functional form
`self_explain(sae, features, model=...)`."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from typing import Any, overload

import torch
from sae_lens import SAE

from sae_selfexplain_plugin import Backend, FeatureExplanations, SelfExplainConfig, SelfExplainer
from sae_selfexplain_plugin.direction_adapter.choice import AUTO, choose_adapter
from sae_selfexplain_plugin.errors import InputError

from ..backends import backend_for, load_model
from .checks import check_compatible
from .loading import _feature_indices, decoder_rows, sae_identity

_CONFIG_FIELDS = {f.name for f in dataclasses.fields(SelfExplainConfig)}


def resolve_backend(
    sae: SAE[Any], model: Any = None, tokenizer: Any = None, remote: Any = False, **remote_options: Any
) -> Backend:
    """The backend for `model` (`backends.backend_for`); with no model, the embedded model named by the
    SAE's metadata (`backends.load_model`)."""
    if model is not None:
        return backend_for(model, tokenizer, remote, **remote_options)
    if remote or any(v is not None for v in remote_options.values()):
        raise InputError("remote runs need an nnsight model: pass model=TransformersModel(...).")
    return load_model(None, model_name=sae.cfg.metadata.model_name)


def with_adapter(config: SelfExplainConfig, adapter: Any, sae: SAE[Any], backend: Backend) -> SelfExplainConfig:
    """`config` with its adapter chosen for this SAE's decoder rows (`direction_adapter.choice`)."""
    return choose_adapter(config, adapter, str(sae.cfg.metadata.hook_name), backend)


@overload
def self_explain(
    sae: SAE[Any], features: int, model: Any = None, *, config: SelfExplainConfig | None = None, **options: Any
) -> FeatureExplanations: ...


@overload
def self_explain(
    sae: SAE[Any],
    features: Sequence[int] | torch.Tensor,
    model: Any = None,
    *,
    config: SelfExplainConfig | None = None,
    **options: Any,
) -> list[FeatureExplanations]: ...


def self_explain(
    sae: SAE[Any],
    features: int | Sequence[int] | torch.Tensor,
    model: Any = None,
    *,
    config: SelfExplainConfig | None = None,
    injection_layer: int | None = None,
    tokenizer: Any = None,
    remote: Any = False,
    repo_id: str | None = None,
    timeout_s: float | None = None,
    poll_s: float | None = None,
    check_model: bool = True,
    check_hook: bool = True,
    return_all: bool | None = None,
    **config_fields: Any,
) -> FeatureExplanations | list[FeatureExplanations]:
    """Explain SAE features by injecting their decoder rows (W_dec) into the model's residual stream.

    Args:
        sae: any SAELens SAE or transcoder whose decoder writes to the residual stream.
        features: an index, a list/range of indices, or an integer tensor of indices.
        model: HookedTransformer, HookedSAETransformer, TransformerBridge, a transformers model (with
            `tokenizer=`), an nnsight TransformersModel, or a Backend. None: the embedded model named by
            `sae.cfg.metadata.model_name`.
        config: a SelfExplainConfig; `config_fields` (its fields as keywords: template=, scales=, ...)
            override it. `adapter` defaults to "auto": the adapter shipped for this model, SAE hook,
            injection layer and template, if any (docs/adapters.md); adapter=None turns it off.
        injection_layer: the block whose input residual receives the decoder row (default 2), whatever
            layer the SAE sits at. `layer=` is the same option under its older name.
        tokenizer: the tokenizer of a transformers model.
        remote: with an nnsight model, True runs on NDIF (key from NDIF_API_KEY or nnsight's config),
            a URL runs on that host, "local" runs nnsight's local simulation of the remote path.
        repo_id, timeout_s, poll_s: for remote runs, the hub id NDIF serves the model under (needed for a
            model built in memory), how long to wait for each job (default 1800 s) and how often to poll.
        check_model: refuse a model whose name differs from the SAE's `model_name` (aliases match).
        check_hook: refuse an SAE whose decoder does not write the residual stream; False warns instead.
        return_all: deprecated, has no effect (the result always holds every candidate).

    Returns a FeatureExplanations for an int feature (`.text` is the chosen explanation, `.candidates`
    every scale tried, `.chosen` the chosen candidate), a list of them otherwise.
    """
    if return_all is not None:
        warnings.warn(
            "return_all is deprecated and has no effect: self_explain always returns FeatureExplanations "
            "(.text, .chosen, .candidates).",
            DeprecationWarning,
            stacklevel=2,
        )
    unknown = sorted(set(config_fields) - _CONFIG_FIELDS)
    if unknown:
        raise InputError(
            f"unknown options {unknown}; self_explain takes SelfExplainConfig fields {sorted(_CONFIG_FIELDS)}."
        )
    if injection_layer is not None:
        old = config_fields.get("layer", injection_layer)
        if old != injection_layer:
            raise InputError(
                f"injection_layer={injection_layer} and layer={old} disagree; pass one "
                "(layer is the older name of injection_layer)."
            )
        config_fields["layer"] = injection_layer
    adapter = config_fields.pop("adapter", AUTO if config is None else config.adapter)
    cfg = (config or SelfExplainConfig()).replace(**config_fields)
    indices = _feature_indices(features, sae.cfg.d_sae)
    backend = resolve_backend(sae, model, tokenizer, remote, repo_id=repo_id, timeout_s=timeout_s, poll_s=poll_s)
    check_compatible(sae, backend, check_model=check_model, check_hook=check_hook)
    cfg = with_adapter(cfg, adapter, sae, backend)
    directions = decoder_rows(sae, indices)
    records = SelfExplainer(backend, cfg).explain(directions, indices)
    identity = sae_identity(sae)
    for r in records:
        r.sae = identity
    return records[0] if isinstance(features, int) else records


def _method(
    self: SAE[Any], features: int | Sequence[int] | torch.Tensor, model: Any = None, **options: Any
) -> FeatureExplanations | list[FeatureExplanations]:
    return self_explain(self, features, model, **options)


_method.__doc__ = self_explain.__doc__


_method.__name__ = "self_explain"


def install() -> None:
    """Give every SAELens SAE a `self_explain` method (idempotent)."""
    existing = SAE.__dict__.get("self_explain")
    if existing is not None and existing is not _method:
        raise InputError("sae_lens.SAE already has a self_explain attribute that is not ours; not overwriting it.")
    SAE.self_explain = _method


def uninstall() -> None:
    """Remove the method `install` added (anything else named self_explain is left alone)."""
    if SAE.__dict__.get("self_explain") is _method:
        del SAE.self_explain
