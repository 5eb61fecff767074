"""`demo`, `explain` and `contexts`: explaining features, and collecting their top-activating contexts."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from sae_selfexplain_plugin import (
    FeatureExplanations,
    SelfExplainConfig,
    SelfExplainer,
    SelfExplainError,
)
from sae_selfexplain_plugin.activation_examples import Context, FeatureExamples, score_split_path
from sae_selfexplain_plugin.config import WHOLE_SAE_CONFIG
from sae_selfexplain_plugin.dashboard import write_dashboard
from sae_selfexplain_plugin.files import check_writable
from sae_selfexplain_plugin.shards import parse_shard

from ..apps.contexts import DEFAULT_TOKENS, examples_beside
from ..apps.demo_sae import DEMO_SAES
from ..backends.embedded import DEFAULT_MODEL
from .common import (
    Interrupted,
    _add_adapter_option,
    _add_policy_options,
    _add_repeats_option,
    _embedder_or_none,
    _load,
    _positive,
    _probe_task,
    _progress,
    _status,
    _with_adapter,
    add_generation_options,
    add_model_option,
    command_inputs,
    config_from_args,
    console,
    parse_features,
)


def cmd_demo(args: argparse.Namespace) -> int:
    from sae_selfexplain_plugin.export import export_jsonl
    from sae_selfexplain_plugin.store import ResultsStore

    from ..apps.demo_sae import demo_examples, demo_model, load_demo_sae
    from ..apps.evaluation import score_records
    from ..apps.whole_sae import explain_sae, stored_records
    from ..sae_lens import store_key

    model, why = demo_model(args.model)
    if why:
        console.print(f"[dim]{why}[/dim]", soft_wrap=True, highlight=False)
    sae, examples = load_demo_sae(model=model), demo_examples(model)
    sae_key = store_key(sae, "demo")
    features = parse_features(args.features, sae.cfg.d_sae) if args.features else examples.live_features()[:16]
    config = config_from_args(args)
    backend = _load(model)
    config = _with_adapter(config, args, sae, backend)
    out = Path(args.out)
    store = ResultsStore(out / "results.db")
    how = (
        f"through the adapter {Path(str(config.adapter)).name}"
        if config.adapter is not None
        else f"each at {len(config.scales)} scales"
    )
    console.print(
        f"Explaining {len(features)} features of the demo SAE {sae_key} ({sae.cfg.metadata.hook_name}), "
        f"{how}, injected at block {config.layer}."
    )
    with _progress() as progress:
        task = progress.add_task("explaining features", total=len(features))
        summary = explain_sae(
            sae, sae_key, backend, features, config, store, on_batch=lambda n: progress.advance(task, n)
        )
    records = list(stored_records(store, backend.model_id, sae_key, summary.settings_hash, features))
    store.close()
    with _status("Scoring the chosen explanations...", "scored"):
        score_records(records, sae, backend, examples, _embedder_or_none())
    view = Console(width=max(Console().width, 120))
    for record in records:
        view.print(_feature_table(record, examples[record.feature_id]))
    export_jsonl(records, out / "results.jsonl")
    page = write_dashboard(records, out / "dashboard.html", examples=examples, config=config)
    view.print(
        f"* = the chosen explanation (policy {config.policy}). "
        f"{len(records)} features in {summary.seconds:.0f}s; results: {out / 'results.jsonl'}",
        markup=False,
    )
    view.print(f"dashboard: {page.resolve()}", markup=False)
    return 0


def _feature_table(record: FeatureExplanations, examples: FeatureExamples) -> Table:
    """One feature: its explanation at every scale beside the tokens and contexts it fires on."""
    tokens = ", ".join(repr(t) for t in examples.top_tokens())
    flag = "  NOT SELF-EXPLAINABLE (self-similarity never reaches the threshold)" if record.flags else ""
    title = f"feature {record.feature_id}  (fires on {examples.frequency:.2%} of tokens; top tokens: {tokens}){flag}"
    table = Table(title=Text(title), title_justify="left")  # Text: corpus tokens are not markup
    table.add_column("scale", justify="right")
    table.add_column("self-sim", justify="right")
    table.add_column("self-explanation")
    table.add_column("top activating contexts (peak in bold)")
    contexts = [_highlight(c) for c in examples.top[:3]]
    for j in range(max(len(record.candidates), len(contexts))):
        context = contexts[j] if j < len(contexts) else ""
        if j >= len(record.candidates):  # one explanation (an adapter), several contexts
            table.add_row("", "", "", context)
            continue
        candidate = record.candidates[j]
        mark = "* " if j == record.chosen_index else ""
        similarity = candidate.metrics.get("self_similarity")
        table.add_row(
            f"{mark}{candidate.scale:g}",
            "" if similarity is None else f"{similarity:.3f}",
            Text(candidate.text),  # model text is not markup
            context,
        )
    return table


def _highlight(context: Context) -> Text:
    peak = max(range(len(context.values)), key=context.values.__getitem__)
    text = Text()
    for i, token in enumerate(context.tokens):
        text.append(token.replace("\n", "⏎"), style="bold reverse" if i == peak else "")
    return text


def cmd_explain(args: argparse.Namespace) -> int:
    from sae_selfexplain_plugin.store import ResultsStore

    try:
        from ..apps.whole_sae import explain_sae, stored_records, take_shard
        from ..backends import load_model
        from ..sae_lens import load_sae
    except ImportError as e:
        raise SelfExplainError(f"`explain` needs SAELens ({e}): pip install 'sae-selfexplain[saelens]'.") from None

    shard = parse_shard(args.shard) if args.shard else None
    if args.ray is not None and (shard is not None or args.contexts):
        raise SelfExplainError(
            "--ray cuts the run into shards itself and its workers hold the model: drop --shard, and collect "
            "contexts with `sae-selfexplain contexts` (one machine) before or after."
        )
    store_path = Path(args.store) if args.store else Path(args.out).with_suffix(".db")
    inputs = command_inputs(args, **{"the results store": store_path})
    check_writable(args.out, "--out", inputs)
    if args.contexts:
        check_writable(examples_beside(args.out), "--out's activation examples", inputs)
        check_writable(score_split_path(examples_beside(args.out)), "--out's score split", inputs)
    with _status(f"Loading SAE {args.sae}...", "loaded the SAE"):
        sae, sae_key = load_sae(args.sae, device=args.device or "cpu")
    features = parse_features(args.features, sae.cfg.d_sae) if args.features else list(range(sae.cfg.d_sae))
    config = config_from_args(args)
    if args.ray is not None:
        return _explain_on_ray(args, sae, sae_key, features, config, store_path)
    store = ResultsStore(store_path)  # fail on an unwritable store before loading the model
    with _status("Loading the model...", "loaded the model"):
        backend = load_model(args.model, model_name=sae.cfg.metadata.model_name, device=args.device)
    config = _with_adapter(config, args, sae, backend)
    if shard is not None:
        features = take_shard(store, shard, features, config)
    try:
        with _progress() as progress:
            task = progress.add_task("explaining features", total=len(features))
            summary = explain_sae(
                sae, sae_key, backend, features, config, store, resume=args.resume,
                retry_failed=args.retry_failed, on_batch=lambda n: progress.advance(task, n),
                vocabulary=args.vocabulary,
                on_probe=_probe_task(progress, backend.tokenizer) if args.vocabulary else None,
            )  # fmt: skip
    except KeyboardInterrupt:
        stored = len(store.done(backend.model_id, sae_key, SelfExplainer(backend, config).settings_hash))
        store.close()
        raise Interrupted(f"interrupted; {stored} features stored in {store_path}, rerun with --resume.") from None
    from sae_selfexplain_plugin.export import export_jsonl

    records = stored_records(store, backend.model_id, sae_key, summary.settings_hash, features)
    n = export_jsonl(records, args.out).written
    store.close()
    if args.contexts:
        _collect_contexts(sae, backend, args.contexts, examples_beside(args.out), args.context_tokens, args.resume)
    rate = summary.explained / summary.seconds * 60 if summary.seconds else 0.0
    view = Console()
    view.print(
        f"{summary.explained} features explained in {summary.seconds:.0f}s ({rate:.0f} features/min), "
        f"{summary.skipped} already in the store; {n} records written to {args.out}; store: {store_path}",
        markup=False,
    )
    if summary.elsewhere:
        view.print(
            f"{summary.elsewhere} features were claimed by another run resuming this store; rerun with --resume "
            "once it has finished to write them all to --out.",
            markup=False,
        )
    if summary.failed:
        shown = "; ".join(f"{f}: {why}" for f, why in list(summary.failed.items())[:10])
        view.print(
            f"{len(summary.failed)} features could not be explained and were skipped ({shown}); they are recorded "
            "in the store, and --resume --retry-failed tries them again.",
            markup=False,
        )
    return 0


def _explain_on_ray(
    args: argparse.Namespace, sae: Any, sae_key: str, features: list[int], config: SelfExplainConfig, store: Path
) -> int:
    """`explain --ray`: shards as Ray tasks (apps/ray_shards.py), merged into the store, exported to --out."""
    from functools import partial

    from sae_selfexplain_plugin.export import export_jsonl
    from sae_selfexplain_plugin.store import ResultsStore

    from ..apps.ray_shards import explain_on_ray, shards_folder
    from ..apps.whole_sae import stored_records

    view = Console()
    with _progress() as progress:
        task = progress.add_task("explaining features (Ray)", total=len(features))
        run = explain_on_ray(
            sae, sae_key, args.model, features, partial(_with_adapter, config, args), store,
            address=args.ray or None, shards=args.shards, cpus_per_shard=args.cpus_per_shard,
            gpus_per_shard=args.gpus_per_shard, retries=args.ray_retries, resume=args.resume, device=args.device,
            vocabulary=args.vocabulary, on_progress=lambda n: progress.advance(task, n),
        )  # fmt: skip
    with ResultsStore(store, read_only=True) as merged:
        n = export_jsonl(stored_records(merged, run.model_id, sae_key, run.settings_hash, features), args.out).written
    rate = run.explained / run.seconds * 60 if run.seconds else 0.0
    kept = run.shards - len(run.computed)
    view.print(
        f"{run.explained} features explained by {len(run.computed)} Ray tasks in {run.seconds:.0f}s ({rate:.0f} "
        f"features/min){f', {kept} shards finished before' if kept else ''}; merged {run.shards} shard stores "
        f"({shards_folder(store)}) into {store}; {n} records written to {args.out}",
        markup=False,
    )
    if run.failed:
        shown = "; ".join(f"{f}: {why}" for f, why in list(run.failed.items())[:10])
        view.print(f"{len(run.failed)} features could not be explained and were skipped ({shown}).", markup=False)
    return 0


def _collect_contexts(sae: Any, backend: Any, corpus: str, out: Path, tokens: int, resume: bool) -> None:
    from ..apps.contexts import collect_split_contexts, corpus_texts

    read = [0]  # tokens this run read (a short corpus gives fewer than asked)

    def advance(n: int) -> None:
        read[0] += n
        progress.advance(task, n)

    with _progress() as progress:
        task = progress.add_task("top-activating contexts (explain and score splits)", total=2 * tokens)
        examples, score = collect_split_contexts(
            sae, backend, lambda: corpus_texts(corpus), out, max_tokens=tokens, resume=resume, progress=advance
        )
    Console().print(
        f"activation examples of {len(examples.live_features())} of {examples.d_sae} features (the others never "
        f"fired in the {read[0]:,} tokens read{' since the resumed checkpoint' if resume else ''}): {out}; "
        f"the score split ({len(score.live_features())} live), from other documents, for scorers only: "
        f"{score_split_path(out)}",
        markup=False,
    )


def cmd_contexts(args: argparse.Namespace) -> int:
    from ..backends import load_model
    from ..sae_lens import load_sae

    inputs = command_inputs(args)
    check_writable(args.out, "--out", inputs)
    check_writable(score_split_path(args.out), "--out's score split", inputs)
    sae, _ = load_sae(args.sae, device=args.device or "cpu")
    with _status("Loading the model...", "loaded the model"):
        backend = load_model(args.model, model_name=sae.cfg.metadata.model_name, device=args.device)
    _collect_contexts(sae, backend, args.corpus, Path(args.out), args.tokens, args.resume)
    return 0


def add_parsers(sub: Any) -> None:
    """Declare this module's commands on the top parser's subparsers."""
    demo = sub.add_parser("demo", help="explain features of a shipped demo SAE on its embedded model")
    demo.add_argument("--features", help="e.g. 0-15 or 3,7 (default: the first 16 live features)")
    demo.add_argument(
        "--model",
        choices=sorted(DEMO_SAES),
        help="the embedded model whose shipped demo SAE to explain (default: qwen2.5-coder-1.5b-instruct where "
        f"installed, else {DEFAULT_MODEL}; docs/models.md)",
    )
    # 16 new tokens: room for an adapter's list label, as eval and bench sae-latent (docs/adapters.md)
    add_generation_options(demo, max_new_tokens=16, template=False, layer=False)
    _add_policy_options(demo, policy="knee")  # the best measured policy (docs/scale_policies.md)
    _add_adapter_option(demo)
    _add_repeats_option(demo)
    demo.add_argument(
        "--out", default="out/demo", help="folder for results.db and results.jsonl (default: %(default)s)"
    )
    demo.set_defaults(func=cmd_demo)

    ex = sub.add_parser("explain", help="explain the features of a SAELens SAE; resumable")
    ex.add_argument("--sae", required=True, help="a SAELens SAE folder, or RELEASE:SAE_ID (needs the hub)")
    add_model_option(ex)
    ex.add_argument("--features", help="e.g. 0-1023, 1,5,9, or a file of indices (default: all)")
    ex.add_argument("--out", required=True, help="results JSONL, written atomically at the end")
    ex.add_argument("--store", help="SQLite results store (default: OUT with .db); committed per batch")
    ex.add_argument("--resume", action="store_true", help="skip features already in the store")
    ex.add_argument(
        "--shard",
        metavar="K/N",
        help="only shard K of N (0-based) of the features, in its own store; `merge` combines the shards' stores "
        "(docs/pipeline.md: past one machine)",
    )
    ex.add_argument(
        "--retry-failed", action="store_true", help="with --resume: try again the features a run had to skip"
    )
    ex.add_argument(
        "--vocabulary",
        action="store_true",
        help="also record each feature's vocabulary probe tokens (docs/vocabulary_probe.md; one pass over the "
        "vocabulary for all features)",
    )
    add_generation_options(ex, max_new_tokens=SelfExplainConfig().max_new_tokens)  # the library's, as sae.self_explain
    ex.add_argument("--batch-size", type=int, default=SelfExplainConfig().batch_size, help="rows per generate")
    _add_policy_options(ex, WHOLE_SAE_CONFIG)
    _add_adapter_option(ex)
    _add_repeats_option(ex)
    ex.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: a GPU if there is one)")
    ray = ex.add_argument_group("Ray (pip install 'sae-selfexplain[ray]'; docs/pipeline.md: past one machine)")
    ray.add_argument(
        "--ray",
        nargs="?",
        const="",
        metavar="ADDRESS",
        help="run the shards as Ray tasks and merge them into the store: on the cluster at ADDRESS (e.g. auto, "
        "ray://head:10001), else the one RAY_ADDRESS names, else a local instance",
    )
    ray.add_argument("--shards", type=_positive, help="with --ray: tasks (default: one per GPU, else per CPU)")
    ray.add_argument("--cpus-per-shard", type=_positive, default=1, help="with --ray: CPUs (threads) per task")
    ray.add_argument("--gpus-per-shard", type=float, help="with --ray: GPUs per task (default: 1 if there are any)")
    ray.add_argument(
        "--ray-retries", type=int, default=2, help="with --ray: retries of a task whose worker died (%(default)s)"
    )
    ex.add_argument(
        "--contexts", metavar="CORPUS", help="also collect top-activating contexts over this corpus, beside --out"
    )
    ex.add_argument(
        "--context-tokens", type=_positive, default=DEFAULT_TOKENS, help="with --contexts, per split (%(default)s)"
    )
    ex.set_defaults(func=cmd_explain)

    co = sub.add_parser("contexts", help="each feature's top-activating contexts and density over a corpus; resumable")
    co.add_argument("--sae", required=True, help="a SAELens SAE folder, or RELEASE:SAE_ID (needs the hub)")
    add_model_option(co)
    co.add_argument("--corpus", required=True, help="a text file (blank-line separated), a folder of .txt, or JSONL")
    co.add_argument(
        "--tokens",
        type=_positive,
        default=DEFAULT_TOKENS,
        help="tokens to read for each split, explain and score (%(default)s)",
    )
    co.add_argument("--out", required=True, help="activation-examples file (.safetensors)")
    co.add_argument("--resume", action="store_true", help="continue from OUT.partial")
    co.add_argument("--device", help="cpu, cuda, cuda:1 ...")
    co.set_defaults(func=cmd_contexts)
