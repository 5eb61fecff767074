"""Neuronpedia's database and bulk importer, mirrored in SQLite for tests.

Mirrored from hijohnnylin/neuronpedia (read at ebb8426): the tables are the columns of
`apps/webapp/prisma/schema.prisma` (as created by `prisma/migrations/*/migration.sql`) that the export touches,
with the constraints that decide whether an import succeeds: NOT NULL where the column has no database default
(Prisma's `@default(cuid())` is client-side, so `Explanation.id`, `Activation.id` and `User.emailUnsubscribeCode`
have none), primary and unique keys, the `Visibility` enum (PUBLIC, UNLISTED, PRIVATE; default PRIVATE) and
foreign keys (`Explanation` -> `Neuron`, `User`, `ExplanationType`, `ExplanationModelType`; `Activation` ->
`Neuron`, `User`; `Neuron` -> `Model`, `Source`, `SourceSet`; `ExplanationType` -> `User`; ...). Other columns
(arrays, vectors) are left out: they all have defaults.

Importer, `app/api/admin/import/route.ts` (GET ?modelId=&sourceId=), in its order:
0. `lib/db/import.ts importConfigFromS3`: upserts every line of `v1/config/{explanation_model_type,
   explanation_type, explanation_score_model, explanation_score_type, eval_type}.jsonl`; a missing file fails the
   import (S3 NoSuchKey);
1. creates the model, source set and source from their .jsonl files when they do not exist yet (Prisma `create`:
   a key that is not a field of the model fails);
2. `importJsonlString` inserts every features/, activations/ (top level only) and explanations/ line as given: the
   columns are the first line's keys that the table has, and `ON CONFLICT DO NOTHING` skips rows whose key exists
   (NOT NULL and foreign-key violations still fail the import).
It reads only from the bucket `neuronpedia-datasets` (lib/utils/s3.ts); here the files come from a folder laid
out like the bucket (`{root}/v1/...`). Its optional release and inference-host files are not mirrored. No step
creates a User.
"""

from __future__ import annotations

import gzip
import json
import sqlite3
from pathlib import Path
from typing import Any

VISIBILITY = "visibility TEXT NOT NULL DEFAULT 'PRIVATE' CHECK (visibility IN ('PUBLIC', 'UNLISTED', 'PRIVATE'))"
DDL = f"""
CREATE TABLE "User" (
    id TEXT PRIMARY KEY NOT NULL, name TEXT NOT NULL UNIQUE, "emailUnsubscribeCode" TEXT NOT NULL UNIQUE,
    bot INTEGER NOT NULL DEFAULT 0, admin INTEGER NOT NULL DEFAULT 0,
    "createdAt" TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP
);
CREATE TABLE "ExplanationType" (
    name TEXT PRIMARY KEY NOT NULL, "displayName" TEXT NOT NULL, description TEXT NOT NULL,
    featured INTEGER NOT NULL DEFAULT 1, "isAttention" INTEGER NOT NULL DEFAULT 0, settings TEXT, url TEXT,
    "creatorName" TEXT NOT NULL, "creatorId" TEXT NOT NULL REFERENCES "User"(id),
    "createdAt" TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP, "updatedAt" TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP
);
CREATE TABLE "ExplanationModelType" (
    name TEXT PRIMARY KEY NOT NULL, "displayName" TEXT NOT NULL, description TEXT NOT NULL,
    featured INTEGER NOT NULL DEFAULT 1, "openRouterModelId" TEXT, url TEXT, "creatorName" TEXT NOT NULL,
    "createdAt" TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP, "updatedAt" TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP
);
CREATE TABLE "ExplanationScoreModel" (
    name TEXT PRIMARY KEY NOT NULL, "displayName" TEXT NOT NULL, description TEXT NOT NULL,
    featured INTEGER NOT NULL DEFAULT 1, "openRouterModelId" TEXT, url TEXT, "creatorName" TEXT NOT NULL,
    "createdAt" TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP, "updatedAt" TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP
);
CREATE TABLE "ExplanationScoreType" (
    name TEXT PRIMARY KEY NOT NULL, "displayName" TEXT NOT NULL, description TEXT NOT NULL,
    featured INTEGER NOT NULL DEFAULT 1, "isAttention" INTEGER NOT NULL DEFAULT 0, "scoreDescription" TEXT,
    "scorerModel" TEXT, settings TEXT, url TEXT, "creatorName" TEXT NOT NULL,
    "creatorId" TEXT NOT NULL REFERENCES "User"(id),
    "createdAt" TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP, "updatedAt" TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP
);
CREATE TABLE "EvalType" (
    name TEXT PRIMARY KEY NOT NULL, "displayName" TEXT NOT NULL, description TEXT NOT NULL,
    "longerDescription" TEXT NOT NULL DEFAULT '', "outputSchema" TEXT NOT NULL, featured INTEGER NOT NULL DEFAULT 0,
    url TEXT, "createdAt" TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP, "updatedAt" TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP
);
CREATE TABLE "Model" (
    id TEXT PRIMARY KEY, "displayNameShort" TEXT NOT NULL DEFAULT '', "displayName" TEXT NOT NULL DEFAULT '',
    "creatorId" TEXT NOT NULL REFERENCES "User"(id), layers INTEGER NOT NULL, "neuronsPerLayer" INTEGER NOT NULL,
    owner TEXT NOT NULL, {VISIBILITY},
    "createdAt" TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP, "updatedAt" TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP
);
CREATE TABLE "SourceSet" (
    "modelId" TEXT NOT NULL REFERENCES "Model"(id), name TEXT NOT NULL, description TEXT NOT NULL,
    type TEXT NOT NULL DEFAULT '', "creatorName" TEXT NOT NULL, "creatorId" TEXT NOT NULL REFERENCES "User"(id),
    urls TEXT NOT NULL DEFAULT '[]', {VISIBILITY}, "createdAt" TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP,
    UNIQUE ("modelId", name)
);
CREATE TABLE "Source" (
    id TEXT NOT NULL, "modelId" TEXT NOT NULL REFERENCES "Model"(id), "setName" TEXT NOT NULL,
    "creatorId" TEXT NOT NULL REFERENCES "User"(id), {VISIBILITY},
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
CREATE TABLE "Activation" (
    id TEXT PRIMARY KEY NOT NULL, tokens TEXT, "dataIndex" TEXT, "index" TEXT NOT NULL, layer TEXT NOT NULL,
    "modelId" TEXT NOT NULL, "dataSource" TEXT, "maxValue" REAL NOT NULL, "maxValueTokenIndex" INTEGER NOT NULL,
    "minValue" REAL NOT NULL, "values" TEXT, "dfaValues" TEXT DEFAULT '[]', "dfaTargetIndex" INTEGER,
    "dfaMaxValue" REAL, "creatorId" TEXT NOT NULL REFERENCES "User"(id),
    "createdAt" TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP, "binMin" REAL, "binMax" REAL, "binContains" REAL,
    FOREIGN KEY ("modelId", layer, "index") REFERENCES "Neuron"("modelId", layer, "index")
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

CONFIG = (  # lib/db/import.ts importConfigFromS3: file -> table, in its order
    ("explanation_model_type", "ExplanationModelType"),
    ("explanation_type", "ExplanationType"),
    ("explanation_score_model", "ExplanationScoreModel"),
    ("explanation_score_type", "ExplanationScoreType"),
    ("eval_type", "EvalType"),
)
_KEYS = {"Model": ("id",), "SourceSet": ("modelId", "name"), "Source": ("modelId", "id")}


def database(users: tuple[str, ...] = ("u1",), types: tuple[str, ...] = ("oai_token-act-pair",)) -> sqlite3.Connection:
    """A database with `users` and explanation `types` (created by the first user); `database((), ())` is a clean
    one, as `prisma migrate` leaves it before any seed or import."""
    db = sqlite3.connect(":memory:", isolation_level=None)
    db.execute("PRAGMA foreign_keys = ON")
    db.executescript(DDL)
    db.executemany('INSERT INTO "User" (id, name, "emailUnsubscribeCode") VALUES (?, ?, ?)', [(u, u, u) for u in users])
    db.executemany(
        'INSERT INTO "ExplanationType" (name, "displayName", description, "creatorName", "creatorId") '
        "VALUES (?, ?, '', 'bot', ?)",
        [(t, t, users[0]) for t in types],
    )
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


def _prisma_row(db: sqlite3.Connection, table: str, row: dict[str, Any]) -> dict[str, Any]:
    """Prisma's create/upsert take only the model's fields: any other key fails the call."""
    unknown = set(row) - set(_columns(db, table))
    if unknown:
        raise ValueError(f"prisma.{table}: Unknown argument {sorted(unknown)[0]!r}")
    return row


def _create_if_missing(db: sqlite3.Connection, table: str, row: dict[str, Any]) -> None:
    """route.ts: prisma findUnique on the table's key, create when absent."""
    key = _KEYS[table]
    where = " AND ".join(f'"{k}" = ?' for k in key)
    if db.execute(f'SELECT 1 FROM "{table}" WHERE {where}', [row[k] for k in key]).fetchone() is None:
        _insert(db, table, [_prisma_row(db, table, row)])


def _upsert(db: sqlite3.Connection, table: str, row: dict[str, Any]) -> None:
    """import.ts importConfigFromS3: prisma upsert by name, `update: line, create: line`."""
    row = _prisma_row(db, table, row)
    names = ", ".join(f'"{c}"' for c in row)
    marks = ", ".join("?" for _ in row)
    update = ", ".join(f'"{c}" = excluded."{c}"' for c in row if c != "name") or "name = name"
    sql = f'INSERT INTO "{table}" ({names}) VALUES ({marks}) ON CONFLICT (name) DO UPDATE SET {update}'
    db.execute(sql, [_value(v) for v in row.values()])


class NoSuchKey(FileNotFoundError):
    """What the route's S3 GetObject raises for a file the bucket does not have: the import fails."""


def _lines(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise NoSuchKey(f"NoSuchKey: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def import_dataset(db: sqlite3.Connection, folder: Path) -> None:
    """Import `{root}/v1/{modelId}/{sourceId}` as route.ts does: first `{root}/v1/config`, then the source."""
    for name, table in CONFIG:
        for row in _lines(folder.parents[1] / "config" / f"{name}.jsonl"):
            _upsert(db, table, row)
    for name, table in (("model", "Model"), ("sourceset", "SourceSet"), ("source", "Source")):
        for row in _lines(folder / f"{name}.jsonl"):
            if table == "SourceSet":
                row = {**row, "urls": row.get("urls") or []}
            _create_if_missing(db, table, row)
    for sub, table, recursive in (("features", "Neuron", True), ("activations", "Activation", False),
                                  ("explanations", "Explanation", True)):  # fmt: skip
        found = (folder / sub).rglob("*.jsonl.gz") if recursive else (folder / sub).glob("*.jsonl.gz")
        for path in sorted(found):
            _insert(db, table, _lines(path))


def counts(db: sqlite3.Connection) -> dict[str, int]:
    tables = ("Model", "SourceSet", "Source", "Neuron", "Activation", "Explanation")
    return {t: int(db.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0]) for t in tables}
