"""`explain --ray` on a local Ray instance with two workers: the tiny model, two shards, merged."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from sae_selfexplain_plugin.adapters.cli import main
from test_pipeline import D_SAE, assets, explain_args, read_jsonl  # noqa: F401 (assets: a fixture)

from sae_selfexplain_plugin import SelfExplainConfig
from sae_selfexplain_plugin.store import ResultsStore

ray = pytest.importorskip("ray", reason="Ray is the optional extra [ray]; make test installs it")


@pytest.fixture(scope="module")
def local_ray():
    """A local instance of 2 CPUs: 2 workers (one task each); small object store."""
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 2**20, log_to_driver=False)
    yield
    ray.shutdown()


def _cli(assets, out, *extra):  # noqa: F811
    cli = explain_args(assets, out, "--features", "0-23", *extra)
    cli[cli.index("--template") + 1] = "identity"  # Ray's workers do not have the tests' templates
    return cli


def _sorted_lines(path):
    return sorted(Path(path).read_text().splitlines())


def test_ray_shards_give_the_records_of_one_run(assets, tmp_path, local_ray, capsys):  # noqa: F811
    one = tmp_path / "one.jsonl"
    assert main(_cli(assets, one)) == 0
    out = tmp_path / "ray.jsonl"
    assert main(_cli(assets, out, "--ray", "--shards", "2")) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "explained by 2 Ray tasks" in printed and "merged 2 shard stores" in printed
    assert _sorted_lines(out) == _sorted_lines(one)
    shards = sorted(p.name for p in (tmp_path / "ray.db.shards").iterdir() if p.suffix == ".db")
    assert shards == ["shard-0-of-2.db", "shard-1-of-2.db"]

    # resume: a lost shard store is computed again, the other one is kept
    (tmp_path / "ray.db.shards" / "shard-1-of-2.db").unlink()
    assert main(_cli(assets, out, "--ray", "--shards", "2", "--resume")) == 0
    assert "by 1 Ray tasks" in " ".join(capsys.readouterr().out.split())
    assert _sorted_lines(out) == _sorted_lines(one)
    # the merged store is never replaced by a fresh run by mistake
    assert main(_cli(assets, out, "--ray", "--shards", "2")) == 2
    assert "pass --resume" in " ".join(capsys.readouterr().err.split())


def test_a_killed_worker_is_retried_by_ray(assets, tmp_path, local_ray):  # noqa: F811
    from sae_selfexplain_plugin.adapters.apps.ray_shards import explain_on_ray
    from sae_selfexplain_plugin.adapters.apps.whole_sae import explain_sae
    from sae_selfexplain_plugin.adapters.backends import load_model
    from sae_selfexplain_plugin.adapters.sae_lens import load_sae

    _, sae_dir = assets
    sae, key = load_sae(str(sae_dir))
    # one feature a batch and 24 new tokens: slow enough that the kill lands while the shard runs
    config = SelfExplainConfig(template="identity", scales=(1.0, 4.0), max_new_tokens=24, batch_size=2)
    starts: list[tuple[int, int]] = []

    def kill_first(shard: int, node: str, pid: int) -> None:
        if not starts:
            os.kill(pid, signal.SIGKILL)
        starts.append((shard, pid))

    model, features = str(assets[0]), list(range(D_SAE))
    advanced: list[int] = []
    run = explain_on_ray(
        sae, key, model, features, lambda sae, backend: config, tmp_path / "k.db", shards=2, on_start=kill_first,
        on_progress=advanced.append,
    )  # fmt: skip
    assert sum(advanced) == D_SAE  # the progress of the killed attempt is taken back when its shard starts over
    killed_shard, killed_pid = starts[0]
    retried = [pid for shard, pid in starts[1:] if shard == killed_shard]
    assert retried and retried[-1] != killed_pid  # Ray ran the shard again, on another worker
    assert run.merge.records == D_SAE and run.merge.missing == []
    with ResultsStore(tmp_path / "s.db") as single:  # the same run in this process, without Ray
        explain_sae(sae, key, load_model(model), features, config, single)
    assert _records(tmp_path / "k.db") == _records(tmp_path / "s.db")


def _records(store):
    with ResultsStore(store, read_only=True) as s:
        return sorted(r.to_json() for _, r in s.records())


def test_a_bad_model_fails_with_the_shard_named(assets, tmp_path, local_ray, capsys):  # noqa: F811
    cli = _cli(assets, tmp_path / "r.jsonl", "--ray", "--shards", "2")
    cli[cli.index("--model") + 1] = str(tmp_path)  # a folder without config.json
    assert main(cli) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "shard" in err and "not a transformers checkpoint" in err
    assert main([*cli, "--shard", "0/2"]) == 2
    assert "drop --shard" in " ".join(capsys.readouterr().err.split())
