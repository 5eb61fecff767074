"""The `explain` pipeline for whole SAEs: resumable, committed per batch to the results store."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from sae_lens import SAE

from sae_selfexplain_plugin import Backend, SelfExplainConfig, SelfExplainer
from sae_selfexplain_plugin.directions import bad_directions
from sae_selfexplain_plugin.results import FeatureExplanations
from sae_selfexplain_plugin.shards import Shard, shard_features, shard_marker
from sae_selfexplain_plugin.store import ResultsStore

from ..sae_lens import (
    activation_records,
    check_compatible,
    decoder_rows,
    sae_identity,
    vocabulary_labels,
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
    per_batch = features_per_batch(config)
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


def features_per_batch(config: SelfExplainConfig) -> int:
    """Features per committed batch: enough to fill one generate call with their rows."""
    scales_generated = min(config.keep_top, len(config.scales)) if config.generate == "chosen" else len(config.scales)
    return max(1, config.batch_size // (scales_generated * config.n_samples))


def take_shard(store: ResultsStore, shard: Shard, features: list[int], config: SelfExplainConfig) -> list[int]:
    """Shard `shard`'s part of `features` (shards.shard_features: whole batches of this config), after marking
    `store` as that shard's: a store of another shard or run is refused before any work."""
    store.record_shards(shard_marker(shard, features))
    return shard_features(features, shard, features_per_batch(config))


def stored_records(
    store: ResultsStore, model_id: str, sae_key: str, settings: str, features: list[int] | None = None
) -> Iterator[FeatureExplanations]:
    """The stored records of one run, in feature order (optionally only `features`)."""
    wanted = None if features is None else set(features)
    for _, record in store.records(model_id, sae_key, settings):
        if wanted is None or record.feature_id in wanted:
            yield record
