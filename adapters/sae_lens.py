"""SAELens integration: `sae.self_explain(feature)` on every SAELens SAE.

`import sae_selfexplain_plugin` calls `install()` (through the integrations entry point), which adds
`self_explain` to SAELens's base class `SAE`, so every architecture and every already-loaded instance
has it. SAELens's registry is never touched. `sae_selfexplain_plugin.uninstall()` removes the method.
The functional form is `self_explain(sae, features, model=...)`.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE
from safetensors import safe_open

from sae_selfexplain_plugin import Backend, Explanation, FeatureExplanations, SelfExplainConfig, SelfExplainer
from sae_selfexplain_plugin.direction_adapter import shipped_adapter
from sae_selfexplain_plugin.errors import InputError
from sae_selfexplain_plugin.results import short_model_name
from sae_selfexplain_plugin.templates import default_template_name

from .embedded import EMBEDDED_MODELS, load_backend
from .transformers import TransformersBackend

# Hook names in residual space: (pattern, offset to the block whose input it is, equal to that input?).
# Sublayer outputs and resid_mid write into the residual stream but are not the residual entering a block.
_RESIDUAL_HOOKS = [
    (re.compile(r"^blocks\.(\d+)\.hook_resid_pre$"), 0, True),
    (re.compile(r"^blocks\.(\d+)\.hook_in$"), 0, True),  # TransformerBridge alias of hook_resid_pre
    (re.compile(r"^blocks\.(\d+)\.hook_resid_mid$"), 0, False),
    (re.compile(r"^blocks\.(\d+)\.hook_(attn|mlp)_out$"), 0, False),
    (re.compile(r"^blocks\.(\d+)\.hook_resid_post$"), 1, True),
    (re.compile(r"^blocks\.(\d+)\.hook_out$"), 1, True),
    (re.compile(r"^model\.layers\.(\d+)\.output$"), 1, True),  # Hugging Face / nnsight names (hf_hook_name)
    (re.compile(r"^model\.layers\.(\d+)\.input$"), 0, True),
]
_CONFIG_FIELDS = {f.name for f in dataclasses.fields(SelfExplainConfig)}
_backends: dict[str, Backend] = {}  # embedded models loaded on demand, once per process


def sae_layer(sae: SAE[Any]) -> int:
    """The block whose input residual the SAE reads (e.g. 7 for blocks.6.hook_resid_post)."""
    found = _match_hook(sae)
    if found is not None:
        return found[0]
    meta = sae.cfg.metadata
    raise InputError(
        f"cannot map the SAE's hook {meta.hook_name!r} to a residual-stream layer: self-explanation injects "
        "decoder rows into the residual stream, so the SAE must read or write it (hook_resid_pre/mid/post, "
        "hook_attn_out, hook_mlp_out). Pass check_hook=False to inject its decoder rows anyway."
    )


def _match_hook(sae: SAE[Any]) -> tuple[int, bool] | None:
    meta = sae.cfg.metadata
    for name in (meta.hook_name, meta.hf_hook_name):
        for pattern, offset, is_block_input in _RESIDUAL_HOOKS:
            m = pattern.match(name or "")
            if m:
                return int(m.group(1)) + offset, is_block_input
    return None


def sae_input_layer(sae: SAE[Any]) -> int | None:
    """The block whose input residual is exactly what the SAE encodes; None if it reads something else."""
    found = _match_hook(sae)
    return found[0] if found is not None and found[1] else None


def sae_input_ids(sae: SAE[Any], tokenizer: Any, text: str) -> tuple[torch.Tensor, int]:
    """Token ids [1, T] of `text` as the SAE saw text in training: BOS first unless its metadata says
    prepend_bos=False (the first position is an attention sink with outsized norms otherwise); and how many
    leading positions (the BOS) to skip when reading activations."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if sae.cfg.metadata.prepend_bos is not False and bos is not None:
        return torch.tensor([[bos, *ids]]), 1
    return torch.tensor([ids]), 0


@torch.no_grad()
def activation_records(
    sae: SAE[Any], backend: Backend, features: list[int], texts: list[str], source: str
) -> list[dict[str, Any] | None]:
    """Per feature, its SAE activations over a text: {"source", "tokens", "values"} (None if not computable:
    an empty text, or an SAE that does not encode a block's input residual)."""
    layer = sae_input_layer(sae)
    tok = backend.tokenizer
    if layer is None or layer >= backend.n_layers:
        return [None] * len(features)
    out: list[dict[str, Any] | None] = []
    for feature, text in zip(features, texts):
        if not text.strip():
            out.append(None)
            continue
        ids, skip = sae_input_ids(sae, tok, text)
        resid = backend.residual(ids, torch.ones_like(ids), layer)[0, skip:]
        acts = sae.encode(resid.to(sae.W_dec.device, sae.W_dec.dtype))[:, feature].float().cpu()
        tokens = [tok.decode([int(t)]) for t in ids[0, skip:]]
        out.append({"source": source, "tokens": tokens, "values": [round(float(v), 6) for v in acts]})
    return out


def sae_identity(sae: SAE[Any]) -> dict[str, Any]:
    """What identifies the SAE in results and exports."""
    meta = sae.cfg.metadata
    keys = ("model_name", "hook_name", "hf_hook_name", "neuronpedia_id", "prepend_bos", "sae_lens_version")
    ident = {k: meta[k] for k in keys if meta[k] is not None}
    ident.update(architecture=sae.cfg.architecture(), d_in=sae.cfg.d_in, d_sae=sae.cfg.d_sae)
    return ident


def resolve_backend(sae: SAE[Any], model: Any = None, tokenizer: Any = None, remote: Any = False) -> Backend:
    """A backend for `model`; with no model, the embedded model named by the SAE's metadata.
    `remote` (nnsight models only): True for NDIF, a host URL, or "local" for nnsight's simulation."""
    if "nnsight" in sys.modules:
        from .nnsight import NNsightBackend, is_nnsight_model

        if is_nnsight_model(model):
            return NNsightBackend(model, remote=remote)
    if remote:
        raise InputError("remote= needs an nnsight model (TransformersModel); this model runs locally.")
    if model is None:
        wanted = sae.cfg.metadata.model_name
        for spec in EMBEDDED_MODELS.values():
            if wanted and short_model_name(wanted) in (spec.name, short_model_name(spec.hf_id)):
                if spec.name not in _backends:
                    _backends[spec.name] = load_backend(spec.name)
                return _backends[spec.name]
        raise InputError(
            f"the SAE was trained on {wanted!r}, which is not an embedded model ({sorted(EMBEDDED_MODELS)}); "
            "pass the model: sae.self_explain(feature, model=HookedTransformer.from_pretrained(...))."
        )
    if isinstance(model, Backend):
        return model
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
        "TransformerBridge, a transformers PreTrainedModel (with tokenizer=), or a sae_selfexplain Backend."
    )


def _feature_indices(features: int | Sequence[int] | torch.Tensor, d_sae: int) -> list[int]:
    if isinstance(features, torch.Tensor):
        if features.is_floating_point() or features.dtype == torch.bool or features.ndim > 1:
            raise InputError("a tensor of features must be a 0-d or 1-d tensor of integer indices.")
        indices = [int(i) for i in features.flatten().tolist()]
    elif isinstance(features, int) and not isinstance(features, bool):
        indices = [features]
    elif isinstance(features, Sequence):
        indices = list(features)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
            raise InputError(f"feature indices must be integers, got {indices[:5]}...")
    else:
        raise InputError(f"features must be an int, a sequence of ints or an integer tensor, got {type(features)}.")
    bad = [i for i in indices if not 0 <= i < d_sae]
    if bad:
        raise InputError(f"feature indices {bad[:10]} are out of range: this SAE has features 0..{d_sae - 1}.")
    if not indices:
        raise InputError("the feature list is empty: pass at least one feature index.")
    return indices


def load_sae_folder(path: str | Path, device: str = "cpu") -> SAE[Any]:
    """`SAE.load_from_disk`, with errors that say what is wrong with the folder: no cfg.json, an unreadable
    cfg, a corrupt or truncated weights file, or weights whose shapes disagree with the cfg."""
    path = Path(path)
    cfg_path = path / "cfg.json"
    if not cfg_path.is_file():
        raise InputError(f"{path} is not a SAELens SAE folder (no cfg.json); save one with sae.save_model().")
    try:
        cfg = json.loads(cfg_path.read_text())
        d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"{cfg_path} is not a valid SAE config ({e!r}); it needs d_in and d_sae.") from e
    weights = path / "sae_weights.safetensors"
    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in ("W_enc", "W_dec") if name in f.keys()}  # noqa: SIM118
        sae = (
            SAE.load_from_disk(path, device=device)
            if shapes == {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in)}
            else None
        )
    except Exception as e:  # safetensors and torch raise assorted types for damaged files
        raise InputError(
            f"cannot load the SAE weights in {weights} ({type(e).__name__}: {e}); the file is corrupt or truncated. "
            "Re-save or re-download it."
        ) from e
    if sae is None:
        raise InputError(
            f"the weights in {weights} have shapes {shapes}, but cfg.json says d_in={d_in}, d_sae={d_sae} "
            f"(W_enc ({d_in}, {d_sae}), W_dec ({d_sae}, {d_in})); the cfg and the weights belong to different SAEs."
        )
    return sae


def check_compatible(sae: SAE[Any], backend: Backend, *, check_model: bool = True, check_hook: bool = True) -> None:
    """Raise InputError unless the SAE's decoder rows are residual directions of this model."""
    d_out = int(sae.W_dec.shape[1])
    if check_hook:
        if d_out != sae.cfg.d_in or sae.cfg.metadata.hook_name_out:
            raise InputError(
                f"this SAE ({type(sae).__name__}) decodes into {sae.cfg.metadata.hook_name_out or 'another space'} "
                f"(d_out={d_out}, d_in={sae.cfg.d_in}), not the residual stream it reads; its decoder rows are not "
                "residual directions. Pass check_hook=False to inject them anyway (d_out must equal d_model)."
            )
        sae_layer(sae)
    if d_out != backend.d_model:
        raise InputError(
            f"the SAE's decoder width {d_out} != the model's d_model {backend.d_model}: "
            "this SAE belongs to another model."
        )
    wanted = sae.cfg.metadata.model_name
    if check_model and wanted and short_model_name(wanted) != short_model_name(backend.model_id):
        raise InputError(
            f"the SAE was trained on {wanted!r} but the model is {backend.model_id!r}; pass the matching model, "
            "or check_model=False to explain it through another model on purpose (e.g. the -it variant)."
        )


AUTO = "auto"


def with_adapter(config: SelfExplainConfig, adapter: Any, sae: SAE[Any], backend: Backend) -> SelfExplainConfig:
    """`config` with its adapter chosen: "auto" takes the adapter shipped for this model, the SAE's hook, the
    injection layer and the template, if there is one (else none); None or "none": none; else a
    DirectionAdapter or the path of its file."""
    if adapter is None or adapter == "none":
        return config.replace(adapter=None)
    if adapter != AUTO:
        return config.replace(adapter=adapter)
    template = config.template or default_template_name(backend.tokenizer)
    path = shipped_adapter(backend.model_id, backend.d_model, str(sae.cfg.metadata.hook_name), config.layer, template)
    return config.replace(adapter=None if path is None else str(path))


def self_explain(
    sae: SAE[Any],
    features: int | Sequence[int] | torch.Tensor,
    model: Any = None,
    *,
    tokenizer: Any = None,
    config: SelfExplainConfig | None = None,
    return_all: bool = False,
    check_model: bool = True,
    check_hook: bool = True,
    remote: Any = False,
    **options: Any,
) -> Explanation | list[Explanation] | FeatureExplanations | list[FeatureExplanations]:
    """Explain SAE features by injecting their decoder rows (W_dec) into the model's residual stream.

    Args:
        sae: any SAELens SAE whose decoder writes to the residual stream.
        features: an index, a list/range of indices, or an integer tensor of indices.
        model: HookedTransformer, HookedSAETransformer, TransformerBridge, a transformers model (with
            `tokenizer=`) or a Backend. None: the embedded model named by `sae.cfg.metadata.model_name`.
        config / options: a SelfExplainConfig, or its fields as keywords (layer=, template=, scales=, ...).
            `adapter` defaults to "auto": the adapter shipped for this model, SAE hook, layer and template, if
            any (docs/adapters.md); adapter=None turns it off.
        return_all: return FeatureExplanations (every scale tried) instead of the chosen Explanation.
        check_model: refuse a model whose name differs from the SAE's `model_name`.
        check_hook: refuse an SAE that does not read or write the residual stream (e.g. transcoders).
        remote: with an nnsight model, True runs on NDIF (key from NDIF_API_KEY or nnsight's config),
            a URL runs on that host, "local" runs nnsight's local simulation of the remote path.

    Returns an Explanation for an int feature, a list otherwise (FeatureExplanations with return_all).
    """
    unknown = sorted(set(options) - _CONFIG_FIELDS)
    if unknown:
        raise InputError(
            f"unknown options {unknown}; self_explain takes SelfExplainConfig fields {sorted(_CONFIG_FIELDS)}."
        )
    adapter = options.pop("adapter", AUTO if config is None else config.adapter)
    cfg = (config or SelfExplainConfig()).replace(**options) if options else (config or SelfExplainConfig())
    indices = _feature_indices(features, sae.cfg.d_sae)
    backend = resolve_backend(sae, model, tokenizer, remote)
    check_compatible(sae, backend, check_model=check_model, check_hook=check_hook)
    cfg = with_adapter(cfg, adapter, sae, backend)
    directions = sae.W_dec.detach()[indices].float().cpu()
    records = SelfExplainer(backend, cfg).explain(directions, indices)
    identity = sae_identity(sae)
    for r in records:
        r.sae = identity
    if return_all:
        return records[0] if isinstance(features, int) else records
    chosen = [r.chosen or r.candidates[0] for r in records]
    return chosen[0] if isinstance(features, int) else chosen


def _method(
    self: SAE[Any], features: int | Sequence[int] | torch.Tensor, model: Any = None, **options: Any
) -> Explanation | list[Explanation] | FeatureExplanations | list[FeatureExplanations]:
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
