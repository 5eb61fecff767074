"""Write results in Neuronpedia's bulk-export layout, OpenAI's neuron-explainer layout, or our JSONL.

Every file is written atomically (files.atomic_writer) and every line is validated against its schema.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .activation_examples import ActivationExamples
from .errors import InputError
from .files import atomic_writer, inside, safe_component, to_json
from .formats import NEURONPEDIA_BATCH, neuronpedia_ids, to_neuron_explainer, to_neuronpedia_line, validate
from .results import FeatureExplanations


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
) -> ExportSummary:
    """Neuronpedia's dataset layout, as its importer (app/api/admin/import/route.ts) reads it:
    `{out_dir}/v1/{modelId}/{sourceId}/` with model.jsonl, sourceset.jsonl, source.jsonl,
    features/batch-{N}.jsonl.gz (Neuron rows) and explanations/batch-{N}.jsonl.gz (Explanation rows), 1,024
    lines a batch, by index. Every row carries the NOT NULL columns its table has no default for; with
    `examples`, Neuron rows carry the feature's density and maximum activation."""
    if not author_id or not author_id.strip():
        raise InputError(
            "the Neuronpedia export needs --author-id: the id of the Neuronpedia user the explanations belong to "
            "(its User table; every Explanation row must name one)."
        )
    summary = ExportSummary()
    groups: dict[tuple[str, str], list[tuple[FeatureExplanations, dict[str, Any]]]] = {}
    for record in unique(records):
        model, source = neuronpedia_ids(record, model_id, source_id)
        ids = safe_component(model, "the Neuronpedia model id"), safe_component(source, "the Neuronpedia source id")
        line = to_neuronpedia_line(record, *ids, author_id, type_name, explanation_model_name)
        if line is None:
            summary.skipped.append(record.feature_id)
            continue
        groups.setdefault(ids, []).append((record, _checked(line, "neuronpedia-explanation")))
    for (model, source), rows in groups.items():
        rows.sort(key=lambda r: r[0].feature_id)
        folder = inside(out_dir, "v1", model, source)
        first = rows[0][0]
        _write_jsonl(folder / "model.jsonl", [_model_row(model, first, author_id, model_layers)])
        _write_jsonl(folder / "sourceset.jsonl", [_source_set_row(model, source, first, author_id)])
        _write_jsonl(folder / "source.jsonl", [{"id": source, "modelId": model, "setName": set_name(source),
                                                "creatorId": author_id}])  # fmt: skip
        neurons = [_neuron_row(model, source, r.feature_id, author_id, examples) for r, _ in rows]
        summary.files += _write_batches(folder / "features", neurons)
        summary.files += _write_batches(folder / "explanations", [line for _, line in rows])
        summary.written += len(rows)
    return summary


def set_name(source_id: str) -> str:
    """The source set a source belongs to, as Neuronpedia derives it ("6-res-jb" -> "res-jb")."""
    return source_id[source_id.index("-") + 1 :].split("__")[0] if "-" in source_id else source_id


def _model_row(model: str, record: FeatureExplanations, author_id: str, layers: int | None) -> dict[str, Any]:
    if layers is None:
        raise InputError(
            "the Neuronpedia export writes model.jsonl, which needs the explained model's number of blocks: pass "
            "--model-layers (e.g. 30 for SmolLM2-135M, 18 for Gemma 3 270M)."
        )
    owner = record.model_id.split("/")[0] if "/" in record.model_id else "unknown"
    return {"id": model, "displayName": model, "displayNameShort": model, "creatorId": author_id, "owner": owner,
            "layers": layers, "neuronsPerLayer": int(record.sae.get("d_sae") or 0)}  # fmt: skip


def _source_set_row(model: str, source: str, record: FeatureExplanations, author_id: str) -> dict[str, Any]:
    hook = record.sae.get("hook_name", "?")
    return {"modelId": model, "name": set_name(source), "creatorId": author_id, "creatorName": author_id,
            "description": f"SAE on {hook}, explained by self-explanation (sae-selfexplain)"}  # fmt: skip


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


def _write_batches(folder: Path, lines: list[dict[str, Any]]) -> list[Path]:
    paths = []
    for n, start in enumerate(range(0, len(lines), NEURONPEDIA_BATCH)):
        path = folder / f"batch-{n}.jsonl.gz"
        with atomic_writer(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
            for line in lines[start : start + NEURONPEDIA_BATCH]:
                gz.write((to_json(line) + "\n").encode())
        paths.append(path)
    return paths


def export_neuron_explainer(
    records: Iterable[FeatureExplanations], out_dir: str | Path, layer_index: int
) -> ExportSummary:
    """`{out_dir}/explanations/{layer_index}/{feature}.jsonl`, one NeuronSimulationResults line each."""
    summary = ExportSummary()
    for record in unique(records):
        doc = _checked(to_neuron_explainer(record, layer_index), "neuron-explainer")
        path = inside(out_dir, "explanations", str(layer_index), f"{record.feature_id}.jsonl")
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
