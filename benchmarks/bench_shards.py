"""One `explain` process against the same run cut into shards (`make bench-shards`; docs/pipeline.md).

    python benchmarks/bench_shards.py [--features 4096] [--shards 2] [--no-ray] [--json out.json]

On the demo SAE and its model (explain's defaults), each as the user would run it, wall time from the
command's start (process start, model load and export included):
1. one process with every core's threads;
2. `--shard K/N`: N processes at once, each with cores/N threads (a Slurm array on one node), then `merge`;
3. `--ray --shards N --cpus-per-shard cores/N`: a local Ray instance (started and stopped by the command);
4. the shards again one after another, each with every core's threads (as N machines like this one would).
Records are compared after sorting: 4 with 1 byte for byte (same threads per process: the same bytes
expected), 3 with 2 likewise; 2 and 3 with 1 by text and scale, and by the largest difference of any number
(fewer threads per process add floats in another order: differences in the last printed digit). Ray's own
start-up (ray.init, one empty task's round trip, shutdown) is timed apart. The machine's fp32
matmul speed is printed beside the absolute figures; the ratios are what carries over.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from machine import matmul_gflops
from sae_selfexplain_plugin.adapters.apps.demo_sae import DEMO_SAE_DIR

CLI = [sys.executable, "-m", "sae_selfexplain_plugin.adapters.cli"]


def timed(commands: list[list[str]], threads: int) -> float:
    """Run `commands` at once, each with `threads` torch threads; wall seconds until all have finished."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    running = [subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for c in commands]
    for process in running:
        _, err = process.communicate()
        if process.returncode != 0:
            raise SystemExit(f"{' '.join(process.args)} failed:\n{err.decode()[-3000:]}")  # type: ignore[arg-type]
    return time.perf_counter() - start


def merged(d: Path, name: str, shards: int, threads: int) -> float:
    """`merge` the stores d/NAME0.db ... into d/NAME.db (its seconds), then export it to d/NAME.jsonl."""
    stores = [str(d / f"{name}{k}.db") for k in range(shards)]
    seconds = timed([[*CLI, "merge", *stores, "--out", str(d / f"{name}.db")]], threads)
    timed(
        [[*CLI, "export", "--store", str(d / f"{name}.db"), "--format", "jsonl", "--out", str(d / f"{name}.jsonl")]], 1
    )
    return seconds


def sorted_lines(path: Path) -> list[str]:
    return sorted(path.read_text().splitlines())


def compare(a: Path, b: Path) -> dict[str, Any]:
    """Two results files: the same bytes?, features whose texts, scales or choice differ, their largest number gap."""
    left, right = sorted_lines(a), sorted_lines(b)
    differing, gap = abs(len(left) - len(right)), 0.0
    for x, y in zip(left, right):
        rx, ry = json.loads(x), json.loads(y)
        keys = [(c["text"], c["scale"]) for c in rx["candidates"]], [(c["text"], c["scale"]) for c in ry["candidates"]]
        differing += keys[0] != keys[1] or rx["chosen_index"] != ry["chosen_index"]
        gap = max(gap, largest_gap(rx, ry))
    return {"same_bytes": left == right, "features_with_other_texts": differing, "largest_number_gap": gap}


def largest_gap(x: Any, y: Any) -> float:
    if isinstance(x, dict) and isinstance(y, dict):
        return max((largest_gap(x[k], y.get(k)) for k in x), default=0.0)
    if isinstance(x, list) and isinstance(y, list):
        return max((largest_gap(a, b) for a, b in zip(x, y)), default=0.0)
    if isinstance(x, float) and isinstance(y, float):
        return abs(x - y)
    return 0.0


def ray_startup() -> float:
    import ray

    start = time.perf_counter()
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.get(ray.remote(lambda: None).remote())
    ray.shutdown()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", type=int, default=4096, help="the first N latents of the demo SAE")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--no-ray", action="store_true", help="skip the Ray run")
    p.add_argument("--no-same-threads", action="store_true", help="skip the shards run one after another")
    p.add_argument("--json")
    args = p.parse_args(argv)
    cores = os.cpu_count() or 1
    per_shard = max(1, cores // args.shards)
    print(f"{cores} cores, fp32 matmul {matmul_gflops():.0f} GFLOPS; demo SAE, first {args.features} latents")
    result: dict[str, Any] = {"cores": cores, "features": args.features, "shards": args.shards}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        base = [*CLI, "explain", "--sae", str(DEMO_SAE_DIR), "--features", f"0-{args.features - 1}"]
        result["one_process_s"] = timed([[*base, "--out", str(d / "one.jsonl")]], cores)
        print(f"one process x {cores} threads: {result['one_process_s']:.1f} s")
        shards = [[*base, "--shard", f"{k}/{args.shards}", "--out", str(d / f"p{k}.jsonl")] for k in range(args.shards)]
        seconds = timed(shards, per_shard) + merged(d, "p", args.shards, cores)
        result["shards_s"] = seconds
        result["shards_vs_one"] = compare(d / "p.jsonl", d / "one.jsonl")
        print(
            f"{args.shards} shards x {per_shard} threads at once, then merge: {seconds:.1f} s "
            f"({seconds / result['one_process_s']:.2f}x one process); vs one process: {result['shards_vs_one']}"
        )
        if not args.no_ray:
            result["ray_startup_s"] = ray_startup()
            ray = [*base, "--ray", "--shards", str(args.shards), "--cpus-per-shard", str(per_shard)]
            result["ray_s"] = timed([[*ray, "--out", str(d / "ray.jsonl")]], cores)
            result["ray_vs_shards"] = compare(d / "ray.jsonl", d / "p.jsonl")
            print(
                f"Ray, {args.shards} tasks x {per_shard} CPUs (local instance): {result['ray_s']:.1f} s "
                f"({result['ray_s'] / result['one_process_s']:.2f}x one process); vs the shards: "
                f"{result['ray_vs_shards']}; Ray's own start-up and shutdown: {result['ray_startup_s']:.1f} s"
            )
        if not args.no_same_threads:
            seconds = sum(timed([[*c[:-1], str(d / f"q{k}.jsonl")]], cores) for k, c in enumerate(shards))
            result["sequential_shards_s"] = seconds + merged(d, "q", args.shards, cores)
            result["sequential_shards_vs_one"] = compare(d / "q.jsonl", d / "one.jsonl")
            print(
                f"{args.shards} shards x {cores} threads one after another, then merge: "
                f"{result['sequential_shards_s']:.1f} s; vs one "
                f"process: {result['sequential_shards_vs_one']}"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
