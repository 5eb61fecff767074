"""Write results in Neuronpedia's bulk-export layout, OpenAI's neuron-explainer layout, or our JSONL.

Every file is written atomically (files.atomic_writer) and every line is validated against its schema.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError
from .files import atomic_writer, inside, safe_component, to_json
from .formats import NEURONPEDIA_BATCH, neuronpedia_ids, to_neuron_explainer, to_neuronpedia_line, validate
from .results import FeatureExplanations, short_model_name

DEFAULT_TYPE_NAME = "sae-selfexplain"


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
    model_id: str | None = None,
    source_id: str | None = None,
    type_name: str | None = DEFAULT_TYPE_NAME,
    explanation_model_name: str | None = None,
) -> ExportSummary:
    """`{out_dir}/v1/{modelId}/{sourceId}/explanations/batch-{N}.jsonl.gz`, 1,024 lines a batch, by index."""
    summary = ExportSummary()
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for record in unique(records):
        model, source = neuronpedia_ids(record, model_id, source_id)
        ids = safe_component(model, "the Neuronpedia model id"), safe_component(source, "the Neuronpedia source id")
        model_name = explanation_model_name or short_model_name(record.model_id) or None
        line = to_neuronpedia_line(record, *ids, type_name, model_name)
        if line is None:
            summary.skipped.append(record.feature_id)
            continue
        groups.setdefault(ids, []).append(_checked(line, "neuronpedia-explanation"))
    for (model, source), lines in groups.items():
        lines.sort(key=lambda d: int(d["index"]))
        folder = inside(out_dir, "v1", model, source, "explanations")
        for n, start in enumerate(range(0, len(lines), NEURONPEDIA_BATCH)):
            path = folder / f"batch-{n}.jsonl.gz"
            with atomic_writer(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
                for line in lines[start : start + NEURONPEDIA_BATCH]:
                    gz.write((to_json(line) + "\n").encode())
            summary.files.append(path)
        summary.written += len(lines)
    return summary


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
