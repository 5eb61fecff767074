"""Neuronpedia's database and bulk importer, mirrored in SQLite for tests.

Tables: the columns of hijohnnylin/neuronpedia `apps/webapp/prisma/schema.prisma` that the export touches,
with the constraints that decide whether an import succeeds: NOT NULL where the column has no database
default (Prisma's `@default(cuid())` is client-side, so `Explanation.id` has none), primary and unique keys,
and foreign keys (`Explanation` -> `Neuron`, `User`, `ExplanationType`, `ExplanationModelType`; `Neuron` ->
`Model`, `Source`, `SourceSet`; ...). Other columns (arrays, vectors) are left out: they all have defaults.

Importer: `app/api/admin/import/route.ts` creates the model, source set and source from their .jsonl files
when they do not exist yet, then `lib/db/import.ts` inserts every features/ and explanations/ line as given:
the columns are the first line's keys that the table has, and `ON CONFLICT DO NOTHING` skips rows whose
key exists (NOT NULL and foreign-key violations still fail the import).
"""

from __future__ import annotations

import gzip
import json
import sqlite3
from pathlib import Path
from typing import Any

DDL = """
CREATE TABLE "User" (id TEXT PRIMARY KEY);
CREATE TABLE "ExplanationType" (name TEXT PRIMARY KEY);
CREATE TABLE "ExplanationModelType" (name TEXT PRIMARY KEY);
CREATE TABLE "Model" (
    id TEXT PRIMARY KEY, "displayNameShort" TEXT NOT NULL DEFAULT '', "displayName" TEXT NOT NULL DEFAULT '',
    "creatorId" TEXT NOT NULL REFERENCES "User"(id), layers INTEGER NOT NULL, "neuronsPerLayer" INTEGER NOT NULL,
    owner TEXT NOT NULL, visibility TEXT NOT NULL DEFAULT 'PRIVATE',
    "createdAt" TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP, "updatedAt" TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP
);
CREATE TABLE "SourceSet" (
    "modelId" TEXT NOT NULL REFERENCES "Model"(id), name TEXT NOT NULL, description TEXT NOT NULL,
    type TEXT NOT NULL DEFAULT '', "creatorName" TEXT NOT NULL, "creatorId" TEXT NOT NULL REFERENCES "User"(id),
    visibility TEXT NOT NULL DEFAULT 'PRIVATE', "createdAt" TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP,
    UNIQUE ("modelId", name)
);
CREATE TABLE "Source" (
    id TEXT NOT NULL, "modelId" TEXT NOT NULL REFERENCES "Model"(id), "setName" TEXT NOT NULL,
    "creatorId" TEXT NOT NULL REFERENCES "User"(id), visibility TEXT NOT NULL DEFAULT 'PRIVATE',
    "createdAt" TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP,
    UNIQUE ("modelId", id), FOREIGN KEY ("modelId", "setName") REFERENCES "SourceSet"("modelId", name)
);
CREATE TABLE "Neuron" (
    "modelId" TEXT NOT NULL REFERENCES "Model"(id), layer TEXT NOT NULL, "index" TEXT NOT NULL,
    "sourceSetName" TEXT, "creatorId" TEXT REFERENCES "User"(id), "maxActApprox" REAL DEFAULT 0,
    frac_nonzero REAL NOT NULL DEFAULT 0, "hasVector" INTEGER NOT NULL DEFAULT 0,
    "createdAt" TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP,
    UNIQUE ("modelId", layer, "index"),
    FOREIGN KEY ("modelId", layer) REFERENCES "Source"("modelId", id),
    FOREIGN KEY ("modelId", "sourceSetName") REFERENCES "SourceSet"("modelId", name)
);
CREATE TABLE "Explanation" (
    id TEXT PRIMARY KEY NOT NULL, "modelId" TEXT NOT NULL REFERENCES "Model"(id), layer TEXT NOT NULL,
    "index" TEXT NOT NULL, description TEXT NOT NULL, "authorId" TEXT NOT NULL REFERENCES "User"(id),
    notes TEXT, "typeName" TEXT REFERENCES "ExplanationType"(name),
    "explanationModelName" TEXT REFERENCES "ExplanationModelType"(name), "scoreV1" REAL NOT NULL DEFAULT 0,
    "createdAt" TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP, "updatedAt" TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP,
    FOREIGN KEY ("modelId", layer, "index") REFERENCES "Neuron"("modelId", layer, "index")
);
"""

_KEYS = {"Model": ("id",), "SourceSet": ("modelId", "name"), "Source": ("modelId", "id")}


def database(users: tuple[str, ...] = ("u1",), types: tuple[str, ...] = ("oai_token-act-pair",)) -> sqlite3.Connection:
    db = sqlite3.connect(":memory:", isolation_level=None)
    db.execute("PRAGMA foreign_keys = ON")
    db.executescript(DDL)
    db.executemany('INSERT INTO "User" VALUES (?)', [(u,) for u in users])
    db.executemany('INSERT INTO "ExplanationType" VALUES (?)', [(t,) for t in types])
    return db


def _columns(db: sqlite3.Connection, table: str) -> list[str]:
    return [str(row[1]) for row in db.execute(f'PRAGMA table_info("{table}")')]


def _insert(db: sqlite3.Connection, table: str, rows: list[dict[str, Any]]) -> None:
    """import.ts: the first line's keys that are columns; every row as given; ON CONFLICT DO NOTHING."""
    if not rows:
        return
    columns = [c for c in rows[0] if c in _columns(db, table)]
    names = ", ".join(f'"{c}"' for c in columns)
    marks = ", ".join("?" for _ in columns)
    sql = f'INSERT INTO "{table}" ({names}) VALUES ({marks}) ON CONFLICT DO NOTHING'
    db.executemany(sql, [[_value(row.get(c)) for c in columns] for row in rows])


def _value(v: Any) -> Any:
    return json.dumps(v) if isinstance(v, (list, dict)) else v


def _create_if_missing(db: sqlite3.Connection, table: str, row: dict[str, Any]) -> None:
    """route.ts: prisma findUnique on the table's key, create when absent."""
    key = _KEYS[table]
    where = " AND ".join(f'"{k}" = ?' for k in key)
    if db.execute(f'SELECT 1 FROM "{table}" WHERE {where}', [row[k] for k in key]).fetchone() is None:
        _insert(db, table, [row])


def _lines(path: Path) -> list[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def import_dataset(db: sqlite3.Connection, folder: Path) -> None:
    """Import `v1/{modelId}/{sourceId}` as route.ts does (without its optional release and inference files)."""
    for name, table in (("model", "Model"), ("sourceset", "SourceSet"), ("source", "Source")):
        for row in _lines(folder / f"{name}.jsonl"):
            _create_if_missing(db, table, row)
    for sub, table in (("features", "Neuron"), ("explanations", "Explanation")):
        for path in sorted((folder / sub).glob("*.jsonl.gz")):
            _insert(db, table, _lines(path))


def counts(db: sqlite3.Connection) -> dict[str, int]:
    tables = ("Model", "SourceSet", "Source", "Neuron", "Explanation")
    return {t: int(db.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0]) for t in tables}
