"""`eval` and `bench`: scoring labellers, and the word-recovery and SAE-latent benchmarks."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from sae_selfexplain_plugin.config import POLICIES
from sae_selfexplain_plugin.direction_adapter import HELD_OUT_LATENTS
from sae_selfexplain_plugin.errors import InputError
from sae_selfexplain_plugin.files import atomic_writer, check_writable
from sae_selfexplain_plugin.word_recovery import (
    default_source_layers,
    load_words,
    run_word_recovery,
    single_token_words,
)

from ..backends.embedded import DEFAULT_MODEL, EMBEDDED_MODELS
from .common import (
    _add_adapter_option,
    _add_policy_options,
    _add_repeats_option,
    _embedder_or_none,
    _int_list,
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
    parse_features,
)
from .inputs import (
    _sae_and_examples,
)


def cmd_eval(args: argparse.Namespace) -> int:

    from sae_selfexplain_plugin.scoring import versus

    from ..apps.evaluation import Embedder, evaluate
    from ..backends import load_model
    from ..sae_lens import with_adapter

    config = config_from_args(args)
    if args.out:
        for path, what in ((args.out, "--out"), (Path(args.out).with_suffix(".png"), "--out's plot"),
                           (Path(args.out).with_suffix(".html"), "--out's report")):  # fmt: skip
            check_writable(path, what, command_inputs(args))
    sae, examples = _sae_and_examples(args)
    score_examples = _score_split(args, sae)
    live = examples.live_features()
    features = parse_features(args.features, sae.cfg.d_sae) if args.features else live[: args.limit]
    embedder = None if args.no_embedding else Embedder()
    if embedder is not None:
        embedder.model_dir  # noqa: B018 (fail on a missing embedding model before the long run)
    with _status("Loading the model...", "loaded the model"):
        backend = load_model(args.model, model_name=sae.cfg.metadata.model_name)
    judge = None
    if args.judge:
        from ..apps.detection import DetectionJudge

        if score_examples is None:
            raise InputError(
                "--judge scores on the score split, and there is none beside the examples: collect both splits "
                "with `sae-selfexplain contexts`."
            )
        with _status(f"Loading the judge {args.judge}...", "loaded the judge"):
            judge = DetectionJudge(backend if args.judge == args.model else load_model(args.judge))
    explainer = None
    if args.explainer:
        with _status(f"Loading the explainer {args.explainer}...", "loaded the explainer"):
            same = judge.backend if judge is not None and args.explainer == args.judge else None
            explainer = same or (backend if args.explainer == args.model else load_model(args.explainer))
    with _progress() as progress:
        task = progress.add_task("explaining features at every scale", total=len(features) * len(config.scales))
        adapter = with_adapter(config, args.adapter, sae, backend).adapter
        report = evaluate(
            sae, backend, examples, features, config, embedder=embedder, adapter=adapter,
            progress=lambda n: progress.advance(task, n), vocabulary=not args.no_vocabulary,
            vocabulary_progress=None if args.no_vocabulary else _probe_task(progress, backend.tokenizer),
            score_examples=score_examples, judge=judge, autointerp_model=explainer,
            generation_check=args.generation_check,
        )  # fmt: skip
    table = Table(title=f"{len(features)} features of {report.sae} on {report.model_id} ({report.seconds:.0f}s)")
    columns = [("activation_check", "activation check"), ("embedding", "embedding AUROC")]
    columns += [("generation_check", "generation check")] if args.generation_check else []
    columns += [("detection", f"detection AUROC ({args.judge})"), ("detection_accuracy", "detection accuracy")] if (
        judge
    ) else []  # fmt: skip
    reference = next((r for r in report.results if r.labeller == "top-tokens baseline"), None)
    key = "detection" if judge else "embedding"
    for column in ("labeller", *(c for _, c in columns), f"{key} vs baseline", "scored", "flagged"):
        table.add_column(column, justify="left" if column == "labeller" else "right")
    for r in report.results:
        means = {"activation_check": r.activation_check, "embedding": r.embedding_score, "detection": r.detection}
        means["detection_accuracy"], means["generation_check"] = r.detection_accuracy, r.generation_check
        fmt = [_with_interval(means[k], r.intervals.get(k)) for k, _ in columns]
        against = versus(r.intervals.get(key), reference.intervals.get(key)) if reference and r is not reference else ""
        table.add_row(r.labeller, *fmt, against, str(r.scored), str(r.flagged))
    view = Console(width=max(Console().width, 100))
    view.print(table)
    view.print(
        "activation check: 0.5 = chance, 1 = the explanation evokes its own feature most; embedding AUROC: 0.5 = "
        f"chance, on the {report.scored_on}; [bootstrap 95% interval]. Means whose intervals overlap are a tie. "
        "Which labeller each favours: docs/evaluation.md.",
        markup=False,
    )
    if score_examples is None:
        view.print(
            "no score split beside the examples: the embedding AUROC is in-sample for the top-tokens baseline (it "
            "reads the contexts it is scored on); `sae-selfexplain contexts` writes both splits.",
            markup=False,
        )
    if args.out:
        from ..apps.eval_report import write_html, write_plot

        with atomic_writer(args.out) as f:
            json.dump(report.to_dict(), f, indent=1, allow_nan=False)
        plot, page = Path(args.out).with_suffix(".png"), Path(args.out).with_suffix(".html")
        write_plot(report, plot)
        write_html(report, page, plot)
        view.print(f"wrote {args.out}, the score distributions {plot} and the report {page}", markup=False)
    return 0


def _with_interval(value: float | None, interval: list[float] | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" + (f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else "")


def _score_split(args: argparse.Namespace, sae: Any) -> Any:
    """The score split beside the examples file (None if there is none), checked to be this SAE's."""
    from sae_selfexplain_plugin.activation_examples import ActivationExamples, score_split_path

    from ..sae_lens import sae_identity
    from .inputs import _checked_examples, examples_path

    path = score_split_path(examples_path(args))
    if not path.is_file():
        return None
    return _checked_examples(ActivationExamples.load(path), path, sae_identity(sae))


def cmd_sae_latent(args: argparse.Namespace) -> int:

    from ..apps.sae_latent import latent_recovery, token_latents
    from ..backends import load_model

    if args.json:
        check_writable(args.json, "--json", command_inputs(args))
    sae, examples = _sae_and_examples(args)
    candidates = token_latents(examples, parse_features(args.latents, sae.cfg.d_sae), args.min_peaks)
    latents = candidates[: args.limit]
    config = config_from_args(args)
    with _status("Loading the model...", "loaded the model"):
        backend = load_model(args.model, model_name=sae.cfg.metadata.model_name)
    config = _with_adapter(config, args, sae, backend)
    embedder = None if args.no_semantic else _embedder_or_none()
    embed = embedder.embed if embedder else None
    with _progress() as progress:
        task = progress.add_task("explaining latents", total=len(latents) * len(config.scales))
        row = latent_recovery(sae, backend, latents, config, progress=lambda n: progress.advance(task, n), embed=embed)
    view = Console(width=max(Console().width, 120))
    adapter = Path(str(config.adapter)).name if config.adapter is not None else "none"
    view.print(
        f"{len(candidates)} token latents in {args.latents} (>= {args.min_peaks} of 10 top contexts peak on one "
        f"word of >= 3 letters); the first {len(latents)}, template {row.template}, adapter {adapter}:",
        markup=False,
    )
    semantic = f"; semantic: nearest to its own word of {row.n_words} (chance {row.semantic_chance:.1%})"
    for s, rate in row.rate_by_scale.items():
        sem = f", {row.semantic_by_scale[s]:.1%} semantic" if s in row.semantic_by_scale else ""
        view.print(f"  scale {s:g}: {rate:.1%} named{sem}", markup=False)
    for policy, rate in row.rate_by_policy.items():
        sem = f", {row.semantic_by_policy[policy]:.1%} semantic" if policy in row.semantic_by_policy else ""
        view.print(f"  policy {policy}: {rate:.1%} named{sem}", markup=False)
    if embed is not None:
        view.print(semantic[2:], markup=False)
    for key, text in list(row.examples.items())[:12]:
        view.print(f"  {key:24s} {text}", markup=False)
    if args.json:
        with atomic_writer(args.json) as f:
            json.dump({**row.to_dict(), "qualified": len(candidates), "adapter": adapter}, f, indent=1, allow_nan=False)
    return 0


def cmd_word_recovery(args: argparse.Namespace) -> int:
    sources = _int_list(args.sources, "--sources") if args.sources else None
    if args.json:
        check_writable(args.json, "--json", command_inputs(args))
    backend = _load(args.model)
    chat = EMBEDDED_MODELS[args.model].chat
    default = ["identity", "chat-repeat", "chat-meaning"] if chat else ["identity", "definition"]
    templates = args.templates.split(",") if args.templates else default
    adapter = None if args.adapter == "none" else args.adapter
    config = config_from_args(args).replace(adapter=adapter)
    kinds = args.vectors.split(",")
    words = single_token_words(backend.tokenizer, load_words())[: args.limit or None]
    n_sources = 1 + len(sources if sources is not None else default_source_layers(backend.n_layers))
    n_scales = len(config.adapter_scales if adapter is not None else config.scales)
    embedder = None if args.no_semantic else _embedder_or_none()
    start = time.perf_counter()
    rows = []
    with _progress() as progress:
        total = len(words) * n_scales * n_sources * len(templates) * len(kinds)
        task = progress.add_task("word recovery", total=total)
        for i, kind in enumerate(kinds):
            rows += run_word_recovery(
                backend,
                templates=templates,
                config=config,
                source_layers=sources,
                words=words,
                progress=lambda n: progress.advance(task, n),
                vectors=kind,
                same_layer=i == 0,  # the same-layer row does not depend on the kind
                embed=embedder.embed if embedder else None,
            )
    elapsed = time.perf_counter() - start
    view = Console(width=max(Console().width, 150))
    title = f"word recovery: {backend.model_id}, {len(words)} words, injected at block {config.layer}"
    table = Table(title=title + (f", adapter {Path(adapter).name}" if adapter else ""))
    table.add_column("template")
    table.add_column("source")
    table.add_column("vectors")
    scales = list(rows[0].rate_by_scale)
    for s in scales:
        table.add_column(f"{s:g}", justify="right")
    table.add_column("best", justify="right")
    table.add_column(f"default ({rows[0].default_scale:g})", justify="right")
    policies = [p for p in POLICIES if p != "fixed" and p in rows[0].rate_by_policy]
    for policy in policies:
        table.add_column(policy, justify="right")
    for row in rows:
        sem = row.semantic_by_scale
        rates = [_cell(row.rate_by_scale[s], sem.get(s)) for s in scales]
        table.add_row(
            row.template,
            row.source,
            row.vectors,
            *rates,
            f"{row.best_rate:.0%} @{row.best_scale:g}",
            _cell(row.default_rate, sem.get(row.default_scale)),
            *[_cell(row.rate_by_policy[p], row.semantic_by_policy.get(p)) for p in policies],
        )
    view.print(table)
    if embedder:
        view.print(
            f"cells: named literally/semantic (the explanation is nearer to its own word than to the other "
            f"{len(words) - 1}, all-MiniLM-L6-v2; chance {rows[0].semantic_chance:.1%}); MRR in --json",
            markup=False,
        )
    view.print(f"{elapsed:.0f}s")
    if args.json:
        with atomic_writer(args.json) as f:
            json.dump({"elapsed_s": elapsed, "rows": [r.to_dict() for r in rows]}, f, indent=1, allow_nan=False)
        view.print(f"wrote {args.json}", markup=False)
    return 0


def _add_semantic_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-semantic",
        action="store_true",
        help="report only literal naming, not the semantic rate (which needs the sentence-embedding model)",
    )


def _cell(literal: float, semantic: float | None) -> str:
    return f"{literal:.0%}" if semantic is None else f"{literal:.0%}/{semantic:.0%}"


def add_parsers(sub: Any) -> None:
    """Declare this module's commands on the top parser's subparsers."""
    ev = sub.add_parser("eval", help="score every scale policy and a top-tokens baseline, with no judge model")
    ev.add_argument("--sae", help="a SAELens SAE folder (default: the shipped demo SAE)")
    ev.add_argument("--examples", help="activation examples file (default: in the SAE folder)")
    add_model_option(ev)
    ev.add_argument("--features", help="e.g. 0-63 (default: the first --limit live features)")
    ev.add_argument("--limit", type=_positive, default=64, help="how many live features (default: %(default)s)")
    add_generation_options(ev, max_new_tokens=16)  # as demo: the measured eval tables use 16
    ev.add_argument("--no-embedding", action="store_true", help="skip the embedding score")
    ev.add_argument(
        "--no-vocabulary",
        action="store_true",
        help="skip the vocabulary probe and direction lens labellers (one pass over the vocabulary for both)",
    )
    ev.add_argument(
        "--out", help="write the full report (per feature) to this JSON file, a PNG plot and an HTML page beside it"
    )
    ev.add_argument(
        "--generation-check",
        action="store_true",
        help="also score each label by the text the model writes from it (one generation per label)",
    )
    ev.add_argument(
        "--explainer",
        help="also label each feature by auto-interp: this model (embedded name or folder) reads the feature's "
        "explain-split contexts and describes it",
    )
    ev.add_argument(
        "--judge",
        help="also run the detection scorer with this judge model (embedded name or folder; e.g. "
        "qwen2.5-coder-1.5b-instruct): slow, about 20 judge prompts per feature and labeller",
    )
    _add_adapter_option(ev, "also score the labels of this adapter (auto: the shipped one that fits, if any)")
    ev.set_defaults(func=cmd_eval)

    models = sorted(EMBEDDED_MODELS)
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    wr = bench.add_parser("word-recovery", help="does the explanation name an injected word's residual?")
    wr.add_argument("--model", default=DEFAULT_MODEL, choices=models)
    wr.add_argument("--templates", help="comma-separated template names (default: identity and the model's others)")
    wr.add_argument(
        "--sources",
        help="comma-separated source blocks for the cross-layer case (default: 1/3 and 1/2 depth)",
    )
    add_generation_options(wr, max_new_tokens=8, template=False)  # one word to name; --templates picks several
    wr.add_argument("--limit", type=int, default=0, help="use only the first N words (0 = all)")
    _add_semantic_option(wr)
    wr.add_argument(
        "--vectors", default="raw", help="cross-layer vectors: raw, centred (like SAE features), or raw,centred"
    )
    wr.add_argument("--adapter", default="none", help="an adapter file to inject through (default: none)")
    wr.add_argument("--json", help="write the results to this JSON file")
    wr.set_defaults(func=cmd_word_recovery)

    sl = bench.add_parser("sae-latent", help="are token-feature latents of an SAE named by their token?")
    sl.add_argument("--sae", help="a SAELens SAE folder (default: the shipped demo SAE)")
    sl.add_argument("--examples", help="activation examples file (default: in the SAE folder)")
    add_model_option(sl)
    sl.add_argument("--latents", default=f"0-{HELD_OUT_LATENTS - 1}", help="latents to pick from (%(default)s)")
    sl.add_argument("--limit", type=_positive, default=64, help="the first N token latents (default: %(default)s)")
    sl.add_argument("--min-peaks", type=int, default=8, help="top contexts that must peak on the word (of 10)")
    _add_semantic_option(sl)
    add_generation_options(sl, max_new_tokens=16, layer=False)  # as demo and eval: room for a list label
    _add_policy_options(sl, policy="knee")
    _add_adapter_option(sl)
    _add_repeats_option(sl)
    sl.add_argument("--json", help="write the results to this JSON file")
    sl.set_defaults(func=cmd_sae_latent)
