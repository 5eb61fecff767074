"""Write results in Neuronpedia's bulk-export layout, OpenAI's neuron-explainer layout, or our JSONL.

Every file is written atomically (files.atomic_writer) and every line is validated against its schema.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .activation_examples import ActivationExamples
from .errors import InputError
from .files import atomic_writer, inside, refuse_input, safe_component, to_json
from .formats import NEURONPEDIA_BATCH, neuronpedia_ids, to_neuron_explainer, to_neuronpedia_line, validate
from .identity import check_one_sae, check_same_sae
from .results import FeatureExplanations, public_model_name


@dataclass
class ExportSummary:
    written: int = 0
    skipped: list[int] = field(default_factory=list)  # features with no explanation to publish
    files: list[Path] = field(default_factory=list)


def _checked(doc: dict[str, Any], name: str) -> dict[str, Any]:
    problems = validate(doc, name)
    if problems:
        raise InputError(f"refusing to write an invalid {name} line: {problems[0]}")
    return doc


def unique(records: Iterable[FeatureExplanations]) -> Iterator[FeatureExplanations]:
    """The records, refusing a second record of one (SAE, feature): which of the two to publish is the
    user's choice (e.g. `--sae-id`, or one run's results file)."""
    seen: set[tuple[str, int]] = set()
    for record in records:
        key = (str(record.sae.get("neuronpedia_id") or record.model_id), record.feature_id)
        if key in seen:
            raise InputError(
                f"feature {record.feature_id} of {key[0]} appears twice in the input; export one run's records "
                "(one results file, or --store with --sae-id)."
            )
        seen.add(key)
        yield record


VISIBILITIES = ("public", "unlisted", "private")  # Neuronpedia's enum Visibility: PUBLIC, UNLISTED, PRIVATE
# What route.ts's first step (lib/db/import.ts importConfigFromS3) reads, in its order, from v1/config/; a
# missing file fails the whole import (S3 NoSuchKey).
CONFIG_FILES = (
    "explanation_model_type", "explanation_type", "explanation_score_model", "explanation_score_type", "eval_type",
)  # fmt: skip
AUTHOR_SQL = "create_author.sql"  # beside v1/, not in it: for psql, not for the bucket
SEED_BOT_USER = "clkht01d40000jv08hvalcvly"  # prisma/seed.ts's "bot" user (`make db-init` creates it)
_AUTHOR_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def export_neuronpedia(
    records: Iterable[FeatureExplanations],
    out_dir: str | Path,
    *,
    author_id: str,
    model_layers: int | None = None,
    model_id: str | None = None,
    source_id: str | None = None,
    type_name: str | None = None,
    explanation_model_name: str | None = None,
    examples: ActivationExamples | None = None,
    visibility: str = "public",
    inputs: dict[str, str | Path | None] | None = None,
) -> ExportSummary:
    """Neuronpedia's dataset layout, as its importer (app/api/admin/import/route.ts) reads it from its bucket:
    `{out_dir}/v1/config/{explanation_model_type,explanation_type,explanation_score_model,explanation_score_type,
    eval_type}.jsonl` (rows for `type_name` and `explanation_model_name`, the other files empty), and
    `{out_dir}/v1/{modelId}/{sourceId}/` with model.jsonl, sourceset.jsonl, source.jsonl (with `visibility`),
    features/batch-{N}.jsonl.gz (Neuron rows), activations/batch-{N}.jsonl.gz (Activation rows: the top
    contexts, with `examples`) and explanations/batch-{N}.jsonl.gz (Explanation rows), 1,024 features a batch, by
    index. Every row carries the NOT NULL columns its table has no database default for; with `examples`,
    Neuron rows carry the feature's density and maximum activation. Beside v1/, `create_author.sql`: the author's
    User row, which the route needs (foreign keys) and does not create (`author_sql`).

    Refuses, before writing anything: records of several SAEs or settings, examples of another size, any
    final path that would leave `out_dir`, pass through a symbolic link inside it, or is one of the `inputs`
    ({what: path}, `files.refuse_input`), and a source folder holding files this export would not replace (an
    earlier export's, which an import would pair with these)."""
    if not author_id or not _AUTHOR_ID.match(author_id):
        raise InputError(
            f"the Neuronpedia export needs --author-id (got {author_id!r}): the id of the Neuronpedia user the "
            f"explanations belong to (its User table; letters, digits and . _ -), e.g. {SEED_BOT_USER}, the "
            "'bot' user of a database set up with Neuronpedia's `make db-init`."
        )
    if visibility not in VISIBILITIES:
        raise InputError(f"--visibility {visibility!r} is not one of Neuronpedia's: {', '.join(VISIBILITIES)}.")
    records = list(unique(records))
    check_one_sae(((r.sae, r.model_id, r.settings_hash) for r in records), "the Neuronpedia export")
    if examples is not None and examples.sae is not None and records:
        fix = "pass the examples collected for this SAE (--examples), or none."
        check_same_sae(records[0].sae, examples.sae, "the activation examples", fix)
    summary = ExportSummary()
    groups: dict[tuple[str, str], list[tuple[FeatureExplanations, dict[str, Any]]]] = {}
    for record in records:
        model, source = neuronpedia_ids(record, model_id, source_id)
        ids = safe_component(model, "the Neuronpedia model id"), safe_component(source, "the Neuronpedia source id")
        line = to_neuronpedia_line(record, *ids, author_id, type_name, explanation_model_name)
        if line is None:
            summary.skipped.append(record.feature_id)
            continue
        groups.setdefault(ids, []).append((record, _checked(line, "neuronpedia-explanation")))
    if examples is not None and groups:
        largest = max(r.feature_id for rows in groups.values() for r, _ in rows)
        if largest >= examples.d_sae:
            raise InputError(
                f"the activation examples cover features 0..{examples.d_sae - 1}, but the results have feature "
                f"{largest}; pass the examples of this SAE (--examples)."
            )
    vis = visibility.upper()
    # (path, its rows or its text, gzip?)
    files: list[tuple[Path, Callable[[], list[dict[str, Any]]] | str, bool]] = []
    config = _config_rows(author_id, type_name, explanation_model_name)
    if groups:
        note = "-- The author's User row, which Neuronpedia's import needs and does not create (docs/pipeline.md).\n"
        run = f'-- Run it once, before the import: psql "$POSTGRES_URL_NON_POOLING" -f {AUTHOR_SQL}\n'
        files.append((inside(out_dir, AUTHOR_SQL), note + run + author_sql(author_id) + "\n", False))
        files += [(inside(out_dir, "v1", "config", f"{n}.jsonl"), _const(config[n]), False) for n in CONFIG_FILES]
    for (model, source), rows in groups.items():
        rows.sort(key=lambda r: r[0].feature_id)
        first = rows[0][0]

        def at(*parts: str, model: str = model, source: str = source) -> Path:
            return inside(out_dir, "v1", model, source, *parts)

        files += [
            (at("model.jsonl"), _const([_model_row(model, first, author_id, model_layers, vis)]), False),
            (at("sourceset.jsonl"), _const([_source_set_row(model, source, first, author_id, vis)]), False),
            (at("source.jsonl"), _const([{"id": source, "modelId": model, "setName": set_name(source),
                                          "creatorId": author_id, "visibility": vis}]), False),
        ]  # fmt: skip
        for n, start in enumerate(range(0, len(rows), NEURONPEDIA_BATCH)):
            batch = rows[start : start + NEURONPEDIA_BATCH]
            name = f"batch-{n}.jsonl.gz"
            neurons = [_neuron_row(model, source, r.feature_id, author_id, examples) for r, _ in batch]
            files.append((at("features", name), _const(neurons), True))
            if examples is not None:
                features = [r.feature_id for r, _ in batch]
                files.append(
                    (at("activations", name), _activations(model, source, features, author_id, examples), True)
                )
            files.append((at("explanations", name), _const([line for _, line in batch]), True))
        summary.written += len(rows)
    _check_targets([path for path, _, _ in files], inputs or {})
    for (model, source), _rows in groups.items():
        _refuse_stale(inside(out_dir, "v1", model, source), {path for path, _, _ in files})
    for path, content, gz in files:  # every path was checked above: nothing is written before all are
        if isinstance(content, str):
            with atomic_writer(path) as f:
                f.write(content)
        elif gz:
            with atomic_writer(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as out:
                for row in content():
                    out.write((to_json(row) + "\n").encode())
        else:
            _write_jsonl(path, content())
        summary.files.append(path)
    return summary


def _check_targets(paths: list[Path], inputs: dict[str, str | Path | None]) -> None:
    """Refuse, before anything is written, a path to write that is one of the command's inputs."""
    for path in paths:
        refuse_input(path, "--out", inputs)


def _refuse_stale(folder: Path, written: set[Path]) -> None:
    """InputError when `folder` (one source's, under --out) holds files this export does not replace."""
    if not folder.is_dir():
        return
    stale = sorted(
        str(Path(root, name).relative_to(folder))
        for root, _dirs, names in os.walk(folder)  # os.walk does not follow symbolic links
        for name in names
        if Path(root, name) not in written
    )
    if stale:
        raise InputError(
            f"{folder} holds {len(stale)} files of an earlier export that this one would not replace "
            f"({', '.join(stale[:5])}{', ...' if len(stale) > 5 else ''}); Neuronpedia's import would read them "
            "with these. Remove that folder, or choose an empty --out."
        )


def author_sql(author_id: str) -> str:
    """The one SQL statement that creates `author_id`'s User row, which no Neuronpedia import does: `id`, `name`
    and `emailUnsubscribeCode` are the columns with no database default (prisma/schema.prisma `model User`;
    Prisma's `@default(cuid())` is client-side). Run it with psql on the database the webapp uses."""
    if not _AUTHOR_ID.match(author_id):
        raise InputError(f"--author-id {author_id!r}: use letters, digits and . _ - (a Neuronpedia user id).")
    return (
        f"INSERT INTO \"User\" (id, name, \"emailUnsubscribeCode\") VALUES ('{author_id}', '{author_id}', "
        f"'{author_id}') ON CONFLICT DO NOTHING;"
    )


def _const(rows: list[dict[str, Any]]) -> Callable[[], list[dict[str, Any]]]:
    return lambda: rows


def _config_rows(author_id: str, type_name: str | None, model_name: str | None) -> dict[str, list[dict[str, Any]]]:
    """v1/config rows: the explanation type and explanation model the Explanation rows name (foreign keys), with
    the NOT NULL columns that have no database default; route.ts upserts them (a row of that name is updated)."""
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in CONFIG_FILES}
    if type_name:
        rows["explanation_type"].append({"name": type_name, "displayName": type_name, "creatorId": author_id,
                                         "creatorName": author_id, "featured": False,
                                         "description": "Self-explanation: the explained model reads the "
                                                        "feature's direction and says what it means "
                                                        "(sae-selfexplain)."})  # fmt: skip
    if model_name:
        description = "The model that explained its own features."
        rows["explanation_model_type"].append({"name": model_name, "displayName": model_name, "featured": False,
                                               "creatorName": author_id, "description": description})  # fmt: skip
    return rows


def _activations(
    model: str, source: str, features: list[int], author_id: str, examples: ActivationExamples
) -> Callable[[], list[dict[str, Any]]]:
    """Activation rows (schema.prisma `model Activation`) of the features' top contexts, strongest first, in the
    columns and order of Neuronpedia's own export (utils/neuronpedia-utils export-data.py). `id` is derived from
    the row's content, so a re-import inserts nothing (the table's only key is `id`)."""

    def rows() -> list[dict[str, Any]]:
        out = []
        for feature in features:
            for j, ctx in enumerate(examples[feature].top):
                if not ctx.values or ctx.max_value <= 0:
                    continue
                peak = max(range(len(ctx.values)), key=ctx.values.__getitem__)
                key = json.dumps([model, source, feature, j, ctx.tokens, ctx.values, author_id])
                out.append({
                    "id": "sx" + hashlib.sha256(key.encode()).hexdigest()[:23],
                    "modelId": model, "layer": source, "index": str(feature), "creatorId": author_id,
                    "dataSource": None, "tokens": ctx.tokens, "maxValue": ctx.values[peak],
                    "minValue": min(ctx.values), "values": ctx.values, "maxValueTokenIndex": peak,
                    "dfaValues": [], "dfaMaxValue": None, "dfaTargetIndex": None,
                    "binContains": None, "binMin": None, "binMax": None,
                })  # fmt: skip
        return out

    return rows


def set_name(source_id: str) -> str:
    """The source set a source belongs to, as Neuronpedia derives it ("6-res-jb" -> "res-jb")."""
    return source_id[source_id.index("-") + 1 :].split("__")[0] if "-" in source_id else source_id


def _model_row(
    model: str, record: FeatureExplanations, author_id: str, layers: int | None, visibility: str
) -> dict[str, Any]:
    if layers is None:
        raise InputError(
            f"the Neuronpedia export writes model.jsonl, which needs the number of blocks of {model}, and this model "
            "is not one whose size is known here: pass --model-layers (e.g. 30 for SmolLM2-135M, 18 for Gemma 3 "
            "270M)."
        )
    public = public_model_name(record.model_id)
    owner = public.split("/")[0] if "/" in public else "unknown"
    return {"id": model, "displayName": model, "displayNameShort": model, "creatorId": author_id, "owner": owner,
            "layers": layers, "neuronsPerLayer": int(record.sae.get("d_sae") or 0),
            "visibility": visibility}  # fmt: skip


def _source_set_row(
    model: str, source: str, record: FeatureExplanations, author_id: str, visibility: str
) -> dict[str, Any]:
    hook = record.sae.get("hook_name", "?")
    return {"modelId": model, "name": set_name(source), "creatorId": author_id, "creatorName": author_id,
            "description": f"SAE on {hook}, explained by self-explanation (sae-selfexplain)",
            "visibility": visibility}  # fmt: skip


def _neuron_row(
    model: str, source: str, feature: int, author_id: str, examples: ActivationExamples | None
) -> dict[str, Any]:
    row: dict[str, Any] = {"modelId": model, "layer": source, "index": str(feature),
                           "sourceSetName": set_name(source), "creatorId": author_id}  # fmt: skip
    if examples is not None:
        ex = examples[feature]
        row["frac_nonzero"] = round(ex.frequency, 8)
        row["maxActApprox"] = round(max((c.max_value for c in ex.top), default=0.0), 6)
    return row


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_writer(path) as f:
        for row in rows:
            f.write(to_json(row) + "\n")


def export_neuron_explainer(
    records: Iterable[FeatureExplanations],
    out_dir: str | Path,
    layer_index: int,
    inputs: dict[str, str | Path | None] | None = None,
) -> ExportSummary:
    """`{out_dir}/explanations/{layer_index}/{feature}.jsonl`, one NeuronSimulationResults line each; a path
    that is one of the `inputs` is refused before anything is written."""
    summary = ExportSummary()
    docs = [
        (inside(out_dir, "explanations", str(layer_index), f"{r.feature_id}.jsonl"),
         _checked(to_neuron_explainer(r, layer_index), "neuron-explainer"))
        for r in unique(records)
    ]  # fmt: skip
    _check_targets([path for path, _ in docs], inputs or {})
    for path, doc in docs:
        with atomic_writer(path) as f:
            f.write(to_json(doc) + "\n")
        summary.files.append(path)
        summary.written += 1
    return summary


def export_jsonl(records: Iterable[FeatureExplanations], path: str | Path) -> ExportSummary:
    """Our own records, one per line."""
    summary = ExportSummary(files=[Path(path)])
    with atomic_writer(path) as f:
        for record in unique(records):
            f.write(to_json(_checked(record.to_dict(), "explanation-record")) + "\n")
            summary.written += 1
    return summary
