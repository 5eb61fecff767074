"""Shards of one `explain` run (`--shard K/N`), as Slurm array tasks run them, and `merge` of their stores."""

from __future__ import annotations

import hashlib
import re
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import pytest
from sae_selfexplain_plugin.adapters.cli import main
from test_pipeline import D_SAE, assets, explain_args, read_jsonl  # noqa: F401 (assets: a fixture)

from sae_selfexplain_plugin import FeatureExplanations, InputError
from sae_selfexplain_plugin.shards import Shard, merge_stores, parse_shard, shard_features
from sae_selfexplain_plugin.store import ResultsStore, StoreError


@pytest.mark.parametrize(("n", "count", "block"), [(48, 3, 4), (48, 5, 4), (10, 4, 3), (3, 8, 2), (0, 2, 4)])
def test_shards_are_whole_batches_that_cover_the_run_once(n, count, block):
    features = list(range(100, 100 + n))
    parts = [shard_features(features, Shard(k, count), block) for k in range(count)]
    assert [f for part in parts for f in part] == features  # in order, each once
    blocks = [len(part) // block for part in parts]
    assert max(blocks) - min(blocks) <= 1  # as even as whole blocks go
    for part in parts[:-1]:
        assert len(part) % block == 0  # only the run's last batch may be short, as in one run


@pytest.mark.parametrize("spec", ["1", "4/4", "-1/3", "a/b", "0/0", "1/2/3", ""])
def test_bad_shard_specs_name_the_form(spec):
    with pytest.raises(InputError, match=r"K/N|0\.\.N-1"):
        parse_shard(spec)


def _shard_cli(assets, out, k, n, *extra):  # noqa: F811
    """The command a Slurm array task would run (the template is the tests' own, so run it in-process)."""
    return explain_args(assets, out, "--shard", f"{k}/{n}", *extra)


def _sorted_lines(path):
    return sorted(Path(path).read_text().splitlines())


def test_shards_merged_equal_one_run(assets, tmp_path):  # noqa: F811
    one = tmp_path / "one.jsonl"
    assert main(explain_args(assets, one)) == 0
    parts = [tmp_path / f"part-{k}.jsonl" for k in range(3)]
    for k, part in enumerate(parts):
        assert main(_shard_cli(assets, part, k, 3)) == 0
    assert sorted(f for p in parts for f in (r.feature_id for r in read_jsonl(p))) == list(range(D_SAE))
    merged = tmp_path / "merged.db"
    assert main(["merge", *(str(p.with_suffix(".db")) for p in parts), "--out", str(merged)]) == 0
    exported = tmp_path / "merged.jsonl"
    assert main(["export", "--store", str(merged), "--format", "jsonl", "--out", str(exported)]) == 0
    assert _sorted_lines(exported) == _sorted_lines(one)  # texts, scales, scores: the same bytes
    with ResultsStore(merged, read_only=True) as store:
        assert store.shards() == {"count": 3, "indices": [0, 1, 2], "run": store.shards()["run"]}
    page = tmp_path / "page.html"
    assert main(["dashboard", str(merged), "--out", str(page)]) == 0 and "feature" in page.read_text()
    assert main(["upload", "--store", str(merged), "--dry-run", "--source", "2-test"]) == 0


def test_shard_runs_as_separate_processes_merge_to_one_run(assets, tmp_path):  # noqa: F811
    """As a Slurm job array runs them: each shard its own process (run together), then one merge."""
    cli = [*explain_args(assets, tmp_path / "x.jsonl", "--features", "0-15")]
    cli[cli.index("--template") + 1] = "identity"  # a child process does not have the tests' templates
    one = tmp_path / "one.jsonl"
    assert main([*cli[: cli.index("--out")], "--out", str(one), *cli[cli.index("--out") + 2 :]]) == 0

    def task(k: int) -> subprocess.Popen[bytes]:
        args = [*cli[: cli.index("--out")], "--out", str(tmp_path / f"p{k}.jsonl"), *cli[cli.index("--out") + 2 :]]
        command = [sys.executable, "-m", "sae_selfexplain_plugin.adapters.cli", *args, "--shard", f"{k}/2"]
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    tasks = [task(0), task(1)]
    for t in tasks:
        _, err = t.communicate(timeout=300)
        assert t.returncode == 0, err.decode()[-2000:]
    merged = tmp_path / "m.db"
    report = merge_stores([tmp_path / "p1.db", tmp_path / "p0.db"], merged)
    assert (report.records, report.missing, report.differing) == (16, [], [])
    with ResultsStore(merged, read_only=True) as store:
        records = [r.to_json() for _, r in store.records()]
    assert sorted(records) == sorted(r.to_json() for r in read_jsonl(one))


def test_a_shard_resumes_its_own_store_and_refuses_another_shards(assets, tmp_path, capsys):  # noqa: F811
    part = tmp_path / "p.jsonl"
    assert main(_shard_cli(assets, part, 1, 2, "--features", "0-11")) == 0
    capsys.readouterr()
    assert main(_shard_cli(assets, part, 1, 2, "--features", "0-11", "--resume")) == 0
    assert "0 features explained" in capsys.readouterr().out
    # 4 features a batch (--batch-size 4, one kept scale): 3 blocks, the second shard takes the last two
    assert [r.feature_id for r in read_jsonl(part)] == list(range(4, 12))
    assert main(_shard_cli(assets, part, 0, 2, "--features", "0-11", "--resume")) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "give each shard its own store" in err and '"indices": [1]' in err


def _stores(assets, tmp_path, n=2, *extra):  # noqa: F811
    paths = []
    for k in range(n):
        out = tmp_path / f"s{k}.jsonl"
        assert main(_shard_cli(assets, out, k, n, "--features", "0-7", *extra)) == 0
        paths.append(out.with_suffix(".db"))
    return paths


def _digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_merge_refusals_leave_the_output_untouched(assets, tmp_path, capsys):  # noqa: F811
    good = _stores(assets, tmp_path / "good")
    out = tmp_path / "merged.db"
    assert main(["merge", *map(str, good), "--out", str(out)]) == 0
    before = _digest(out)
    other_settings = _stores(assets, tmp_path / "settings", 2, "--scales", "1,2")
    other_run = _stores(assets, tmp_path / "run", 3)  # cut differently: shards of another run
    not_a_store = tmp_path / "notes.db"
    not_a_store.write_text("not a database\n" * 100)
    cases = [
        ([good[0], other_settings[1]], "differ in the settings"),
        ([good[0], other_run[1]], "shard of 2 of run .* of 3"),
        ([good[0], not_a_store], "not a results store"),
        ([good[0], tmp_path / "absent.db"], "does not exist"),
        ([good[0], out], "same file as the input store"),
    ]
    for inputs, message in cases:
        capsys.readouterr()
        assert main(["merge", *map(str, inputs), "--out", str(out)]) == 2
        printed = " ".join(capsys.readouterr().err.split())
        assert "error:" in printed
        assert re.search(message, printed), printed
        assert _digest(out) == before  # untouched
    with pytest.raises(InputError, match="differ in the SAE"):
        merge_stores([good[0], _foreign_sae_store(tmp_path)], tmp_path / "never.db")
    assert not (tmp_path / "never.db").exists()


def _foreign_sae_store(tmp_path):
    path = tmp_path / "foreign.db"
    with closing(sqlite3.connect(tmp_path / "good" / "s0.db")) as con:
        model, settings = con.execute("SELECT model_id, settings_hash FROM explanations").fetchone()
    with ResultsStore(path) as store:
        record = FeatureExplanations(feature_id=0, candidates=[], model_id=model, settings_hash=settings)
        store.put([record], "another-sae@0123456789abcdef")
    return path


def test_merge_is_idempotent_and_keeps_the_first_input_where_two_differ(tmp_path):
    def store(path, texts, failed=()):
        with ResultsStore(path) as s:
            records = [FeatureExplanations.from_dict(_record(f, text)) for f, text in texts.items()]
            s.put(records, "sae@00")
            s.put_failed("m", "sae@00", "h", {f: "decoder row has NaN" for f in failed})
            s.mark_uploaded("https://np", "m", "src", [(0, "sha")])
        return path

    a = store(tmp_path / "a.db", {0: "cats", 1: "dogs"}, failed=[5, 1])
    b = store(tmp_path / "b.db", {1: "wolves", 2: "birds"}, failed=[5, 6])
    out = tmp_path / "m.db"
    report = merge_stores([a, b], out)
    assert (report.records, report.failed, report.differing, report.shards) == (3, 2, [1], None)
    with ResultsStore(out, read_only=True) as merged:
        assert {r.feature_id: r.text for _, r in merged.records()} == {0: "cats", 1: "dogs", 2: "birds"}
        assert set(merged.failed("m", "sae@00", "h")) == {5, 6}  # 1 was explained by a: not failed
        assert merged.uploaded("https://np", "m", "src") == {(0, "sha")}
    rows = _rows(out)
    merge_stores([a, b], out)  # again, over its own earlier output
    assert _rows(out) == rows
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def _record(feature, text):
    candidate = {"feature_id": feature, "layer": 2, "template": "t", "scale": 1.0, "text": text}
    return {"feature_id": feature, "model_id": "m", "settings_hash": "h", "chosen_index": 0, "candidates": [candidate]}


def _rows(path):
    with closing(sqlite3.connect(path)) as con:  # closed: an open connection keeps the store in use
        return [con.execute(f"SELECT * FROM {t} ORDER BY 1, 2, 3").fetchall() for t in ("explanations", "failed")]


def test_a_crash_mid_merge_keeps_the_previous_output(tmp_path, monkeypatch):
    a = tmp_path / "a.db"
    with ResultsStore(a) as s:
        s.put([FeatureExplanations(feature_id=0, candidates=[], model_id="m", settings_hash="h")], "sae@00")
    out = tmp_path / "m.db"
    merge_stores([a], out)
    before = _digest(out)

    def crash(self, rows):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ResultsStore, "put_raw", crash)
    with pytest.raises(OSError, match="previous file, if any, is unchanged"):
        merge_stores([a], out)
    assert _digest(out) == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_merge_refuses_to_replace_a_file_that_is_not_a_store(tmp_path):
    a = tmp_path / "a.db"
    with ResultsStore(a) as s:
        s.put([FeatureExplanations(feature_id=0, candidates=[], model_id="m", settings_hash="h")], "sae@00")
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n" * 200)
    with pytest.raises(StoreError, match="not a results store"):
        merge_stores([a], notes)
    assert notes.read_text() == "my notes\n" * 200


def test_merge_reports_missing_shards(assets, tmp_path, capsys):  # noqa: F811
    stores = _stores(assets, tmp_path, 3)
    capsys.readouterr()
    assert main(["merge", str(stores[0]), str(stores[2]), "--out", str(tmp_path / "m.db")]) == 0
    printed = capsys.readouterr().out
    assert "shards 0, 2 of 3" in printed and "missing shards: 1 of 3" in printed
