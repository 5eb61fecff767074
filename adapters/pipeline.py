"""The `explain` pipeline for whole SAEs: resumable, committed per batch to the results store."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE

from sae_selfexplain_plugin import Backend, SelfExplainConfig, SelfExplainer
from sae_selfexplain_plugin.engine import bad_directions
from sae_selfexplain_plugin.errors import InputError
from sae_selfexplain_plugin.identity import decoder_fingerprint
from sae_selfexplain_plugin.results import FeatureExplanations
from sae_selfexplain_plugin.store import ResultsStore

from .embedded import EMBEDDED_MODELS, load_backend
from .sae_lens import (
    activation_records,
    check_compatible,
    decoder_rows,
    load_sae_folder,
    resolve_backend,
    sae_identity,
    vocabulary_labels,
)
from .transformers import TransformersBackend


def parse_features(spec: str, d_sae: int) -> list[int]:
    """`0-1023`, `1,5,9`, `0-9,20`, or the path of a file of indices (whitespace or comma separated)."""
    path = Path(spec)
    try:
        text = path.read_text(encoding="utf-8") if path.is_file() else spec
    except UnicodeDecodeError:
        raise InputError(f"--features file {spec} is not text: write indices and ranges such as 0-1023,2048.") from None
    ranges: list[tuple[int, int]] = []
    for part in (p for p in re.split(r"[\s,]+", text.strip()) if p):
        m = re.fullmatch(r"([0-9]+)(?:-([0-9]+))?", part)  # ASCII digits only: no full-width or other scripts
        if not m:
            raise InputError(f"cannot read feature {part!r}: use indices and ranges such as 0-1023,2048 or a file.")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise InputError(f"feature range {part!r} is empty: write it low-high.")
        if hi >= d_sae:  # checked per range, before any list is built
            raise InputError(f"features up to {hi} are outside the SAE, which has features 0..{d_sae - 1}.")
        ranges.append((lo, hi))
    if not ranges:
        raise InputError(f"no features in {spec!r}.")
    return list(dict.fromkeys(f for lo, hi in ranges for f in range(lo, hi + 1)))  # de-duplicated, order kept


def load_sae(spec: str, device: str = "cpu") -> tuple[SAE[Any], str]:
    """A local SAELens folder, or `RELEASE:SAE_ID` from SAELens's registry; returns (sae, store key)."""
    check_device(device)
    path = Path(spec)
    if path.exists():
        sae = load_sae_folder(path, device=device)
    elif ":" in spec:
        release, sae_id = spec.split(":", 1)
        sae = _load_from_registry(release, sae_id, device)
    else:
        raise InputError(f"--sae {spec!r} is neither an existing folder nor RELEASE:SAE_ID.")
    return sae, store_key(sae, str(path.resolve() if path.exists() else spec))


def store_key(sae: SAE[Any], where: str) -> str:
    """The SAE's key in a results store: its name (neuronpedia_id, else `where` it was loaded from) and the
    fingerprint of its weights, so that another SAE saved under the same name never resumes this one's work."""
    return f"{sae.cfg.metadata.neuronpedia_id or where}@{decoder_fingerprint(sae.W_dec)}"


def _load_from_registry(release: str, sae_id: str, device: str) -> SAE[Any]:
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    known = get_pretrained_saes_directory()
    if release not in known:
        raise InputError(
            f"--sae {release}:{sae_id}: {release!r} is not a release in SAELens's registry, and no folder of that "
            "name exists; pass a SAELens SAE folder or RELEASE:SAE_ID (see SAELens's pretrained_saes.yaml)."
        )
    if sae_id not in known[release].saes_map:
        some = ", ".join(list(known[release].saes_map)[:3])
        raise InputError(f"--sae {release}:{sae_id}: release {release!r} has no SAE {sae_id!r} (it has {some}, ...).")
    try:
        return SAE.from_pretrained(release, sae_id, device=device)
    except OSError as e:  # huggingface_hub's offline and connection errors are OSErrors
        raise InputError(
            f"cannot download {release}:{sae_id} from the Hugging Face hub ({type(e).__name__}); without network, "
            "save the SAE once with sae.save_model(FOLDER) where you have it and pass --sae FOLDER."
        ) from None


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


def load_model(spec: str | None, sae: SAE[Any] | None = None, device: str | None = None) -> Backend:
    """An embedded model by name, a local transformers checkpoint folder, or (None) the SAE's model
    (an embedded one, on a GPU if there is one)."""
    check_device(device)
    if spec is None:
        if sae is None:
            raise InputError("name a model (an embedded model or a checkpoint folder), or pass the SAE it belongs to.")
        return resolve_backend(sae)
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


@dataclass
class RunSummary:
    requested: int
    skipped: int
    explained: int
    seconds: float
    settings_hash: str  # keys this run's records in the store
    failed: dict[int, str] = field(default_factory=dict)  # features skipped, and why (also in the store)
    elsewhere: int = 0  # features another run resuming the same store explained instead


def explain_sae(
    sae: SAE[Any],
    sae_key: str,
    backend: Backend,
    features: list[int],
    config: SelfExplainConfig,
    store: ResultsStore,
    *,
    resume: bool = False,
    retry_failed: bool = False,
    on_batch: Callable[[int], None] | None = None,
    vocabulary: bool = False,
    on_probe: Callable[[int], None] | None = None,
) -> RunSummary:
    """Explain `features`, committing each batch to `store`; with `resume`, skip features already stored
    (and those a run had to skip, unless `retry_failed`). A feature whose decoder row has no direction
    (NaN, inf, all zeros) is recorded as failed, with why, and the run goes on. With `vocabulary`, each
    record also carries the vocabulary probe's tokens (one pass over the vocabulary for all features to do,
    before the first batch; `on_probe` gets its progress)."""
    check_compatible(sae, backend)
    explainer = SelfExplainer(backend, config)
    settings = explainer.settings_hash
    done = store.done(backend.model_id, sae_key, settings) if resume else set()
    if resume and not retry_failed:
        done |= set(store.failed(backend.model_id, sae_key, settings))
    todo = [f for f in features if f not in done]
    start = time.perf_counter()  # the probe counts in the run's time
    probed = dict(zip(todo, vocabulary_labels(sae, backend, todo, progress=on_probe))) if vocabulary and todo else {}
    # features per committed batch: enough to fill one generate call with their rows
    scales_generated = min(config.keep_top, len(config.scales)) if config.generate == "chosen" else len(config.scales)
    per_batch = max(1, config.batch_size // (scales_generated * config.n_samples))
    identity = sae_identity(sae)
    failed: dict[int, str] = {}
    owner = uuid.uuid4().hex  # this run, in the store's claims
    elsewhere = 0  # features another run resuming this store claimed first
    for i in range(0, len(todo), per_batch):
        window = todo[i : i + per_batch]
        chunk = store.claim(backend.model_id, sae_key, settings, window, owner) if resume else window
        elsewhere += len(window) - len(chunk)
        rows = decoder_rows(sae, chunk)
        bad = {chunk[r]: f"decoder row has {why}" for r, why in bad_directions(rows).items()}
        if bad:
            store.put_failed(backend.model_id, sae_key, settings, bad)
            failed.update(bad)
            keep = [r for r, f in enumerate(chunk) if f not in bad]
            chunk, rows = [chunk[r] for r in keep], rows[keep]
        if chunk:
            records = explainer.explain(rows, chunk)
            texts = [(r.chosen.text if r.chosen else "") for r in records]
            for r, act in zip(records, activation_records(sae, backend, chunk, texts, "own explanation")):
                r.sae = identity
                r.activations = [] if act is None else [act]
                r.vocabulary = [{"token": t, "activation": v} for t, v in probed.get(r.feature_id, [])]
            store.put(records, sae_key)
        if on_batch is not None:
            on_batch(len(window))
    seconds = time.perf_counter() - start
    explained = len(todo) - len(failed) - elsewhere
    return RunSummary(len(features), len(features) - len(todo), explained, seconds, settings, failed, elsewhere)


def stored_records(
    store: ResultsStore, model_id: str, sae_key: str, settings: str, features: list[int] | None = None
) -> Iterator[FeatureExplanations]:
    """The stored records of one run, in feature order (optionally only `features`)."""
    wanted = None if features is None else set(features)
    for _, record in store.records(model_id, sae_key, settings):
        if wanted is None or record.feature_id in wanted:
            yield record
