"""Schemas, validation and exports (Neuronpedia bulk layout, neuron-explainer, our JSONL)."""

from __future__ import annotations

import gzip
import json

import pytest
from sae_selfexplain_plugin.adapters.cli import main

from sae_selfexplain_plugin import Explanation, FeatureExplanations, InputError
from sae_selfexplain_plugin.export import export_jsonl, export_neuron_explainer, export_neuronpedia
from sae_selfexplain_plugin.files import OutputError
from sae_selfexplain_plugin.formats import detect, read_documents, schema, validate, validate_file


def record(feature, text="a fruit", np_id="gemma-3-270m/6-res-test"):
    cands = [
        Explanation(feature, "generic", 1.0, 2, "identity"),
        Explanation(feature, text, 4.0, 2, "identity"),
    ]
    sae = {"neuronpedia_id": np_id} if np_id else {}
    return FeatureExplanations(
        feature, cands, chosen_index=1, model_id="google/gemma-3-270m", settings_hash="abc", sae=sae
    )


def test_schemas_are_draft_2020_12_and_valid():
    from jsonschema import Draft202012Validator

    for name in ("explanation-record", "neuronpedia-explanation", "neuronpedia-upload-batch", "neuron-explainer"):
        s = schema(name)
        assert s["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        Draft202012Validator.check_schema(s)


def test_our_record_validates_and_violations_have_paths():
    doc = record(3).to_dict()
    assert validate(doc) == []
    doc["candidates"][1]["scale"] = -1
    doc["feature_id"] = "3"
    problems = validate(doc)
    assert {p.path for p in problems} == {"$.feature_id", "$.candidates[1].scale"}


NP = {"author_id": "u1", "model_layers": 18}


def test_neuronpedia_export_layout_and_lines(tmp_path):
    records = [record(i) for i in (2050, 5, 1024, 0)] + [record(7, text="   ")]
    summary = export_neuronpedia(records, tmp_path, **NP)
    assert summary.written == 4 and summary.skipped == [7]
    folder = tmp_path / "v1" / "gemma-3-270m" / "6-res-test" / "explanations"
    assert sorted(p.name for p in folder.iterdir()) == ["batch-0.jsonl.gz"]
    lines = [json.loads(x) for x in gzip.decompress((folder / "batch-0.jsonl.gz").read_bytes()).splitlines()]
    assert [x["index"] for x in lines] == ["0", "5", "1024", "2050"]  # ordered, strings
    assert lines[0]["modelId"] == "gemma-3-270m" and lines[0]["layer"] == "6-res-test"
    assert (
        lines[0]["description"] == "a fruit" and lines[0]["authorId"] == "u1" and "explanationModelName" not in lines[0]
    )
    assert validate_file(folder / "batch-0.jsonl.gz") == (4, [])


def test_neuronpedia_batches_hold_1024_lines(tmp_path):
    export_neuronpedia((record(i) for i in range(1030)), tmp_path, **NP)
    folder = tmp_path / "v1" / "gemma-3-270m" / "6-res-test" / "explanations"
    sizes = [len(gzip.decompress(p.read_bytes()).splitlines()) for p in sorted(folder.iterdir())]
    assert sizes == [1024, 6]


def test_neuronpedia_ids_must_come_from_somewhere(tmp_path):
    with pytest.raises(InputError, match="--model-id and --source-id"):
        export_neuronpedia([record(1, np_id=None)], tmp_path, **NP)
    summary = export_neuronpedia([record(1, np_id=None)], tmp_path, model_id="m", source_id="3-x", **NP)
    assert summary.files[-1].parts[-4:-1] == ("m", "3-x", "explanations")


def test_index_accepted_as_int_on_read_but_not_negative():
    line = {"id": "sx1", "modelId": "m", "layer": "1-x", "index": 5, "description": "d", "authorId": "u1"}
    assert validate(line) == []
    assert validate({**line, "index": "-5"}) and validate({**line, "index": "05"})
    assert validate({**line, "description": "x" * 513})[0].path == "$.description"


def test_neuron_explainer_never_fakes_scores(tmp_path):
    summary = export_neuron_explainer([record(9)], tmp_path, layer_index=6)
    doc = json.loads(summary.files[0].read_text())
    assert summary.files[0].relative_to(tmp_path).as_posix() == "explanations/6/9.jsonl"
    assert doc["neuron_id"] == {"layer_index": 6, "neuron_index": 9, "dataclass_name": "NeuronId"}
    sim = doc["scored_explanations"][0]["scored_simulation"]
    assert sim["ev_correlation_score"] is None and sim["scored_sequence_simulations"] == []
    assert detect(doc) == "neuron-explainer" and validate(doc) == []


def test_upload_batch_rules_beyond_json_schema():
    act = {"tokens": ["a", "b"], "values": [0.1, 0.2]}
    feature = {"index": 1, "activations": [act], "explanations": [{"text": "t"}]}
    body = {"modelId": "m", "source": "1-x", "features": [feature, dict(feature)]}
    assert [p.message for p in validate(body)] == ["duplicate index 1"]
    body["features"] = [{**feature, "activations": [{"tokens": ["a"], "values": [1, 2]}]}]
    assert validate(body)[0].message == "tokens and values differ in length"
    body["features"] = [feature] * 0
    assert validate(body)[0].path == "$.features"  # at least one feature


def test_malformed_and_truncated_jsonl(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(record(1).to_dict()) + "\n" + '{"feature_id": 2, "cand')
    with pytest.raises(InputError, match=r"bad.jsonl line 2: malformed or truncated JSON"):
        list(read_documents(bad))
    gz = tmp_path / "cut.jsonl.gz"
    lines = "".join(json.dumps({"n": i, "h": hash(str(i))}) + "\n" for i in range(2000)).encode()
    data = gzip.compress(lines)
    gz.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="cannot read"):
        list(read_documents(gz))


def test_validate_command(tmp_path, capsys):
    good = tmp_path / "good.jsonl"
    export_jsonl([record(1), record(2)], good)
    assert main(["validate", str(good)]) == 0
    assert "2 documents, all valid" in capsys.readouterr().out
    doc = record(3).to_dict()
    doc["chosen_index"] = "one"
    (tmp_path / "bad.jsonl").write_text(json.dumps(doc) + "\n")
    assert main(["validate", str(tmp_path / "bad.jsonl")]) == 1
    assert "line 1: $.chosen_index" in capsys.readouterr().out


def test_export_command_round_trip(tmp_path, capsys):
    results = tmp_path / "r.jsonl"
    export_jsonl([record(4), record(2)], results)
    assert main(["export", "--results", str(results), "--format", "neuronpedia", "--out", str(tmp_path / "np"),
                 "--author-id", "u1", "--model-layers", "18"]) == 0  # fmt: skip
    assert "2 explanations written" in capsys.readouterr().out
    assert main(["export", "--results", str(results), "--format", "neuron-explainer", "--out", str(tmp_path)]) == 2
    assert "--layer-index" in capsys.readouterr().err


def test_unwritable_export_target(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="writable"):
        export_jsonl([record(1)], blocker / "out.jsonl")


def test_chosen_index_out_of_range_is_a_violation():
    doc = record(1).to_dict()
    doc["chosen_index"] = 5
    assert [(v.path, v.message) for v in validate(doc)] == [
        ("$.chosen_index", "5 is out of range: the record has 2 candidates")
    ]


def test_the_export_imports_into_neuronpedias_tables_twice_without_change(tmp_path):
    import sqlite3

    from neuronpedia_db import counts, database, import_dataset

    records = [record(i) for i in (3, 1, 2)]
    export_neuronpedia(records, tmp_path, **NP)
    folder = tmp_path / "v1" / "gemma-3-270m" / "6-res-test"
    db = database()
    import_dataset(db, folder)
    once = counts(db)
    assert once == {"Model": 1, "SourceSet": 1, "Source": 1, "Neuron": 3, "Explanation": 3}
    import_dataset(db, folder)  # a re-import is a no-op: deterministic ids, ON CONFLICT DO NOTHING
    assert counts(db) == once
    row = db.execute('SELECT description, "authorId", "typeName" FROM "Explanation" WHERE "index" = \'1\'').fetchone()
    assert row == ("a fruit", "u1", None)
    # the constraints are real: an author Neuronpedia does not know, or a row without an id, fails the import
    export_neuronpedia(records, tmp_path / "x", author_id="nobody", model_layers=18)
    with pytest.raises(sqlite3.IntegrityError):
        import_dataset(database(), tmp_path / "x" / "v1" / "gemma-3-270m" / "6-res-test")
    without_id = folder / "explanations" / "batch-0.jsonl.gz"
    lines = [json.loads(x) for x in gzip.decompress(without_id.read_bytes()).splitlines()]
    without_id.write_bytes(gzip.compress("".join(json.dumps({k: v for k, v in x.items() if k != "id"}) + "\n"
                                                 for x in lines).encode()))  # fmt: skip
    with pytest.raises(sqlite3.IntegrityError, match="NOT NULL"):
        import_dataset(database(), folder)


def test_the_export_needs_an_author_and_the_model_size(tmp_path):
    with pytest.raises(InputError, match="--author-id"):
        export_neuronpedia([record(1)], tmp_path, author_id="")
    with pytest.raises(InputError, match="--model-layers"):
        export_neuronpedia([record(1)], tmp_path, author_id="u1")
