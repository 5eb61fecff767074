"""`explain --ray` on a local Ray instance with two workers: the tiny model, two shards, merged."""

from __future__ import annotations

import os
import signal
import threading
import time
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
    config = SelfExplainConfig(template="identity", scales=(1.0, 4.0), max_new_tokens=8, batch_size=2)
    marker = tmp_path / "first-attempt"

    def configure(sae, backend):  # runs on the worker: the first attempt of one shard waits there to be killed
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return config
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        time.sleep(120)
        return config

    def kill_the_waiting_worker() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and not (marker.exists() and marker.read_text()):
            time.sleep(0.05)
        killed.append(int(marker.read_text()))
        os.kill(killed[0], signal.SIGKILL)

    killed: list[int] = []
    killer = threading.Thread(target=kill_the_waiting_worker)
    killer.start()
    model, features = str(assets[0]), list(range(D_SAE))
    advanced: list[int] = []
    run = explain_on_ray(
        sae, key, model, features, configure, tmp_path / "k.db", shards=2,
        on_progress=advanced.append,
    )  # fmt: skip
    killer.join()
    assert sum(advanced) == D_SAE  # the progress of the killed attempt is taken back when its shard starts over
    # the killed attempt's shard finished anyway: Ray ran it again, on another worker (its start report may
    # be lost with the worker, so the last start of each shard is what counts)
    assert killed and killed[0] not in {pid for _, pid in run.workers.values()}
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
