"""The `explain` pipeline for whole SAEs: resumable, committed per batch to the results store."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sae_lens import SAE

from sae_selfexplain_plugin import Backend, SelfExplainConfig, SelfExplainer
from sae_selfexplain_plugin.errors import InputError
from sae_selfexplain_plugin.results import FeatureExplanations
from sae_selfexplain_plugin.store import ResultsStore

from .embedded import EMBEDDED_MODELS, load_backend
from .sae_lens import activation_records, check_compatible, load_sae_folder, resolve_backend, sae_identity
from .transformers import TransformersBackend


def parse_features(spec: str, d_sae: int) -> list[int]:
    """`0-1023`, `1,5,9`, `0-9,20`, or the path of a file of indices (whitespace or comma separated)."""
    text = Path(spec).read_text() if Path(spec).is_file() else spec
    out: list[int] = []
    for part in (p for p in re.split(r"[\s,]+", text.strip()) if p):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise InputError(f"cannot read feature {part!r}: use indices and ranges such as 0-1023,2048 or a file.")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise InputError(f"feature range {part!r} is empty: write it low-high.")
        out.extend(range(lo, hi + 1))
    if not out:
        raise InputError(f"no features in {spec!r}.")
    bad = [f for f in out if f >= d_sae]
    if bad:
        raise InputError(f"features {bad[:5]} are outside the SAE, which has features 0..{d_sae - 1}.")
    return list(dict.fromkeys(out))  # de-duplicated, order kept


def load_sae(spec: str, device: str = "cpu") -> tuple[SAE[Any], str]:
    """A local SAELens folder, or `RELEASE:SAE_ID` from SAELens's registry; returns (sae, store key)."""
    path = Path(spec)
    if path.exists():
        sae = load_sae_folder(path, device=device)
    elif ":" in spec:
        release, sae_id = spec.split(":", 1)
        sae = SAE.from_pretrained(release, sae_id, device=device)
    else:
        raise InputError(f"--sae {spec!r} is neither an existing folder nor RELEASE:SAE_ID.")
    key = sae.cfg.metadata.neuronpedia_id or str(path.resolve() if path.exists() else spec)
    return sae, key


def load_model(spec: str | None, sae: SAE[Any] | None = None, device: str | None = None) -> Backend:
    """An embedded model by name, a local transformers checkpoint folder, or (None) the SAE's model
    (an embedded one, on a GPU if there is one)."""
    if spec is None:
        if sae is None:
            raise InputError("name a model (an embedded model or a checkpoint folder), or pass the SAE it belongs to.")
        return resolve_backend(sae)
    if spec in EMBEDDED_MODELS:
        return load_backend(spec, device=device)
    if Path(spec).is_dir():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model: Any = AutoModelForCausalLM.from_pretrained(spec)  # TransformersBackend puts it in eval mode
        return TransformersBackend(model.to(device or "cpu"), AutoTokenizer.from_pretrained(spec))
    raise InputError(
        f"--model {spec!r} is neither an embedded model ({sorted(EMBEDDED_MODELS)}) nor a local checkpoint folder."
    )


@dataclass
class RunSummary:
    requested: int
    skipped: int
    explained: int
    seconds: float
    settings_hash: str  # keys this run's records in the store


def explain_sae(
    sae: SAE[Any],
    sae_key: str,
    backend: Backend,
    features: list[int],
    config: SelfExplainConfig,
    store: ResultsStore,
    *,
    resume: bool = False,
    on_batch: Callable[[int], None] | None = None,
) -> RunSummary:
    """Explain `features`, committing each batch to `store`; with `resume`, skip features already stored."""
    check_compatible(sae, backend)
    explainer = SelfExplainer(backend, config)
    done = store.done(backend.model_id, sae_key, explainer.settings_hash) if resume else set()
    todo = [f for f in features if f not in done]
    # features per committed batch: enough to fill one generate call with their rows
    scales_generated = min(config.keep_top, len(config.scales)) if config.generate == "chosen" else len(config.scales)
    per_batch = max(1, config.batch_size // (scales_generated * config.n_samples))
    identity = sae_identity(sae)
    start = time.perf_counter()
    for i in range(0, len(todo), per_batch):
        chunk = todo[i : i + per_batch]
        records = explainer.explain(sae.W_dec.detach()[chunk].float().cpu(), chunk)
        texts = [(r.chosen.text if r.chosen else "") for r in records]
        for r, act in zip(records, activation_records(sae, backend, chunk, texts, "own explanation")):
            r.sae = identity
            r.activations = [] if act is None else [act]
        store.put(records, sae_key)
        if on_batch is not None:
            on_batch(len(chunk))
    seconds = time.perf_counter() - start
    return RunSummary(len(features), len(features) - len(todo), len(todo), seconds, explainer.settings_hash)


def stored_records(
    store: ResultsStore, model_id: str, sae_key: str, settings: str, features: list[int] | None = None
) -> Iterator[FeatureExplanations]:
    """The stored records of one run, in feature order (optionally only `features`)."""
    wanted = None if features is None else set(features)
    for _, record in store.records(model_id, sae_key, settings):
        if wanted is None or record.feature_id in wanted:
            yield record
