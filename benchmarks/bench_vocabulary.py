"""The vocabulary probe against `explain`, per whole SAE, on the default model and the demo SAE
(`make bench-vocabulary`).

    python benchmarks/bench_vocabulary.py [--sample 256] [--json out.json]

1. explain: `explain`'s defaults (WHOLE_SAE_CONFIG, the shipped adapter, prefix cache) on the first
   `--sample` latents; its rate is per feature, so the whole SAE's time is the sample's times d_sae / sample;
2. probe: `vocabulary_labels` for every latent of the SAE at once (one pass over the vocabulary's word-start
   tokens, whatever the number of latents).
Same process; the machine's fp32 matmul speed is printed beside the absolute figures (machines here differ
up to 10x; the ratio is what carries over).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_whole_sae import run
from machine import matmul_gflops
from sae_selfexplain_plugin.adapters.apps.demo_sae import load_demo_sae
from sae_selfexplain_plugin.adapters.backends.embedded import load_backend
from sae_selfexplain_plugin.adapters.sae_lens import AUTO, vocabulary_labels, with_adapter

from sae_selfexplain_plugin.config import WHOLE_SAE_CONFIG
from sae_selfexplain_plugin.vocabulary import probe_size


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sample", type=int, default=256, help="latents explained to measure explain's rate")
    p.add_argument("--json")
    args = p.parse_args(argv)
    gflops = matmul_gflops()
    sae, backend = load_demo_sae(), load_backend()
    d_sae = sae.cfg.d_sae
    config = with_adapter(WHOLE_SAE_CONFIG, AUTO, sae, backend)
    print(
        f"{backend.model_id}, demo SAE ({d_sae} latents), adapter {config.adapter is not None}, "
        f"torch threads {torch.get_num_threads()}, fp32 matmul {gflops:.0f} GFLOPS",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        run(sae, backend, [0, 1], config, Path(tmp) / "warm-up")  # first-call costs out of the timings
        sample = run(sae, backend, list(range(2, 2 + args.sample)), config, Path(tmp) / "sample")["seconds"]
    explain_whole = sample * d_sae / args.sample
    print(f"explain: {args.sample} latents in {sample:.1f}s -> the whole SAE {explain_whole:.0f}s", flush=True)
    start = time.perf_counter()
    probed = vocabulary_labels(sae, backend, list(range(d_sae)))
    probe = time.perf_counter() - start
    labelled = sum(1 for tokens in probed if tokens)
    print(f"probe: {probe_size(backend.tokenizer)} tokens for all {d_sae} latents in {probe:.1f}s; {labelled} labelled")
    print(f"whole SAE, explain / probe: {explain_whole / probe:.1f}x")
    if args.json:
        out = {"explain_sample_s": sample, "sample": args.sample, "explain_whole_s": explain_whole, "probe_s": probe}
        out.update(d_sae=d_sae, labelled=labelled, ratio=explain_whole / probe, matmul_gflops=gflops)
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
