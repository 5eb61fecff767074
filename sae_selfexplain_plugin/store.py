"""Crash-safe results store: SQLite (stdlib) in WAL mode, one row per (model, SAE, feature, settings).

Each `put` is one transaction, so a process killed mid-run loses at most the batch in flight, and a
re-run skips what `done()` reports. Several processes may write to one store: SQLite serialises them.
Commands that only read open it read-only (`read_only=True`): the file is never changed, and a file
that is not a results store (another SQLite database, an empty file) is refused, not converted.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import SelfExplainError
from .files import parse_json
from .formats import checked_record
from .results import FeatureExplanations

SCHEMA_VERSION = 1


class StoreError(SelfExplainError, RuntimeError):
    """The results store cannot be opened or written."""


_DDL = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS explanations (
    model_id TEXT NOT NULL,
    sae_id TEXT NOT NULL,
    feature INTEGER NOT NULL,
    settings_hash TEXT NOT NULL,
    record TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (model_id, sae_id, feature, settings_hash)
);
CREATE TABLE IF NOT EXISTS failed (
    model_id TEXT NOT NULL,
    sae_id TEXT NOT NULL,
    feature INTEGER NOT NULL,
    settings_hash TEXT NOT NULL,
    reason TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (model_id, sae_id, feature, settings_hash)
);
CREATE TABLE IF NOT EXISTS claims (
    model_id TEXT NOT NULL,
    sae_id TEXT NOT NULL,
    feature INTEGER NOT NULL,
    settings_hash TEXT NOT NULL,
    owner TEXT NOT NULL,
    claimed_at REAL NOT NULL,
    PRIMARY KEY (model_id, sae_id, feature, settings_hash)
);
CREATE TABLE IF NOT EXISTS uploads (
    host TEXT NOT NULL,
    np_model TEXT NOT NULL,
    np_source TEXT NOT NULL,
    feature INTEGER NOT NULL,
    text_sha TEXT NOT NULL,
    uploaded_at TEXT NOT NULL,
    PRIMARY KEY (host, np_model, np_source, feature, text_sha)
);
"""


# Tables whose rows a merge carries, with their key order (claims are a live run's and are not carried).
_RAW_TABLES = {
    "explanations": "sae_id, feature, model_id, settings_hash",
    "failed": "sae_id, feature, model_id, settings_hash",
    "uploads": "host, np_model, np_source, feature, text_sha",
}

_EXPLANATION_COLUMNS = ["model_id", "sae_id", "feature", "settings_hash", "record", "created_at"]


class ResultsStore:
    """Explanations keyed by (model_id, sae_id, feature, settings_hash)."""

    def __init__(self, path: str | Path, *, read_only: bool = False) -> None:
        self.path = Path(path)
        self.read_only = read_only
        try:
            if read_only:
                self._db = self._open_read_only()
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
                self._refuse_foreign()
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a committed batch survives a crash
                self._db.executescript(_DDL)
                self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            version = self._meta("schema_version")
            if version is not None and int(version) > SCHEMA_VERSION:
                raise StoreError(
                    f"the store {self.path} has schema version {version}, newer than this sae-selfexplain "
                    f"understands ({SCHEMA_VERSION}); upgrade sae-selfexplain or use another --store."
                )
        except sqlite3.DatabaseError as e:
            if "not a database" in str(e) or "malformed" in str(e):
                raise StoreError(f"{self.path} is not a results store (not an SQLite database: {e}).") from e
            raise StoreError(f"cannot open the results store {self.path} ({e}); choose a writable --store path.") from e
        except OSError as e:
            raise StoreError(f"cannot open the results store {self.path} ({e}); choose a writable --store path.") from e

    def _open_read_only(self) -> sqlite3.Connection:
        if not self.path.is_file() or self.path.stat().st_size == 0:
            what = "is empty" if self.path.is_file() else "does not exist"
            raise StoreError(f"{self.path} {what}: it is not a results store written by `explain`.")
        uri = f"{self.path.resolve().as_uri()}?mode=ro"
        try:
            db = sqlite3.connect(uri, uri=True, isolation_level=None)
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.OperationalError:
            # a WAL store in a folder we cannot write (no -shm file can be made): read the file as it is
            db = sqlite3.connect(uri + "&immutable=1", uri=True, isolation_level=None)
        self._db = db
        self._refuse_foreign(require_ours=True)
        return db

    def _refuse_foreign(self, require_ours: bool = False) -> None:
        """Refuse an SQLite file whose tables are not ours (or, read-only, that lacks ours)."""
        tables = {str(t) for (t,) in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        ours = {"meta", "explanations", "uploads", "failed", "claims"}
        if (tables and not tables <= ours) or (require_ours and not {"meta", "explanations"} <= tables):
            self._db.close()
            raise StoreError(
                f"{self.path} is not a results store (its tables: {sorted(tables) or 'none'}); "
                "pass a .db written by `explain`, or a new path."
            )
        if tables:  # our tables: check their columns too
            columns = [str(row[1]) for row in self._db.execute("PRAGMA table_info(explanations)")]
            if columns and columns != _EXPLANATION_COLUMNS:
                self._db.close()
                raise StoreError(f"{self.path} has an explanations table of another layout ({columns}); not ours.")

    def _meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def put(self, records: Iterable[FeatureExplanations], sae_id: str) -> int:
        """Write a batch in one transaction (all or nothing); returns the number of records written."""
        now = datetime.now(timezone.utc).isoformat()
        rows = [(r.model_id, sae_id, r.feature_id, r.settings_hash, r.to_json(), now) for r in records]
        try:
            with self._transaction():
                self._db.executemany("INSERT OR REPLACE INTO explanations VALUES (?, ?, ?, ?, ?, ?)", rows)
        except sqlite3.Error as e:
            raise StoreError(
                f"writing {len(rows)} results to {self.path} failed ({e}); nothing of this batch was kept."
            ) from e
        return len(rows)

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def put_failed(self, model_id: str, sae_id: str, settings_hash: str, reasons: dict[int, str]) -> None:
        """Record features a run could not explain, with why (one transaction)."""
        now = datetime.now(timezone.utc).isoformat()
        rows = [(model_id, sae_id, f, settings_hash, why, now) for f, why in reasons.items()]
        with self._transaction():
            self._db.executemany("INSERT OR REPLACE INTO failed VALUES (?, ?, ?, ?, ?, ?)", rows)

    def failed(self, model_id: str, sae_id: str, settings_hash: str) -> dict[int, str]:
        """Features a run with these settings could not explain, and why."""
        if "failed" not in {t for (t,) in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}:
            return {}  # a store from before this table, opened read-only
        cur = self._db.execute(
            "SELECT feature, reason FROM failed WHERE model_id = ? AND sae_id = ? AND settings_hash = ?",
            (model_id, sae_id, settings_hash),
        )
        return {int(f): str(why) for f, why in cur}

    def claim(
        self, model_id: str, sae_id: str, settings_hash: str, features: list[int], owner: str, lease_s: float = 900.0
    ) -> list[int]:
        """Of `features`, those this `owner` may compute now: not stored yet and not claimed by another
        owner within `lease_s` seconds (a crashed run's claims expire). They become this owner's claims,
        so two runs resuming one store share the work instead of both doing all of it."""
        now = time.time()
        key = (model_id, sae_id, settings_hash)
        these = f"feature IN ({', '.join('?' * len(features))})"  # only this batch's rows, not the whole run's
        with self._transaction():
            done = {int(f) for (f,) in self._db.execute(
                f"SELECT feature FROM explanations WHERE model_id = ? AND sae_id = ? AND settings_hash = ? AND {these}",
                (*key, *features),
            )}  # fmt: skip
            taken = {int(f) for (f,) in self._db.execute(
                "SELECT feature FROM claims WHERE model_id = ? AND sae_id = ? AND settings_hash = ? AND owner != ? "
                f"AND claimed_at > ? AND {these}", (*key, owner, now - lease_s, *features),
            )}  # fmt: skip
            mine = [f for f in features if f not in done and f not in taken]
            self._db.executemany(
                "INSERT OR REPLACE INTO claims VALUES (?, ?, ?, ?, ?, ?)",
                [(*key[:2], f, key[2], owner, now) for f in mine],
            )
        return mine

    def done(self, model_id: str, sae_id: str, settings_hash: str) -> set[int]:
        """Features already explained with these settings."""
        cur = self._db.execute(
            "SELECT feature FROM explanations WHERE model_id = ? AND sae_id = ? AND settings_hash = ?",
            (model_id, sae_id, settings_hash),
        )
        return {int(f) for (f,) in cur}

    def records(
        self, model_id: str | None = None, sae_id: str | None = None, settings_hash: str | None = None
    ) -> Iterator[tuple[str, FeatureExplanations]]:
        """(sae_id, record) pairs, ordered by SAE then feature index; None matches anything. An `sae_id`
        without a fingerprint (`name`, not `name@fingerprint`) matches every SAE stored under that name."""
        cur = self._db.execute(
            "SELECT sae_id, record FROM explanations WHERE (?1 IS NULL OR model_id = ?1) AND "
            "(?2 IS NULL OR sae_id = ?2 OR substr(sae_id, 1, length(?2) + 1) = ?2 || '@') AND "
            "(?3 IS NULL OR settings_hash = ?3) ORDER BY sae_id, feature",
            (model_id, sae_id, settings_hash),
        )
        for sae, record in cur:
            where = f"{self.path}: a stored record of {sae}"
            yield str(sae), checked_record(parse_json(str(record), where), where)

    def shards(self) -> dict[str, Any] | None:
        """The shards of one run this store holds (`record_shards`), or None for a store of a whole run."""
        value = self._meta("shards")
        return None if value is None else dict(parse_json(value, f"{self.path}: its shards"))

    def record_shards(self, shards: dict[str, Any]) -> None:
        """Mark this store as holding `shards` ({"count", "indices", "run"}: `shards.shard_marker`); refused when it
        already holds others, so two shards given one store by mistake fail before either computes."""
        value = json.dumps(shards, sort_keys=True)
        with self._transaction():
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('shards', ?)", (value,))
            held = self._meta("shards")
        if held != value:
            raise StoreError(
                f"the store {self.path} holds {held}, not {value}: give each shard its own store "
                "(--out part-K.jsonl, or --store part-K.db)."
            )

    def raw_rows(self, table: str) -> list[tuple[Any, ...]]:
        """Every row of one of the store's tables as stored (records as JSON text), in key order: what
        `shards.merge_stores` copies."""
        if not self._has_table(table):
            return []  # a store from before this table
        return list(self._db.execute(f"SELECT * FROM {table} ORDER BY {_RAW_TABLES[table]}"))

    def row_count(self, table: str) -> int:
        """How many rows one of the tables `raw_rows` reads holds (without reading them)."""
        return int(self._db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]) if self._has_table(table) else 0

    def _has_table(self, table: str) -> bool:
        if table not in _RAW_TABLES:
            raise ValueError(f"no table {table!r} in a results store")
        present = {t for (t,) in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        return table in present

    def put_raw(self, rows: dict[str, list[tuple[Any, ...]]]) -> None:
        """Insert rows of several tables as `raw_rows` returns them, in one transaction."""
        with self._transaction():
            for table, values in rows.items():
                if values:
                    marks = ", ".join("?" * len(values[0]))
                    self._db.executemany(f"INSERT OR REPLACE INTO {table} VALUES ({marks})", values)

    def uploaded(self, host: str, np_model: str, np_source: str) -> set[tuple[int, str]]:
        """(feature, text hash) pairs already uploaded to this Neuronpedia source."""
        cur = self._db.execute(
            "SELECT feature, text_sha FROM uploads WHERE host = ? AND np_model = ? AND np_source = ?",
            (host, np_model, np_source),
        )
        return {(int(f), str(s)) for f, s in cur}

    def mark_uploaded(self, host: str, np_model: str, np_source: str, items: Iterable[tuple[int, str]]) -> None:
        """Record a successfully uploaded batch (one transaction)."""
        now = datetime.now(timezone.utc).isoformat()
        rows = [(host, np_model, np_source, f, s, now) for f, s in items]
        with self._transaction():
            self._db.executemany("INSERT OR IGNORE INTO uploads VALUES (?, ?, ?, ?, ?, ?)", rows)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ResultsStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
