"""Throughput of self-explanation against the naive loop and the raw-generation limit (`make bench`).

    python benchmarks/bench_explain.py [--model smollm2-135m-instruct] [--features 64] [--naive-rows 48] [--json F]

Workload: `features` directions (residuals of real words read at a third of the depth, like SAE features there)
x 8 relative scales, greedy, at most 24 new tokens, the model's default template. Side by side:
1. naive: one hooked `model.generate` per (feature, scale), as users write it by hand (a forward pre-hook
   that patches the placeholder on the prompt pass). It is slow, so it runs on `--naive-rows` rows and its
   per-row cost is multiplied out (printed as such);
2. ours: `SelfExplainer.explain` (the public API), every scale generated, with and without the prefix KV
   cache (its prompt-pass time is printed too); and the cheap paths (`generate="chosen"`, keep_top 1 and 3);
3. limit: plain batched `model.generate`, no hooks, same prompts, batch 64, exactly as many new tokens as
   ours generated on average per row (min_new_tokens = max_new_tokens = that mean).
Then a scaling table for ours (16, 64, 256 features). Peak RSS comes from `resource` (the process's max).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from typing import Any

import torch
from machine import matmul_gflops
from sae_selfexplain_plugin.adapters.backends.embedded import DEFAULT_MODEL, load_backend

from sae_selfexplain_plugin import SelfExplainConfig, SelfExplainer
from sae_selfexplain_plugin.word_recovery import load_words, single_token_words, word_vectors

SCALES = (0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run_ours(explainer: SelfExplainer, directions: torch.Tensor) -> dict[str, float]:
    backend: Any = explainer.backend
    generate, counted, prompt_s = backend.generate, [0], [0.0]

    def counting(request: Any) -> Any:  # count the tokens each row really generated (EOS included)
        result = generate(request)
        counted[0] += sum(len(t) + (r == "eos") for t, r in zip(result.tokens, result.stop_reasons))
        return result

    def timing(method: Any) -> Any:  # time the prompt passes: generation prefill and metric probes
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                prompt_s[0] += time.perf_counter() - start

        return timed

    backend.generate, backend.prefill, backend.probe = counting, timing(backend.prefill), timing(backend.probe)
    try:
        start = time.perf_counter()
        records = explainer.explain(directions)
        seconds = time.perf_counter() - start
    finally:
        del backend.generate, backend.prefill, backend.probe
    rows = sum(len(r.candidates) for r in records)
    return {"seconds": seconds, "features": len(records), "rows": rows, "tokens": counted[0], "prompt_s": prompt_s[0]}


def run_naive(explainer: SelfExplainer, directions: torch.Tensor, n_rows: int) -> dict[str, float]:
    backend = explainer.backend
    model, tok = backend.model, backend.tokenizer
    prompt = explainer.prompt
    ids = torch.tensor([prompt.input_ids])
    cfg = explainer.config
    rows = [(f, s) for f in range(len(directions)) for s in cfg.scales][:n_rows]
    tokens = 0
    start = time.perf_counter()
    for f, scale in rows:
        vector = explainer.injected_vectors(directions[f : f + 1], torch.tensor([scale]))[0]

        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], vector: torch.Tensor = vector) -> Any:
            hidden = args[0] if args else kwargs["hidden_states"]
            if hidden.shape[1] > 1:  # the prompt pass only
                hidden = hidden.clone()
                hidden[:, list(prompt.placeholder_positions)] = vector
            return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})

        handle = backend.layers[cfg.layer].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=cfg.max_new_tokens, do_sample=False,
                stop_strings=list(prompt.stop_strings) or None, tokenizer=tok, pad_token_id=tok.pad_token_id,
            )  # fmt: skip
        finally:
            handle.remove()
        tokens += out.shape[1] - ids.shape[1]
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "rows": len(rows), "tokens": tokens}


def run_limit(explainer: SelfExplainer, n_rows: int, new_tokens: int, batch: int = 64) -> dict[str, float]:
    model, tok = explainer.backend.model, explainer.backend.tokenizer
    ids = torch.tensor([explainer.prompt.input_ids] * batch)
    start = time.perf_counter()
    done = 0
    while done < n_rows:
        b = min(batch, n_rows - done)
        model.generate(
            ids[:b], attention_mask=torch.ones_like(ids[:b]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, pad_token_id=tok.pad_token_id,
        )  # fmt: skip
        done += b
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "rows": n_rows, "tokens": n_rows * new_tokens}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--features", type=int, default=64)
    p.add_argument("--naive-rows", type=int, default=48, help="rows the naive loop runs (its cost is multiplied out)")
    p.add_argument("--scaling", default="16,64,256", help="feature counts for the scaling table ('' to skip)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--template", help="prompt template (default: the model's default)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    backend = load_backend(args.model)
    words = single_token_words(backend.tokenizer, load_words())
    source = round(backend.n_layers / 3)
    needed = max([args.features, *[int(n) for n in args.scaling.split(",") if n]])
    directions = word_vectors(backend, (words * (needed // len(words) + 1))[:needed], source, in_context=True)
    config = SelfExplainConfig(scales=SCALES, max_new_tokens=24, template=args.template)
    explainer = SelfExplainer(backend, config)
    explainer.explain(directions[:2])  # warm-up: reference norm, first-call overheads
    work = directions[: args.features]
    gflops = matmul_gflops()
    print(f"{backend.model_id}: {args.features} features x {len(SCALES)} scales, <= 24 new tokens, greedy, "
          f"template {explainer.prompt.template}, torch threads {torch.get_num_threads()}, "
          f"fp32 matmul {gflops:.0f} GFLOPS", flush=True)  # fmt: skip

    results: dict[str, Any] = {"matmul_gflops": gflops}
    ours = results["ours"] = run_ours(explainer, work)
    mean_tokens = max(1, round(ours["tokens"] / ours["rows"]))
    naive = results["naive"] = run_naive(explainer, work, args.naive_rows)
    limit = results["limit"] = run_limit(explainer, ours["rows"], mean_tokens)
    backend.prefixes.enabled = False
    before = results["ours, before prefix caching"] = run_ours(explainer, work)
    backend.prefixes.enabled = True
    results["ours, metrics=False"] = run_ours(SelfExplainer(backend, config.replace(metrics=False)), work)
    for keep in (1, 3):
        cheap = SelfExplainer(backend, config.replace(generate="chosen", keep_top=keep))
        results[f"ours, generate chosen (top {keep})"] = run_ours(cheap, work)

    naive_row_s = naive["seconds"] / naive["rows"]
    naive_fpm = 60 / (naive_row_s * len(SCALES))
    rows = {"naive (hooked generate per row)": (naive_fpm, naive["tokens"] / naive["seconds"], float("nan"))}
    for name in [k for k in results if k.startswith("ours")]:
        r = results[name]
        rows[name] = (r["features"] / r["seconds"] * 60, r["tokens"] / r["seconds"], r["prompt_s"])
    limit_tps = limit["tokens"] / limit["seconds"]
    rows["limit (plain batched generate)"] = (float("nan"), limit_tps, float("nan"))
    print(f"\n{'':48s} {'features/min':>12s} {'tokens/s':>9s} {'prompt passes s':>15s}")
    for name, (per_min, tps, prompt_s) in rows.items():
        print(f"{name:48s} {per_min:12.1f} {tps:9.1f} {prompt_s:15.1f}")
    fpm = {name: values[0] for name, values in rows.items()}
    ratios = {
        "ours/naive (features/min)": fpm["ours"] / naive_fpm,
        "ours/before prefix caching (features/min)": fpm["ours"] / fpm["ours, before prefix caching"],
        "prompt-pass time, ours/before prefix caching": ours["prompt_s"] / before["prompt_s"],
        "ours/limit (tokens/s)": rows["ours"][1] / limit_tps,
        "ours metrics=False/limit (tokens/s)": rows["ours, metrics=False"][1] / limit_tps,
        "generate chosen top-1/ours (features/min)": fpm["ours, generate chosen (top 1)"] / fpm["ours"],
        "generate chosen top-3/ours (features/min)": fpm["ours, generate chosen (top 3)"] / fpm["ours"],
    }
    print(f"\nnaive ran {naive['rows']} rows ({naive_row_s:.2f} s/row), multiplied out to {len(SCALES)} rows/feature")
    for k, v in ratios.items():
        print(f"{k:46s} {v:6.2f}x")
    results["ratios"] = ratios

    scaling = []
    for n in [int(n) for n in args.scaling.split(",") if n]:
        r = run_ours(explainer, directions[:n])
        scaling.append({"features": n, "seconds": r["seconds"], "s_per_feature": r["seconds"] / n})
        print(f"scaling: {n:4d} features {r['seconds']:7.1f}s  {r['seconds'] / n:.3f} s/feature", flush=True)
    results["scaling"] = scaling
    results["peak_rss_gb"] = peak_rss_gb()
    print(f"peak RSS {results['peak_rss_gb']:.2f} GB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
