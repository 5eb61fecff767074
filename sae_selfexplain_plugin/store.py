"""Crash-safe results store: SQLite (stdlib) in WAL mode, one row per (model, SAE, feature, settings).

Each `put` is one transaction, so a process killed mid-run loses at most the batch in flight, and a
re-run skips what `done()` reports. Several processes may write to one store: SQLite serialises them.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from .errors import SelfExplainError
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


class ResultsStore:
    """Explanations keyed by (model_id, sae_id, feature, settings_hash)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a committed batch survives a crash
            self._db.executescript(_DDL)
            version = self._meta("schema_version")
            if version is None:
                self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(version) > SCHEMA_VERSION:
                raise StoreError(
                    f"the store {self.path} has schema version {version}, newer than this sae-selfexplain "
                    f"understands ({SCHEMA_VERSION}); upgrade sae-selfexplain or use another --store."
                )
        except (sqlite3.Error, OSError) as e:
            raise StoreError(f"cannot open the results store {self.path} ({e}); choose a writable --store path.") from e

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
        """(sae_id, record) pairs, ordered by SAE then feature index; None matches anything."""
        cur = self._db.execute(
            "SELECT sae_id, record FROM explanations WHERE (?1 IS NULL OR model_id = ?1) AND "
            "(?2 IS NULL OR sae_id = ?2) AND (?3 IS NULL OR settings_hash = ?3) ORDER BY sae_id, feature",
            (model_id, sae_id, settings_hash),
        )
        for sae, record in cur:
            yield str(sae), FeatureExplanations.from_dict(json.loads(record))

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
