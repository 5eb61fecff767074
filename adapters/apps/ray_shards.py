"""`explain --ray`: a whole-SAE run as one Ray task per shard, merged into one store at the end.

Each task loads the model once on its worker (a GPU when it was given one), computes its shard
(shards.shard_features) into a store on the worker's own disk, and returns that store's bytes: SQLite never
crosses a network filesystem. The driver keeps each finished shard's store in `STORE.shards/`, so a rerun
with `resume` computes only the shards not finished before, and merges them all into STORE (a shard
interrupted mid-way starts again: on Ray, resume is by shard; with `--shard` on a shared disk, by batch).
A task whose worker dies is retried by Ray (`retries`) on another worker. Progress is one bar on the
driver, fed by the tasks through a small actor.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sae_selfexplain_plugin import Backend, SelfExplainConfig, SelfExplainError
from sae_selfexplain_plugin.files import atomic_writer
from sae_selfexplain_plugin.shards import MergeReport, Shard, merge_stores
from sae_selfexplain_plugin.store import ResultsStore

# What a worker does once its model is loaded: the run's config for this SAE and model (the CLI's adapter
# choice needs the model, which only the workers load).
Configure = Callable[[Any, Backend], SelfExplainConfig]


@dataclass
class RayRun:
    """What `explain_on_ray` did."""

    shards: int
    computed: list[int]  # shards computed by this call (the others were finished before, kept in STORE.shards)
    explained: int
    merge: MergeReport
    seconds: float
    settings_hash: str
    model_id: str
    failed: dict[int, str] = field(default_factory=dict)
    workers: dict[int, tuple[str, int]] = field(default_factory=dict)  # shard -> (node, pid) of its last attempt


def shards_folder(store: Path) -> Path:
    """Where the driver keeps each shard's finished store."""
    return store.with_name(store.name + ".shards")


def explain_on_ray(
    sae: Any,
    sae_key: str,
    model: str | None,
    features: list[int],
    configure: Configure,
    store: str | Path,
    *,
    address: str | None = None,
    shards: int | None = None,
    cpus_per_shard: int = 1,
    gpus_per_shard: float | None = None,
    retries: int = 2,
    resume: bool = False,
    device: str | None = None,
    vocabulary: bool = False,
    on_progress: Callable[[int], None] | None = None,
    on_start: Callable[[int, str, int], None] | None = None,
) -> RayRun:
    """Explain `features` of `sae` on a Ray cluster (`address`; None: the one RAY_ADDRESS names, else a local
    instance this call starts and stops), `shards` tasks (default: one per GPU of the cluster, else one per
    `cpus_per_shard` CPUs), then merge the shards' stores into `store`. `model` is what `load_model` takes
    (None: the embedded model the SAE names); workers must reach it, the SAE travels through Ray's object
    store. `on_progress(n)` is called as features finish, `on_start(shard, node, pid)` as a task starts."""
    ray = _ray()
    store = Path(store)
    folder = shards_folder(store)
    if store.exists() and not (resume and folder.is_dir()):
        raise SelfExplainError(
            f"{store} exists: `--ray` writes the store by merging its shards ({folder}/); pass --resume to continue "
            "the run those shards hold, or choose another --out/--store."
        )
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        return _run(ray, sae, sae_key, model, features, configure, store, folder, shards, cpus_per_shard,
                    gpus_per_shard, retries, resume, device, vocabulary, on_progress, on_start)  # fmt: skip
    finally:
        if started_here:
            ray.shutdown()


def _run(
    ray: Any,
    sae: Any,
    sae_key: str,
    model: str | None,
    features: list[int],
    configure: Configure,
    store: Path,
    folder: Path,
    shards: int | None,
    cpus_per_shard: int,
    gpus_per_shard: float | None,
    retries: int,
    resume: bool,
    device: str | None,
    vocabulary: bool,
    on_progress: Callable[[int], None] | None,
    on_start: Callable[[int, str, int], None] | None,
) -> RayRun:
    start = time.perf_counter()
    resources = ray.cluster_resources()
    gpus = gpus_per_shard if gpus_per_shard is not None else (1.0 if resources.get("GPU", 0) >= 1 else 0.0)
    count = shards or max(1, int(resources.get("GPU", 0) // gpus) if gpus else int(resources["CPU"] // cpus_per_shard))
    finished = {k: folder / f"shard-{k}-of-{count}.db" for k in range(count)}
    todo = [k for k in range(count) if not (resume and finished[k].is_file())]  # written only once finished
    progress = ray.remote(num_cpus=0)(_Progress).remote()
    task = ray.remote(_explain_shard).options(
        num_cpus=cpus_per_shard, num_gpus=gpus, max_retries=retries, retry_exceptions=False
    )
    sae_ref = ray.put(sae)
    pending = {
        task.remote(sae_ref, sae_key, model, features, Shard(k, count), configure, progress, cpus_per_shard, device,
                    vocabulary): k
        for k in todo
    }  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    if on_progress is not None:  # the features of shards finished before
        on_progress(sum(_stored_features(finished[k]) for k in range(count) if k not in todo))
    reported, seen_starts, results = 0, 0, {}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.25)
        done, starts = ray.get(progress.state.remote())
        if on_progress is not None and done != reported:
            on_progress(done - reported)  # less than before when a retried shard starts over
        reported = done
        for shard, node, pid in starts[seen_starts:]:
            if on_start is not None:
                on_start(shard, node, pid)
        seen_starts = len(starts)
        for ref in ready:
            k = pending.pop(ref)
            try:
                data, summary = ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                cause = e.cause if isinstance(e.cause, SelfExplainError) else e
                raise SelfExplainError(f"shard {k}/{count} failed: {cause}") from None
            with atomic_writer(finished[k], "wb") as f:
                f.write(data)
            results[k] = summary
    merge = merge_stores([finished[k] for k in range(count)], store)
    workers = {k: (node, pid) for k, node, pid in ray.get(progress.state.remote())[1]}
    explained = sum(s["explained"] for s in results.values())
    failed = {f: why for s in results.values() for f, why in s["failed"].items()}
    some = next(iter(results.values()), None) or _stored_run(store)
    return RayRun(count, sorted(results), explained, merge, time.perf_counter() - start, some["settings_hash"],
                  some["model_id"], failed, workers)  # fmt: skip


class _Progress:
    """A Ray actor the tasks report to: features done per shard (an attempt that starts over counts from 0),
    and which worker started which shard."""

    def __init__(self) -> None:
        self.done: dict[int, int] = {}
        self.starts: list[tuple[int, str, int]] = []

    def advance(self, shard: int, n: int) -> None:
        self.done[shard] = self.done.get(shard, 0) + n

    def started(self, shard: int, node: str, pid: int) -> None:
        self.done[shard] = 0
        self.starts.append((shard, node, pid))

    def state(self) -> tuple[int, list[tuple[int, str, int]]]:
        return sum(self.done.values()), self.starts


def _explain_shard(
    sae: Any,
    sae_key: str,
    model: str | None,
    features: list[int],
    shard: Shard,
    configure: Configure,
    progress: Any,
    threads: int,
    device: str | None,
    vocabulary: bool,
) -> tuple[bytes, dict[str, Any]]:
    """One Ray task: load the model (once: Ray gives each task its own worker), explain the shard into a
    store on this machine's disk, and return the store's bytes with the run's summary."""
    import socket

    import ray
    import torch

    from ..backends import load_model
    from .whole_sae import explain_sae, take_shard

    progress.started.remote(shard.index, socket.gethostname(), os.getpid())
    torch.set_num_threads(max(1, threads))
    backend = load_model(model, model_name=sae.cfg.metadata.model_name, device=device or _ray_device(ray))
    config = configure(sae, backend)
    with tempfile.TemporaryDirectory(prefix="sae-selfexplain-shard-") as tmp:
        path = Path(tmp) / "shard.db"
        with ResultsStore(path) as store:
            mine = take_shard(store, shard, features, config)
            summary = explain_sae(
                sae, sae_key, backend, mine, config, store, vocabulary=vocabulary,
                on_batch=lambda n: progress.advance.remote(shard.index, n),
            )  # fmt: skip
        data = path.read_bytes()  # closed: the write-ahead log is folded into the file
    about = {"explained": summary.explained, "skipped": summary.skipped, "failed": summary.failed}
    return data, {**about, "settings_hash": summary.settings_hash, "model_id": backend.model_id}


def _ray_device(ray: Any) -> str:
    return "cuda" if ray.get_gpu_ids() else "cpu"


def _stored_features(path: Path) -> int:
    """Features a finished shard store holds (explained or failed)."""
    with ResultsStore(path, read_only=True) as store:
        return store.row_count("explanations") + store.row_count("failed")


def _stored_run(store: Path) -> dict[str, Any]:
    """Model and settings of the run a merged store holds (when every shard was finished before this call)."""
    with ResultsStore(store, read_only=True) as opened:
        for _, record in opened.records():
            return {"settings_hash": record.settings_hash, "model_id": record.model_id}
    raise SelfExplainError(f"{store} holds no records: the run explained nothing.")


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise SelfExplainError("`--ray` needs Ray: pip install 'sae-selfexplain[ray]'.") from None
    return ray
