"""Whole-SAE throughput of `explain` on the default model and the demo SAE (`make bench-sae`).

    python benchmarks/bench_whole_sae.py [--features 4096] [--baseline-features 256] [--json out.json]

Both runs go through the `explain` pipeline (`explain_sae`: results store, activation records), same process:
1. before: the settings `explain` used before prefix caching and one generation per feature (every scale
   generated, metric sweep measured, no prefix cache), on the first `--baseline-features` latents (a whole
   SAE would take over an hour; its rate is per feature, so a sample gives it);
2. now: `explain`'s defaults (WHOLE_SAE_CONFIG, prefix cache on) on the first `--features` latents.
Then the chosen labels of the sample are compared, and the machine's fp32 matmul speed is printed beside the
absolute figures (machines here differ up to 10x; the ratio is what carries over).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from machine import matmul_gflops
from sae_selfexplain_plugin.adapters.apps.demo_sae import load_demo_sae
from sae_selfexplain_plugin.adapters.apps.whole_sae import explain_sae, stored_records
from sae_selfexplain_plugin.adapters.backends.embedded import load_backend

from sae_selfexplain_plugin import SelfExplainConfig
from sae_selfexplain_plugin.config import WHOLE_SAE_CONFIG
from sae_selfexplain_plugin.store import ResultsStore


def run(sae: Any, backend: Any, features: list[int], config: SelfExplainConfig, folder: Path) -> dict[str, Any]:
    store = ResultsStore(folder / "results.db")
    summary = explain_sae(sae, "demo", backend, features, config, store)
    records = {r.feature_id: r for r in stored_records(store, backend.model_id, "demo", summary.settings_hash)}
    store.close()
    return {
        "features": len(features),
        "seconds": summary.seconds,
        "features_per_min": len(features) / summary.seconds * 60,
        "labels": {f: (r.chosen.text if r.chosen else None) for f, r in records.items()},
        "flagged": sum(1 for r in records.values() if r.flags),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", type=int, default=4096, help="latents explained with today's defaults")
    p.add_argument("--baseline-features", type=int, default=256, help="latents explained the way it was before")
    p.add_argument("--json")
    args = p.parse_args(argv)
    gflops = matmul_gflops()
    sae, backend = load_demo_sae(), load_backend()
    before_config = SelfExplainConfig()  # explain's settings before: every scale generated, sweep measured
    print(
        f"{backend.model_id}, demo SAE ({sae.cfg.d_sae} latents), torch threads {torch.get_num_threads()}, "
        f"fp32 matmul {gflops:.0f} GFLOPS",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        run(sae, backend, [0, 1], before_config, Path(tmp) / "warm-up")  # first-call costs out of the timings
        backend.prefixes.enabled = False
        before = run(sae, backend, list(range(args.baseline_features)), before_config, Path(tmp) / "before")
        backend.prefixes.enabled = True
        print(f"before: {before['features']} latents in {before['seconds']:.0f}s", flush=True)
        now = run(sae, backend, list(range(args.features)), WHOLE_SAE_CONFIG, Path(tmp) / "now")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    shared = [f for f in before["labels"] if f in now["labels"]]
    labelled = [f for f in shared if before["labels"][f] is not None]  # flagged latents had no label before
    same = sum(1 for f in labelled if before["labels"][f] == now["labels"][f])
    ratio = now["features_per_min"] / before["features_per_min"]
    print(f"\n{'':52s} {'latents':>8s} {'seconds':>8s} {'features/min':>12s}")
    for name, r in (("before (every scale, sweep, no prefix cache)", before), ("now (explain defaults)", now)):
        print(f"{name:52s} {r['features']:8d} {r['seconds']:8.0f} {r['features_per_min']:12.1f}")
    minutes = sae.cfg.d_sae / now["features_per_min"]
    print(f"now / before: {ratio:.2f}x features/min; the whole SAE at this rate: {minutes:.1f} min")
    print(
        f"chosen labels: {same} of {len(labelled)} the same; {len(shared) - len(labelled)} more latents had none "
        "before (flagged not self-explainable by the sweep, which now runs only on request)"
    )
    print(f"peak RSS {peak:.2f} GB")
    if args.json:
        out = {k: {kk: vv for kk, vv in v.items() if kk != "labels"} for k, v in (("before", before), ("now", now))}
        out.update(ratio=ratio, same_labels=same, labelled=len(labelled), peak_rss_gb=peak, matmul_gflops=gflops)
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
