"""Which model runs self-explanation: the one resolver from what a user names to a `Backend`.

- `backend_for(model)`: a model object (HookedTransformer, TransformerBridge, transformers, nnsight, a
  Backend), for every entry point (`sae.self_explain`, nnsight's `model.self_explain`);
- `load_model(spec, model_name=...)`: a name or folder (the CLI's `--model`), or none: the embedded model an
  SAE names, loaded once per process.

nnsight is imported only when it is already in use, so a user without it never pays for it. The backends
themselves live beside this file (transformers, transformer_lens, nnsight, embedded)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from sae_selfexplain_plugin.backend import Backend
from sae_selfexplain_plugin.errors import InputError

from .embedded import EMBEDDED_MODELS, embedded_model_named, load_backend
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

        from .transformer_lens import (
            TransformerBridgeBackend,
            TransformerLensBackend,
        )

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


def check_device(device: str | None) -> None:
    """Refuse a device this machine does not have, before anything is loaded onto it."""
    if not device or device == "cpu":
        return
    try:
        torch_device = torch.device(device)
    except RuntimeError:
        raise InputError(f"--device {device!r} is not a device name; use cpu, cuda or cuda:N.") from None
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: CUDA is not available on this machine; use --device cpu.")
    if torch_device.type == "cuda" and (torch_device.index or 0) >= torch.cuda.device_count():
        raise InputError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA devices.")


_loaded: dict[tuple[str, str | None], Backend] = {}  # embedded models loaded for an SAE, once per process


def load_model(spec: str | None, *, model_name: str | None = None, device: str | None = None) -> Backend:
    """An embedded model by name, a local transformers checkpoint folder, or (spec None) the embedded model
    that `model_name` (an SAE's `model_name`) names, loaded once per process."""
    check_device(device)
    if spec is None:
        if not model_name:
            raise InputError("name a model (an embedded model or a checkpoint folder), or pass the SAE it belongs to.")
        embedded = embedded_model_named(model_name)
        if embedded is None:
            raise InputError(
                f"the SAE was trained on {model_name!r}, which is not an embedded model ({sorted(EMBEDDED_MODELS)}); "
                "pass the model: --model FOLDER, or sae.self_explain(feature, model=HookedTransformer(...))."
            )
        if (embedded.name, device) not in _loaded:
            _loaded[embedded.name, device] = load_backend(embedded.name, device=device)
        return _loaded[embedded.name, device]
    if spec in EMBEDDED_MODELS:
        return load_backend(spec, device=device)
    if Path(spec).is_dir():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not (Path(spec) / "config.json").is_file():
            raise InputError(
                f"--model {spec} is a folder but not a transformers checkpoint (no config.json); pass a folder "
                "saved with model.save_pretrained() and tokenizer.save_pretrained(), or an embedded model: "
                f"{sorted(EMBEDDED_MODELS)}."
            )
        _refuse_pickle_weights(Path(spec))
        try:
            # safetensors only: pickle weights (.bin, .pt) can run code when loaded
            model: Any = AutoModelForCausalLM.from_pretrained(spec, use_safetensors=True)
            tokenizer = AutoTokenizer.from_pretrained(spec)
        except (OSError, ValueError, KeyError) as e:
            raise InputError(f"cannot load the checkpoint in {spec} ({type(e).__name__}: {str(e)[:200]}).") from None
        return TransformersBackend(model.to(device or "cpu"), tokenizer)
    raise InputError(
        f"--model {spec!r} is neither an embedded model ({sorted(EMBEDDED_MODELS)}) nor a local checkpoint folder."
    )


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _refuse_pickle_weights(folder: Path) -> None:
    """Raise InputError for a checkpoint folder whose weights are pickle files only (unpickling a planted
    file runs its code); nothing in the folder is opened."""
    if any(p.suffix == ".safetensors" for p in folder.iterdir()):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    found = f"; its weights are pickle files {pickles[:5]}, refused because loading one can run code" if pickles else ""
    raise InputError(
        f"--model {folder}: no safetensors weights{found}. Re-save the model as safetensors where you trust it: "
        "AutoModelForCausalLM.from_pretrained(FOLDER).save_pretrained(NEW_FOLDER) (safe_serialization, the default)."
    )
