"""One whole-SAE run cut into shards, each computed by its own process or machine (a Slurm array task, a Ray
task) into its own results store, and the merge of those stores into one.

A shard is `K/N` (0 <= K < N, as Slurm numbers array tasks). The requested features are cut into blocks of
one committed batch each (`block`: the features one generate call takes), and shard K gets a contiguous run
of whole blocks: every batch holds exactly the features a single run would give it, so a shard's records
equal the single run's bit for bit (same model, settings and threads), not only to rounding.

Stores, not the network, carry the results: SQLite is safe on one disk but loses locks on a network
filesystem, so each shard writes a store on its own machine's disk and `merge_stores` combines them.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError
from .files import atomic_path, parse_json, refuse_input
from .formats import checked_record
from .store import ResultsStore, StoreError


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` (0-based, as SLURM_ARRAY_TASK_ID with --array=0-(N-1))."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(spec: str) -> Shard:
    """`K/N` with 0 <= K < N; InputError naming the fix otherwise."""
    m = re.fullmatch(r"([0-9]+)/([0-9]+)", spec.strip())
    if not m:
        raise InputError(f"--shard {spec!r} is not K/N: write e.g. 0/4 (shard 0 of 4; shards count from 0).")
    index, count = int(m.group(1)), int(m.group(2))
    if count < 1 or index >= count:
        raise InputError(
            f"--shard {spec}: K must be 0..N-1 and N at least 1 (shards count from 0, as Slurm's "
            "--array=0-(N-1) numbers its tasks)."
        )
    return Shard(index, count)


def shard_features(features: Sequence[int], shard: Shard, block: int) -> list[int]:
    """Shard `shard`'s features: a contiguous run of whole `block`-feature blocks of `features`, the blocks
    dealt as evenly as they go (shards differ by at most one block; with more shards than blocks some are
    empty)."""
    if block < 1:
        raise ValueError("block must be at least 1")
    blocks = -(-len(features) // block)
    first, last = shard.index * blocks // shard.count, (shard.index + 1) * blocks // shard.count
    return list(features[first * block : last * block])


def run_fingerprint(features: Sequence[int]) -> str:
    """Names the run a shard belongs to by the whole list of features it was cut from (16 hex digits)."""
    return hashlib.sha256(",".join(map(str, features)).encode()).hexdigest()[:16]


def shard_marker(shard: Shard, features: Sequence[int]) -> dict[str, Any]:
    """What a shard's store records about it (ResultsStore.record_shards)."""
    return {"count": shard.count, "indices": [shard.index], "run": run_fingerprint(features)}


@dataclass
class MergeReport:
    """What `merge_stores` wrote."""

    records: int  # explained features
    failed: int  # features no input explained, with why
    differing: list[int] = field(default_factory=list)  # stored differently by two inputs: the first input's kept
    shards: dict[str, Any] | None = None  # the shards merged (None: no input was a shard)
    missing: list[int] = field(default_factory=list)  # shard indices of the run that no input holds


_CARRIED = ("explanations", "failed", "uploads")


def merge_stores(inputs: Sequence[str | Path], out: str | Path) -> MergeReport:
    """Combine results stores of one SAE, model and settings (e.g. the shards of one run) into `out`.

    One record per feature: inputs of the same settings hold the same record; where two differ, the input
    named first wins and the feature is listed in `differing`. A feature that failed everywhere keeps its
    failure row; one explained anywhere drops it. Uploads are united; live claims are not carried. `out` is
    written atomically (a crash leaves the previous `out` intact) and is never one of the inputs; merging
    the same inputs again writes the same rows. Inputs of different SAEs, models or settings, or shards of
    different runs, are refused before anything is written, naming both."""
    paths = [Path(p) for p in inputs]
    if not paths:
        raise InputError("merge needs at least one results store.")
    out = Path(out)
    refuse_input(out, "--out", {f"the input store {p}": p for p in paths})
    read = [_read(path) for path in paths]
    _check_one_run(read)
    markers = [(path, m) for path, _, m in read if m is not None]
    merged_shards = _merged_shards(markers)
    kept: dict[tuple[str, int], tuple[Any, ...]] = {}
    differing: set[int] = set()
    failed: dict[tuple[str, int], tuple[Any, ...]] = {}
    uploads: dict[tuple[Any, ...], tuple[Any, ...]] = {}
    for _, rows, _ in read:
        for row in rows["explanations"]:
            key = (str(row[1]), int(row[2]))
            if key not in kept:
                kept[key] = row
            elif kept[key][4] != row[4]:
                differing.add(key[1])
        for row in rows["failed"]:
            failed.setdefault((str(row[1]), int(row[2])), row)
        for row in rows["uploads"]:
            uploads.setdefault(tuple(row[:5]), row)
    failed_rows = [row for key, row in sorted(failed.items()) if key not in kept]
    _release(out)
    with atomic_path(out) as tmp:
        store = ResultsStore(tmp)
        try:
            store.put_raw(
                {
                    "explanations": [kept[k] for k in sorted(kept)],
                    "failed": failed_rows,
                    "uploads": [uploads[k] for k in sorted(uploads)],
                }
            )
            if merged_shards is not None:
                store.record_shards(merged_shards)
        finally:
            store.close()  # the last connection: SQLite folds its write-ahead log into the file
    missing = (
        [] if merged_shards is None else sorted(set(range(merged_shards["count"])) - set(merged_shards["indices"]))
    )
    return MergeReport(len(kept), len(failed_rows), sorted(differing), merged_shards, missing)


def _read(path: Path) -> tuple[Path, dict[str, list[tuple[Any, ...]]], dict[str, Any] | None]:
    """One input's rows, every record checked as `validate` would, and its shard marker."""
    with ResultsStore(path, read_only=True) as store:
        rows = {table: store.raw_rows(table) for table in _CARRIED}
        marker = store.shards()
    for row in rows["explanations"]:
        where = f"{path}: the stored record of feature {row[2]}"
        checked_record(parse_json(str(row[4]), where), where)
    return path, rows, marker


def _check_one_run(read: list[tuple[Path, dict[str, list[tuple[Any, ...]]], dict[str, Any] | None]]) -> None:
    """InputError unless every input holds rows of one (model, SAE, settings), naming two that differ."""
    first: tuple[Path, tuple[str, str, str]] | None = None
    for path, rows, _ in read:
        runs = sorted({(str(r[0]), str(r[1]), str(r[3])) for r in rows["explanations"] + rows["failed"]})
        if len(runs) > 1:
            raise InputError(
                f"{path} holds {len(runs)} runs ({_describe(runs[0])}; {_describe(runs[1])}): merge stores of one "
                "SAE, model and settings; `export --store ... --settings HASH` reads one run of a mixed store."
            )
        if not runs:
            continue
        if first is None:
            first = (path, runs[0])
            continue
        if runs[0] != first[1]:
            what = ("the model", "the SAE", "the settings")[[a != b for a, b in zip(runs[0], first[1])].index(True)]
            raise InputError(
                f"cannot merge: {first[0]} and {path} differ in {what} ({_describe(first[1])}; {_describe(runs[0])}). "
                "Merge only the stores of one run: the same SAE, model and settings."
            )


def _describe(run: tuple[str, str, str]) -> str:
    return f"model {run[0]!r}, SAE {run[1]!r}, settings {run[2]!r}"


def _merged_shards(markers: list[tuple[Path, dict[str, Any]]]) -> dict[str, Any] | None:
    """The union of the inputs' shard markers; InputError for shards of different runs or cuts."""
    if not markers:
        return None
    (first_path, first), indices = markers[0], set[int]()
    for path, marker in markers:
        if (marker.get("count"), marker.get("run")) != (first.get("count"), first.get("run")):
            raise InputError(
                f"cannot merge: {first_path} is a shard of {first.get('count')} of run {first.get('run')} and {path} "
                f"of {marker.get('count')} of run {marker.get('run')} (a run is named by its list of features): "
                "merge the shards of one `explain` command."
            )
        indices.update(int(i) for i in marker.get("indices", []))
    return {"count": first["count"], "indices": sorted(indices), "run": first["run"]}


def _release(out: Path) -> None:
    """Before replacing an existing `out`: it must be a results store no process has open, its write-ahead
    log folded in (a stale log beside the new file would be applied to it)."""
    if not out.exists():
        return
    ResultsStore(out).close()  # refuses a file that is not a results store; folds a crashed writer's log
    if Path(f"{out}-wal").exists():
        raise StoreError(f"{out} is open in another process (its write-ahead log remains); choose another --out.")
