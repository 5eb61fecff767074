"""SAELens integration: `sae.self_explain(feature)` on every SAELens SAE.

`import sae_selfexplain_plugin` calls `install()` (through the integrations entry point), which adds
`self_explain` to SAELens's base class `SAE`, so every architecture and every already-loaded instance
has it. SAELens's registry is never touched. `sae_selfexplain_plugin.uninstall()` removes the method.
The functional form is `self_explain(sae, features, model=...)`.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, overload

import torch
from sae_lens import SAE
from safetensors import safe_open

from sae_selfexplain_plugin import Backend, FeatureExplanations, SelfExplainConfig, SelfExplainer
from sae_selfexplain_plugin.direction_adapter import shipped_adapter
from sae_selfexplain_plugin.errors import InputError
from sae_selfexplain_plugin.files import parse_json
from sae_selfexplain_plugin.identity import decoder_fingerprint
from sae_selfexplain_plugin.templates import default_template_name
from sae_selfexplain_plugin.vocabulary import (
    centred_vocabulary,
    direction_lens,
    nearest_tokens,
    probe_batches,
    probe_vocabulary,
    vocabulary_residuals,
)

from .backends import backend_for
from .embedded import EMBEDDED_MODELS, load_backend
from .transformer_lens import canonical_model_name

# Hook names in the residual stream: (pattern, offset to the block whose input it is, equal to that input?).
# Sublayer outputs and resid_mid write into the residual stream but are not the residual entering a block.
# TransformerBridge names its hooks after the modules (hook_in, ln2.hook_in, mlp.hook_out, ...).
_RESIDUAL_HOOKS = [
    (re.compile(r"^blocks\.(\d+)\.hook_resid_pre$"), 0, True),
    (re.compile(r"^blocks\.(\d+)\.hook_in$"), 0, True),  # bridge: hook_resid_pre
    (re.compile(r"^blocks\.(\d+)\.hook_resid_mid$"), 0, False),
    (re.compile(r"^blocks\.(\d+)\.ln2\.hook_in$"), 0, False),  # bridge: hook_resid_mid
    (re.compile(r"^blocks\.(\d+)\.hook_(attn|mlp)_out$"), 0, False),
    (re.compile(r"^blocks\.(\d+)\.(attn|mlp)\.hook_out$"), 0, False),  # bridge: hook_attn_out, hook_mlp_out
    (re.compile(r"^blocks\.(\d+)\.hook_resid_post$"), 1, True),
    (re.compile(r"^blocks\.(\d+)\.hook_out$"), 1, True),  # bridge: hook_resid_post
    (re.compile(r"^model\.layers\.(\d+)\.output$"), 1, True),  # Hugging Face / nnsight names (hf_hook_name)
    (re.compile(r"^model\.layers\.(\d+)\.input$"), 0, True),
]
_RESIDUAL_HOOK_NAMES = (
    "hook_resid_pre/mid/post, hook_attn_out, hook_mlp_out, or TransformerBridge's hook_in, ln2.hook_in, "
    "attn.hook_out, mlp.hook_out, hook_out"
)
_CONFIG_FIELDS = {f.name for f in dataclasses.fields(SelfExplainConfig)}
_backends: dict[str, Backend] = {}  # embedded models loaded on demand, once per process
_warned_hooks: set[str] = set()  # non-residual hooks already warned about (check_hook=False), once each


def _residual_position(*names: str | None) -> tuple[int, bool] | None:
    """(block, is that block's input?) of the first name that is a residual-stream hook."""
    for name in names:
        for pattern, offset, is_block_input in _RESIDUAL_HOOKS:
            m = pattern.match(name or "")
            if m:
                return int(m.group(1)) + offset, is_block_input
    return None


def decoder_hook(sae: SAE[Any]) -> str:
    """The hook the SAE's decoder writes: `hook_name_out` for transcoders, else the hook it reads."""
    meta = sae.cfg.metadata
    return str(meta.hook_name_out or meta.hook_name)


def _decoder_position(sae: SAE[Any]) -> tuple[int, bool] | None:
    meta = sae.cfg.metadata
    if meta.hook_name_out:  # a transcoder: where it writes, not what it reads
        return _residual_position(meta.hook_name_out)
    return _residual_position(meta.hook_name, meta.hf_hook_name)


def sae_layer(sae: SAE[Any]) -> int:
    """The residual layer the SAE's decoder rows live in (e.g. 7 for blocks.6.hook_resid_post; 1 for a
    transcoder writing blocks.1.hook_mlp_out)."""
    found = _decoder_position(sae)
    if found is not None:
        return found[0]
    raise InputError(
        f"the SAE's decoder writes {decoder_hook(sae)!r}, which is not in the residual stream: self-explanation "
        f"injects decoder rows into the residual stream ({_RESIDUAL_HOOK_NAMES}). "
        "Pass check_hook=False to inject its decoder rows anyway."
    )


def sae_input_layer(sae: SAE[Any]) -> int | None:
    """The block whose input residual is exactly what the SAE encodes; None if it reads something else."""
    meta = sae.cfg.metadata
    found = _residual_position(meta.hook_name, meta.hf_hook_name)
    return found[0] if found is not None and found[1] else None


def readable_input_layer(sae: SAE[Any], backend: Backend, use: str) -> int:
    """The block whose input residual the SAE encodes, when `backend` can read it there; otherwise an
    InputError saying that `use` (e.g. "the vocabulary probe") needs such an SAE."""
    layer = sae_input_layer(sae)
    if layer is None or layer >= backend.n_layers:
        raise InputError(
            f"{use} reads the residual the SAE encodes as it enters a block; hook "
            f"{sae.cfg.metadata.hook_name!r} is not one (use an SAE on hook_resid_pre, or on hook_resid_post "
            "of any block but the last)."
        )
    return layer


def sae_prepends_bos(sae: SAE[Any]) -> bool:
    """Whether the SAE saw text with BOS first: yes unless its metadata says prepend_bos=False."""
    return sae.cfg.metadata.prepend_bos is not False


def encode_residual(sae: SAE[Any], resid: torch.Tensor) -> torch.Tensor:
    """The SAE's activations of residuals [..., d_in] read on any device and dtype (moved to the SAE's)."""
    acts: torch.Tensor = sae.encode(resid.to(sae.W_dec.device, sae.W_dec.dtype))
    return acts


def sae_input_ids(sae: SAE[Any], tokenizer: Any, text: str) -> tuple[torch.Tensor, int]:
    """Token ids [1, T] of `text` as the SAE saw text in training: BOS first unless its metadata says
    prepend_bos=False (the first position is an attention sink with outsized norms otherwise); and how many
    leading positions (the BOS) to skip when reading activations."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if sae_prepends_bos(sae) and bos is not None:
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
        acts = encode_residual(sae, resid)[:, feature].float().cpu()
        tokens = [tok.decode([int(t)]) for t in ids[0, skip:]]
        out.append({"source": source, "tokens": tokens, "values": [round(float(v), 6) for v in acts]})
    return out


def vocabulary_labels(
    sae: SAE[Any],
    backend: Backend,
    features: Sequence[int],
    *,
    k: int = 3,
    progress: Callable[[int], None] | None = None,
) -> list[list[tuple[str, float]]]:
    """Per feature, the k word tokens of the model's vocabulary that make it fire most, read through
    this SAE's encoder (vocabulary.probe_vocabulary: no corpus, one pass over the vocabulary for all
    `features`). An empty list: no single word evokes the feature."""
    layer = readable_input_layer(sae, backend, "the vocabulary probe")
    idx = torch.tensor(_feature_indices(list(features), sae.cfg.d_sae), device=sae.W_dec.device)
    return probe_vocabulary(
        backend, layer, lambda resid: encode_residual(sae, resid)[:, idx], len(idx), k=k,
        prepend_bos=sae_prepends_bos(sae), progress=progress,
    )  # fmt: skip


def lens_labels(
    sae: SAE[Any],
    backend: Backend,
    features: Sequence[int],
    *,
    k: int = 3,
    progress: Callable[[int], None] | None = None,
) -> list[list[tuple[str, float]]]:
    """Per feature, the k word tokens whose centred residual at the SAE's hook points most along its decoder
    row (vocabulary.direction_lens: the direction and the model only, no encoder, no examples)."""
    layer = readable_input_layer(sae, backend, "the direction lens")
    rows = decoder_rows(sae, _feature_indices(list(features), sae.cfg.d_sae))
    return direction_lens(backend, layer, rows, k=k, prepend_bos=sae_prepends_bos(sae), progress=progress)


def probe_and_lens_labels(
    sae: SAE[Any],
    backend: Backend,
    features: Sequence[int],
    *,
    k: int = 3,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[list[tuple[str, float]]], list[list[tuple[str, float]]]]:
    """`vocabulary_labels` and `lens_labels` from one read of the vocabulary (held in memory for both)."""
    layer = readable_input_layer(sae, backend, "the vocabulary probe with the direction lens")
    indices = _feature_indices(list(features), sae.cfg.d_sae)
    idx = torch.tensor(indices, device=sae.W_dec.device)
    read = list(vocabulary_residuals(backend, layer, prepend_bos=sae_prepends_bos(sae), progress=progress))
    probed = probe_batches(backend.tokenizer, read, lambda resid: encode_residual(sae, resid)[:, idx], len(idx), k)
    ids, table = centred_vocabulary(read)
    return probed, nearest_tokens(backend.tokenizer, ids, table, decoder_rows(sae, indices), k)


def decoder_rows(sae: SAE[Any], features: list[int]) -> torch.Tensor:
    """The SAE's decoder rows (W_dec) of `features`, as float32 on the CPU: the directions to explain."""
    if sae.W_dec.is_meta:
        raise InputError("the SAE's weights are on the meta device (not loaded); load them, e.g. SAE.load_from_disk.")
    if sae.W_dec.is_complex():
        raise InputError(f"the SAE's decoder is complex ({sae.W_dec.dtype}); its rows are not residual directions.")
    rows: torch.Tensor = sae.W_dec.detach()[features].float().cpu()
    return rows


def sae_identity(sae: SAE[Any]) -> dict[str, Any]:
    """What identifies the SAE in results and exports."""
    meta = sae.cfg.metadata
    keys = ("model_name", "hook_name", "hf_hook_name", "neuronpedia_id", "prepend_bos", "sae_lens_version")
    ident = {k: meta[k] for k in keys if meta[k] is not None}
    ident.update(architecture=sae.cfg.architecture(), d_in=sae.cfg.d_in, d_sae=sae.cfg.d_sae)
    ident["fingerprint"] = decoder_fingerprint(sae.W_dec)
    return ident


def resolve_backend(
    sae: SAE[Any], model: Any = None, tokenizer: Any = None, remote: Any = False, **remote_options: Any
) -> Backend:
    """A backend for `model` (see `backends.backend_for`); with no model, the embedded model named by the
    SAE's metadata, loaded once per process."""
    if model is not None:
        return backend_for(model, tokenizer, remote, **remote_options)
    if remote or any(v is not None for v in remote_options.values()):
        raise InputError("remote runs need an nnsight model: pass model=TransformersModel(...).")
    wanted = sae.cfg.metadata.model_name
    for spec in EMBEDDED_MODELS.values():
        if wanted and canonical_model_name(wanted) in {spec.name, canonical_model_name(spec.hf_id)}:
            if spec.name not in _backends:
                _backends[spec.name] = load_backend(spec.name)
            return _backends[spec.name]
    raise InputError(
        f"the SAE was trained on {wanted!r}, which is not an embedded model ({sorted(EMBEDDED_MODELS)}); "
        "pass the model: sae.self_explain(feature, model=HookedTransformer.from_pretrained(...))."
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


def sae_lens_version() -> str:
    from importlib.metadata import version

    return version("sae-lens")


def load_sae_folder(path: str | Path, device: str = "cpu") -> SAE[Any]:
    """`SAE.load_from_disk`, with errors that say what is wrong with the folder: no cfg.json, an unreadable
    cfg or a field of the wrong type, no weights file, a corrupt or truncated one, or weights whose shapes
    disagree with the cfg (checked before anything is allocated)."""
    path = Path(path)
    cfg_path = path / "cfg.json"
    if not cfg_path.is_file():
        raise InputError(f"{path} is not a SAELens SAE folder (no cfg.json); save one with sae.save_model().")
    cfg = _read_sae_cfg(cfg_path)
    d_in, d_sae = _size_field(cfg, "d_in", cfg_path), _size_field(cfg, "d_sae", cfg_path)
    from sae_lens.registry import SAE_CLASS_REGISTRY

    architecture = cfg.get("architecture", "standard")
    if architecture not in SAE_CLASS_REGISTRY:
        raise InputError(
            f"{cfg_path}: architecture {architecture!r} is not one this SAELens ({sae_lens_version()}) knows "
            f"({', '.join(sorted(SAE_CLASS_REGISTRY))}); upgrade sae-lens, or check the cfg."
        )
    weights = path / SAE_WEIGHTS_FILE
    if not weights.is_file():
        others = sorted(p.name for p in path.iterdir() if p.suffix in (".safetensors", ".pt", ".pth", ".bin", ".npz"))
        raise InputError(
            f"{path} has cfg.json but no weights file {SAE_WEIGHTS_FILE}, where SAELens expects the SAE's weights"
            + (f" (the folder holds {others[:5]} instead)" if others else "")
            + "; copy the SAE's weights there, or re-save the SAE with sae.save_model()."
        )
    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in ("W_enc", "W_dec") if name in f.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises assorted types for damaged files
        raise InputError(
            f"cannot read the SAE weights in {weights} ({type(e).__name__}: {e}); the file is corrupt or truncated. "
            "Re-save or re-download it."
        ) from e
    if shapes != {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in)}:
        raise InputError(
            f"the weights in {weights} have shapes {shapes}, but cfg.json says d_in={d_in}, d_sae={d_sae} "
            f"(W_enc ({d_in}, {d_sae}), W_dec ({d_sae}, {d_in})); the cfg and the weights belong to different SAEs."
        )
    try:
        return SAE.load_from_disk(path, device=device)
    except Exception as e:  # the weights file read above; what is left is the cfg's other fields
        raise InputError(
            f"SAELens ({sae_lens_version()}) cannot build an SAE from {cfg_path} ({type(e).__name__}: "
            f"{str(e)[:300]}); check the cfg's fields against one written by sae.save_model()."
        ) from e


SAE_WEIGHTS_FILE = "sae_weights.safetensors"  # the name SAE.save_model writes and load_from_disk reads


def _read_sae_cfg(cfg_path: Path) -> dict[str, Any]:
    try:
        text = cfg_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{cfg_path}: cannot read it as UTF-8 text ({e}); it is not a valid SAE config.") from e
    cfg = parse_json(text, f"{cfg_path} (not a valid SAE config)")
    if not isinstance(cfg, dict):
        raise InputError(f"{cfg_path} is not a valid SAE config: a JSON object is expected, got {type(cfg).__name__}.")
    return cfg


def _size_field(cfg: dict[str, Any], name: str, cfg_path: Path) -> int:
    """A width from the cfg: a whole number >= 1 (576.9, "576" or true are refused, not truncated)."""
    if name not in cfg:
        raise InputError(f"{cfg_path} is not a valid SAE config: it lacks the field {name!r} (an integer width).")
    value = cfg[name]
    if type(value) is not int or value < 1:
        raise InputError(
            f"{cfg_path}: field {name!r} must be a whole number >= 1 (a width), got {repr(value)[:80]} "
            f"({type(value).__name__}); correct it to the SAE's {name}."
        )
    return value


def check_compatible(sae: SAE[Any], backend: Backend, *, check_model: bool = True, check_hook: bool = True) -> None:
    """Raise InputError unless the SAE's decoder rows are residual directions of this model.

    check_hook=False accepts a decoder that writes elsewhere (with a warning, once per hook name)."""
    d_out = int(sae.W_dec.shape[1])
    if _decoder_position(sae) is None:
        if check_hook:
            sae_layer(sae)  # raises, naming the hook
        elif decoder_hook(sae) not in _warned_hooks:
            _warned_hooks.add(decoder_hook(sae))
            warnings.warn(
                f"the SAE's decoder writes {decoder_hook(sae)!r}, not the residual stream; with check_hook=False "
                "self-explanation treats its decoder rows as residual directions, which they are not.",
                UserWarning,
                stacklevel=3,
            )
    if d_out != backend.d_model:
        raise InputError(
            f"the SAE's decoder width {d_out} != the model's d_model {backend.d_model}: "
            "this SAE belongs to another model."
        )
    position = _decoder_position(sae)
    if position is not None and position[0] > backend.n_layers:
        raise InputError(
            f"the SAE's hook {decoder_hook(sae)!r} is beyond this model's {backend.n_layers} blocks: the SAE belongs "
            "to another (deeper) model."
        )
    wanted = sae.cfg.metadata.model_name
    if check_model and wanted and canonical_model_name(wanted) != canonical_model_name(backend.model_id):
        raise InputError(
            f"the SAE was trained on {wanted!r} but the model is {backend.model_id!r} (compared through "
            "TransformerLens's model aliases); pass the matching model, or check_model=False to explain it "
            "through another model on purpose (e.g. the -it variant)."
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
