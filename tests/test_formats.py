"""Schemas, validation and exports (Neuronpedia bulk layout, neuron-explainer, our JSONL)."""

from __future__ import annotations

import gzip
import json
import os
import re
from pathlib import Path

import pytest
import torch
from sae_selfexplain_plugin.adapters.cli import main

from sae_selfexplain_plugin import Explanation, FeatureExplanations, InputError
from sae_selfexplain_plugin.activation_examples import ActivationExamples
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


def examples_for(d_sae: int, sae: dict | None = None) -> ActivationExamples:
    """Feature f fires once, at 0.5 * (f + 1) on token "b" of the window ["a", "b", "c"]; feature 2 never."""
    top_values = torch.zeros(d_sae, 2, 3)
    for f in range(d_sae):
        if f != 2:
            top_values[f, 0] = torch.tensor([0.0, 0.5 * (f + 1), 0.25])
    tensors = {
        "top_tokens": torch.tensor([0, 1, 2]).repeat(d_sae, 2, 1),
        "top_values": top_values,
        "frequency": torch.tensor([0.0 if f == 2 else 0.01 * (f + 1) for f in range(d_sae)]),
        "pool_tokens": torch.zeros(1, 3, dtype=torch.long),
        "random_index": torch.full((d_sae, 1), -1),
    }
    return ActivationExamples(tensors, {0: "a", 1: "b", 2: "c"}, sae)


def source_folder(root):
    return root / "v1" / "gemma-3-270m" / "6-res-test"


def test_the_export_imports_into_neuronpedias_tables_twice_without_change(tmp_path):
    import sqlite3

    from neuronpedia_db import counts, database, import_dataset

    records = [record(i) for i in (3, 1, 2)]
    export_neuronpedia(records, tmp_path, **NP)
    folder = source_folder(tmp_path)
    db = database()
    import_dataset(db, folder)
    once = counts(db)
    assert once == {"Model": 1, "SourceSet": 1, "Source": 1, "Neuron": 3, "Activation": 0, "Explanation": 3}
    import_dataset(db, folder)  # a re-import is a no-op: deterministic ids, ON CONFLICT DO NOTHING
    assert counts(db) == once
    row = db.execute('SELECT description, "authorId", "typeName" FROM "Explanation" WHERE "index" = \'1\'').fetchone()
    assert row == ("a fruit", "u1", None)
    # the constraints are real: an author Neuronpedia does not know, or a row without an id, fails the import
    export_neuronpedia(records, tmp_path / "x", author_id="nobody", model_layers=18)
    with pytest.raises(sqlite3.IntegrityError):
        import_dataset(database(), source_folder(tmp_path / "x"))
    without_id = folder / "explanations" / "batch-0.jsonl.gz"
    lines = [json.loads(x) for x in gzip.decompress(without_id.read_bytes()).splitlines()]
    without_id.write_bytes(gzip.compress("".join(json.dumps({k: v for k, v in x.items() if k != "id"}) + "\n"
                                                 for x in lines).encode()))  # fmt: skip
    with pytest.raises(sqlite3.IntegrityError, match="NOT NULL"):
        import_dataset(database(), folder)


def test_a_clean_database_imports_the_export_with_its_top_contexts_public(tmp_path):
    """Neuronpedia's import route (mirrored: tests/neuronpedia_db.py) on a database with no user and no config,
    given only the export: create_author.sql, then the route."""
    import sqlite3

    from neuronpedia_db import NoSuchKey, counts, database, import_dataset

    records = [record(i) for i in (0, 1, 2, 3)]
    options = {**NP, "author_id": "cmauthor0000", "type_name": "np_self-explain", "explanation_model_name": "gemma"}
    summary = export_neuronpedia(records, tmp_path, examples=examples_for(4), **options)
    folder = source_folder(tmp_path)
    db = database(users=(), types=())
    with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):  # without the author's User row
        import_dataset(db, folder)
    db = database(users=(), types=())
    db.executescript((tmp_path / "create_author.sql").read_text())
    import_dataset(db, folder)
    once = counts(db)
    assert once == {"Model": 1, "SourceSet": 1, "Source": 1, "Neuron": 4, "Activation": 3, "Explanation": 4}
    for table in ("Model", "SourceSet", "Source"):
        assert db.execute(f'SELECT visibility FROM "{table}"').fetchall() == [("PUBLIC",)]
    top = db.execute('SELECT tokens, "values", "maxValue", "maxValueTokenIndex", "minValue", "creatorId" '
                     'FROM "Activation" WHERE "index" = \'1\'').fetchone()  # fmt: skip
    assert (json.loads(top[0]), json.loads(top[1]), *top[2:]) == (["a", "b", "c"], [0.0, 1.0, 0.25], 1.0, 1, 0.0,
                                                                   "cmauthor0000")  # fmt: skip
    assert db.execute('SELECT frac_nonzero, "maxActApprox" FROM "Neuron" WHERE "index" = \'3\'').fetchone() == (
        0.04, 2.0)  # fmt: skip
    assert db.execute('SELECT DISTINCT "typeName", "explanationModelName" FROM "Explanation"').fetchall() == [
        ("np_self-explain", "gemma")]  # fmt: skip
    db.executescript((tmp_path / "create_author.sql").read_text())  # both steps can be run again: no change
    import_dataset(db, folder)
    assert counts(db) == once
    assert {p.name for p in summary.files} >= {"create_author.sql", "eval_type.jsonl", "batch-0.jsonl.gz"}
    (tmp_path / "v1" / "config" / "eval_type.jsonl").unlink()  # the route's first step reads every config file
    with pytest.raises(NoSuchKey, match="eval_type"):
        import_dataset(database(users=("cmauthor0000",)), folder)


def test_visibility_is_neuronpedias_and_applies_to_model_source_set_and_source(tmp_path):
    from neuronpedia_db import database, import_dataset

    export_neuronpedia([record(1)], tmp_path, visibility="unlisted", **NP)
    db = database()
    import_dataset(db, source_folder(tmp_path))
    for table in ("Model", "SourceSet", "Source"):
        assert db.execute(f'SELECT visibility FROM "{table}"').fetchall() == [("UNLISTED",)]
    with pytest.raises(InputError, match="'secret' is not one of Neuronpedia's: public, unlisted, private"):
        export_neuronpedia([record(1)], tmp_path / "x", visibility="secret", **NP)


def test_the_export_refuses_mixed_saes_and_foreign_examples_before_writing(tmp_path):
    other = record(2, np_id="gemma-3-270m/7-res-test")
    with pytest.raises(InputError, match="mixes SAEs"):
        export_neuronpedia([record(1), other], tmp_path / "a", **NP)
    rerun = record(2)
    rerun.settings_hash = "other"
    with pytest.raises(InputError, match="mixes runs with different settings"):
        export_neuronpedia([record(1), rerun], tmp_path / "a", **NP)
    with pytest.raises(InputError, match=r"cover features 0\.\.3, but the results have feature 9"):
        export_neuronpedia([record(1), record(9)], tmp_path / "b", examples=examples_for(4), **NP)
    theirs = {"neuronpedia_id": "gemma-3-270m/6-res-test", "fingerprint": "f" * 16}
    mine = FeatureExplanations(1, record(1).candidates, 1, model_id="google/gemma-3-270m", settings_hash="abc",
                               sae={"neuronpedia_id": "gemma-3-270m/6-res-test", "fingerprint": "0" * 16})  # fmt: skip
    with pytest.raises(InputError, match=r"belong to .*weights f{16}.*not to .*weights 0{16}"):
        export_neuronpedia([mine], tmp_path / "c", examples=examples_for(4, theirs), **NP)
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize(
    "at", ["features", "explanations/batch-0.jsonl.gz", "../../config", "../../../create_author.sql"]
)
def test_the_export_never_writes_through_a_link_planted_in_its_folder(tmp_path, at):
    out, outside = tmp_path / "out", tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("mine")
    link = Path(os.path.normpath(source_folder(out) / at))
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(outside if "." not in link.name else outside / "keep")
    with pytest.raises(InputError, match=f"symbolic link {re.escape(str(link))} inside the output folder"):
        export_neuronpedia([record(1), record(2)], out, examples=examples_for(4), **NP)
    assert [p.name for p in outside.iterdir()] == ["keep"] and (outside / "keep").read_text() == "mine"
    assert [p for p in out.rglob("*") if p.is_file() and not p.is_symlink()] == []  # nothing written at all


def test_the_export_needs_an_author_and_the_model_size(tmp_path):
    with pytest.raises(InputError, match="--author-id"):
        export_neuronpedia([record(1)], tmp_path, author_id="")
    with pytest.raises(InputError, match="--model-layers"):
        export_neuronpedia([record(1)], tmp_path, author_id="u1")


def test_export_of_demo_results_finds_their_examples_and_model_size_as_upload_does(tmp_path, capsys):
    from neuronpedia_db import counts, database, import_dataset
    from sae_selfexplain_plugin.adapters.apps.demo_sae import demo_examples, load_demo_sae
    from sae_selfexplain_plugin.adapters.sae_lens import sae_identity

    sae = load_demo_sae()
    identity = sae_identity(sae)
    records = [
        FeatureExplanations(
            f,
            [Explanation(f, f"label {f}", 1.0, 2, "chat-meaning")],
            0,
            settings_hash="h",
            model_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            sae=identity,
        )
        for f in range(4)
    ]
    results, out = tmp_path / "r.jsonl", tmp_path / "np"
    export_jsonl(records, results)
    argv = ["export", "--results", str(results), "--format", "neuronpedia", "--out", str(out), "--author-id", "me"]
    assert main(argv) == 0  # no --examples, no --model-layers
    printed = capsys.readouterr().out
    assert "with activation examples; visibility PUBLIC" in printed and "create_author.sql" in printed
    model, source = sae.cfg.metadata.neuronpedia_id.split("/")
    folder = out / "v1" / model / source
    assert json.loads((folder / "model.jsonl").read_text())["layers"] == 30  # SmolLM2-135M's blocks
    db = database(users=(), types=())
    db.executescript((out / "create_author.sql").read_text())
    import_dataset(db, folder)
    examples = demo_examples()
    assert counts(db)["Activation"] == sum(len(examples[f].top) for f in range(4)) > 0
    density = dict(db.execute('SELECT "index", frac_nonzero FROM "Neuron"').fetchall())
    assert density == {str(f): pytest.approx(examples[f].frequency, abs=1e-8) for f in range(4)}
    assert all(d > 0 for d in density.values())


def test_export_takes_the_model_size_from_a_checkpoint_or_an_embedded_model(tmp_path):
    from sae_selfexplain_plugin.adapters.cli.results import _model_blocks

    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 7}))

    def size(model_name, model_id="x/y"):
        return _model_blocks([FeatureExplanations(1, [], model_id=model_id, sae={"model_name": model_name})])

    assert size("google/gemma-3-270m") == 18 and size("SmolLM2-135M-Instruct") == 30
    assert size("nobody/unknown", model_id=str(tmp_path / "ckpt")) == 7  # the explaining model's checkpoint
    assert size("nobody/unknown") is None
