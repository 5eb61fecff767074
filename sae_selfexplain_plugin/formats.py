"""Output formats, their JSON Schemas (shipped in `schemas/`, draft 2020-12), validation and converters.

- explanation-record: our own record (FeatureExplanations.to_dict()), one per JSONL line;
- neuronpedia-explanation: a line of Neuronpedia's bulk export
  (`v1/{modelId}/{sourceId}/explanations/batch-{N}.jsonl.gz`, 1,024 lines a batch, ordered by index);
- neuronpedia-upload-batch: the body of Neuronpedia's `POST /api/feature/upload-batch`;
- neuron-explainer: OpenAI's NeuronSimulationResults.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator, FormatChecker

from .errors import InputError
from .files import MAX_LINE_CHARS, capped_lines, parse_json
from .results import FeatureExplanations, public_model_name

SCHEMA_NAMES = ("explanation-record", "neuronpedia-explanation", "neuronpedia-upload-batch", "neuron-explainer")
NEURONPEDIA_BATCH = 1024
MAX_DESCRIPTION = 512


@cache
def schema(name: str) -> dict[str, Any]:
    """The shipped JSON Schema called `name`."""
    if name not in SCHEMA_NAMES:
        raise InputError(f"unknown schema {name!r}; choose one of {', '.join(SCHEMA_NAMES)}.")
    text = files("sae_selfexplain_plugin").joinpath(f"schemas/{name}.schema.json").read_text(encoding="utf-8")
    loaded: dict[str, Any] = json.loads(text)
    return loaded


@dataclass(frozen=True)
class Violation:
    """One schema violation: where (file line, JSON path) and what."""

    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line is not None else ""
        return f"{where}{self.path}: {self.message}"


def detect(doc: Any) -> str:
    """Which of our schemas a document claims to follow, from its keys."""
    if isinstance(doc, dict):
        if "feature_id" in doc and "candidates" in doc:
            return "explanation-record"
        if "features" in doc and "source" in doc:
            return "neuronpedia-upload-batch"
        if "neuron_id" in doc or "scored_explanations" in doc:
            return "neuron-explainer"
        if "modelId" in doc and "description" in doc:
            return "neuronpedia-explanation"
    raise InputError("cannot tell which format this document is; pass --schema with one of " + ", ".join(SCHEMA_NAMES))


def _json_path(parts: Any) -> str:
    out = "$"
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else f".{p}"
    return out


def validate(doc: Any, name: str | None = None, line: int | None = None) -> list[Violation]:
    """Every violation of `doc` against the schema `name` (detected when None)."""
    name = name or detect(doc)
    validator = Draft202012Validator(schema(name), format_checker=FormatChecker())
    try:
        found = [
            Violation(line, _json_path(e.absolute_path), e.message)
            for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
        ]
    except RecursionError:
        return [Violation(line, "$", "nested too deeply to check")]
    if name == "neuronpedia-upload-batch" and isinstance(doc, dict):
        found += _upload_batch_rules(doc, line)
    if name == "explanation-record" and isinstance(doc, dict) and not found:
        found += _record_rules(doc, line)
    return found


def _record_rules(doc: dict[str, Any], line: int | None) -> list[Violation]:
    """Rules of our record that JSON Schema cannot express."""
    chosen, n = doc.get("chosen_index"), len(doc["candidates"])
    if chosen is not None and chosen >= n:
        return [Violation(line, "$.chosen_index", f"{chosen} is out of range: the record has {n} candidates")]
    return []


def checked_record(doc: Any, where: str) -> FeatureExplanations:
    """A FeatureExplanations from a document read back (a JSONL line, a store row), checked by the same rules
    as `validate`; InputError naming `where` and the first problem otherwise."""
    problems = validate(doc, "explanation-record")
    if problems:
        raise InputError(
            f"{where} is not a valid explanation record ({problems[0].path}: {problems[0].message}); "
            "`sae-selfexplain validate FILE` lists every problem."
        )
    return FeatureExplanations.from_dict(doc)


def _upload_batch_rules(doc: dict[str, Any], line: int | None) -> list[Violation]:
    """Rules of the upload-batch endpoint that JSON Schema cannot express."""
    found = []
    seen: set[Any] = set()
    for i, feature in enumerate(doc.get("features") or []):
        if not isinstance(feature, dict):
            continue
        if feature.get("index") in seen:
            found.append(Violation(line, f"$.features[{i}].index", f"duplicate index {feature.get('index')}"))
        seen.add(feature.get("index"))
        for j, act in enumerate(feature.get("activations") or []):
            if isinstance(act, dict) and len(act.get("tokens") or []) != len(act.get("values") or []):
                found.append(Violation(line, f"$.features[{i}].activations[{j}]", "tokens and values differ in length"))
        for j, explanation in enumerate(feature.get("explanations") or []):
            text = explanation.get("text") if isinstance(explanation, dict) else None
            if isinstance(text, str) and utf16_length(text) > MAX_DESCRIPTION:
                where = f"$.features[{i}].explanations[{j}].text"
                found.append(
                    Violation(line, where, f"{utf16_length(text)} UTF-16 code units, more than {MAX_DESCRIPTION}")
                )
    return found


def utf16_length(text: str) -> int:
    """A string's length as JavaScript (and so Neuronpedia's limits) counts it: UTF-16 code units."""
    return len(text.encode("utf-16-le")) // 2


def cut_utf16(text: str, limit: int = MAX_DESCRIPTION) -> str:
    """The longest prefix of `text` within `limit` UTF-16 code units (never half a surrogate pair)."""
    if utf16_length(text) <= limit:
        return text
    out, used = [], 0
    for ch in text:
        used += utf16_length(ch)
        if used > limit:
            break
        out.append(ch)
    return "".join(out)


def read_documents(path: str | Path) -> Iterator[tuple[int | None, Any]]:
    """(line number, document) for a .json file, or each line of a .jsonl / .jsonl.gz file."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            if path.name.endswith((".jsonl", ".jsonl.gz")):
                for n, text in capped_lines(f, str(path)):
                    if text.strip():
                        yield n, _parse(text, path, n)
            else:
                text = f.read(MAX_LINE_CHARS + 1)
                if len(text) > MAX_LINE_CHARS:
                    raise InputError(
                        f"{path} is longer than {MAX_LINE_CHARS:,} characters, the most one JSON document may "
                        "hold; write large results as JSONL, one record a line."
                    )
                yield None, _parse(text, path, None)
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {path} ({e}); is it complete and of the right kind?") from e


def _parse(text: str, path: Path, line: int | None) -> Any:
    where = f"{path} line {line}" if line is not None else str(path)
    return parse_json(text, where)


def validate_file(path: str | Path, name: str | None = None) -> tuple[int, list[Violation]]:
    """(number of documents, every violation with its line and JSON path) for a file."""
    documents = 0
    found: list[Violation] = []
    for line, doc in read_documents(path):
        documents += 1
        found += validate(doc, name, line)
    return documents, found


# --- converters -------------------------------------------------------------------------------------


def neuronpedia_ids(record: FeatureExplanations, model_id: str | None, source_id: str | None) -> tuple[str, str]:
    """(modelId, sourceId): given explicitly, else from the SAE's `neuronpedia_id` ("model/source")."""
    np_id = record.sae.get("neuronpedia_id")
    if np_id and "/" in np_id:
        default_model, default_source = np_id.split("/", 1)
        return model_id or default_model, source_id or default_source
    if model_id and source_id:
        return model_id, source_id
    raise InputError(
        f"feature {record.feature_id}: the SAE has no neuronpedia_id (SAELens sets it for registry SAEs); "
        "pass --model-id and --source-id (e.g. gemma-3-270m and 12-gemmascope-2-res-16k)."
    )


def to_neuronpedia_line(
    record: FeatureExplanations,
    model_id: str,
    source_id: str,
    author_id: str,
    type_name: str | None,
    explanation_model_name: str | None,
) -> dict[str, Any] | None:
    """A row of Neuronpedia's Explanation table for the chosen explanation; None when there is none.

    Its importer inserts rows as given (`ON CONFLICT DO NOTHING`), so the row carries every NOT NULL column
    without a database default: `id` (derived from the row's content: importing the same export twice
    changes nothing) and `authorId` (a Neuronpedia User id). `typeName` and `explanationModelName` are
    foreign keys into tables Neuronpedia fills from its own config, so they are left out unless given."""
    chosen = record.chosen
    if chosen is None or not chosen.text.strip():
        return None
    notes: dict[str, Any] = {
        "method": "self-explanation",
        "scale": chosen.scale,
        "scale_mode": chosen.scale_mode,
        "layer": chosen.layer,
        "template": chosen.template,
        "explained_by": public_model_name(record.model_id),
    }
    if chosen.adapter is not None:
        notes["adapter"] = chosen.adapter
    description = cut_utf16(chosen.text.strip())
    key = json.dumps([model_id, source_id, record.feature_id, description, author_id])
    line: dict[str, Any] = {
        "id": "sx" + hashlib.sha256(key.encode()).hexdigest()[:23],  # cuid-like: 25 characters
        "modelId": model_id,
        "layer": source_id,
        "index": str(record.feature_id),
        "description": description,
        "authorId": author_id,
        "notes": json.dumps(notes, allow_nan=False),
    }
    if type_name:
        line["typeName"] = type_name
    if explanation_model_name:
        line["explanationModelName"] = explanation_model_name
    return line


def to_neuron_explainer(record: FeatureExplanations, layer_index: int) -> dict[str, Any]:
    """NeuronSimulationResults for the chosen explanation; no simulation was run, so scores are null."""
    chosen = record.chosen
    explanations = [] if chosen is None else [chosen.text]
    return {
        "neuron_id": {"layer_index": layer_index, "neuron_index": record.feature_id, "dataclass_name": "NeuronId"},
        "scored_explanations": [
            {
                "explanation": text,
                "scored_simulation": {
                    "scored_sequence_simulations": [],
                    "ev_correlation_score": None,
                    "rsquared_score": None,
                    "absolute_dev_explained_score": None,
                    "dataclass_name": "ScoredSimulation",
                },
                "dataclass_name": "ScoredExplanation",
            }
            for text in explanations
        ],
        "dataclass_name": "NeuronSimulationResults",
    }
