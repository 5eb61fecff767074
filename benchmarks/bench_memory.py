"""Peak memory of a whole-SAE run against its size (`make bench-memory`): flat in the number of features?

    python benchmarks/bench_memory.py [--model gemma-3-270m] [--features 250,1000]

Saves a random TopK SAE (SAELens format) for the model, then runs `sae-selfexplain explain` on the first N
features in a fresh process per N (policy knee, generate chosen: results stream to the store batch by
batch) and reports each process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig
from sae_selfexplain_plugin.adapters.backends.embedded import EMBEDDED_MODELS, ensure_cached

# The CLI in a child process that reports its own peak RSS as its last stderr line.
CHILD = (
    "import resource, sys\n"
    "from sae_selfexplain_plugin.adapters.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
    "raise SystemExit(code)\n"
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--features", default="250,1000")
    args = p.parse_args(argv)
    spec = EMBEDDED_MODELS[args.model]
    from transformers import AutoConfig

    d_model = AutoConfig.from_pretrained(ensure_cached(spec)).hidden_size
    n_max = max(int(n) for n in args.features.split(","))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TopKSAEConfig(d_in=d_model, d_sae=n_max, k=32)
        cfg.metadata.model_name, cfg.metadata.hook_name = spec.hf_id, "blocks.6.hook_resid_post"
        sae = TopKSAE(cfg)
        torch.manual_seed(0)
        with torch.no_grad():
            sae.W_dec.copy_(torch.randn_like(sae.W_dec))
        sae.save_model(Path(tmp) / "sae")
        for n in (int(n) for n in args.features.split(",")):
            out = Path(tmp) / f"r{n}.jsonl"
            cmd = [sys.executable, "-c", CHILD]
            cmd += ["explain", "--sae", str(Path(tmp) / "sae"), "--model", args.model, "--features", f"0-{n - 1}"]
            cmd += ["--out", str(out), "--policy", "knee", "--generate", "chosen"]
            start = time.perf_counter()
            done = subprocess.run(cmd, check=True, capture_output=True, text=True)
            seconds = time.perf_counter() - start
            peak_gb = int(done.stderr.strip().splitlines()[-1]) / 2**20  # the child's own ru_maxrss, KiB
            rows.append({"features": n, "peak_rss_gb": round(peak_gb, 3), "seconds": round(seconds, 1)})
            print(f"{n:5d} features: peak RSS {peak_gb:.2f} GB, {seconds:.0f}s", flush=True)
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
