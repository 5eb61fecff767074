"""Where the time of `SelfExplainer.explain` goes: phases by wall clock, then torch's profiler by operator.

python benchmarks/profile_explain.py [--model gemma-3-270m] [--features 16] [--template identity]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from typing import Any

import torch
from sae_selfexplain_plugin.adapters.backends.embedded import load_backend

from sae_selfexplain_plugin import SelfExplainConfig, SelfExplainer
from sae_selfexplain_plugin.word_recovery import load_words, single_token_words, word_vectors


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--features", type=int, default=16)
    p.add_argument("--template")
    args = p.parse_args(argv)
    backend: Any = load_backend(args.model)
    words = single_token_words(backend.tokenizer, load_words())[: args.features]
    directions = word_vectors(backend, words, round(backend.n_layers / 3), in_context=True)
    explainer = SelfExplainer(backend, SelfExplainConfig(template=args.template))
    explainer.explain(directions[:2])  # warm-up

    # Phases: wrap the backend's step methods and the tokenizer's decode with timers.
    spent: dict[str, float] = defaultdict(float)

    def timed(name: str, fn: Any) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[name] += time.perf_counter() - start

        return wrapper

    backend.prefill = timed("prefill (prompt pass + metric probes)", backend.prefill)
    backend.step = timed("decode steps", backend.step)
    backend.select_rows = timed("dropping finished rows", backend.select_rows)
    tok_decode = backend.tokenizer.decode
    backend.tokenizer.decode = timed("tokenizer.decode (stop checks)", tok_decode)
    start = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        explainer.explain(directions)
    total = time.perf_counter() - start
    print(f"explain: {args.features} features x 8 scales in {total:.1f}s (under the profiler)")
    for name, seconds in sorted(spent.items(), key=lambda kv: -kv[1]):
        print(f"  {name:40s} {seconds:6.2f}s  {seconds / total:5.1%}")
    print(f"  {'other (Python, metrics, bookkeeping)':40s} {total - sum(spent.values()):6.2f}s")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
