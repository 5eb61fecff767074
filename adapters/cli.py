"""The `sae-selfexplain` command line: demo and benchmarks on the embedded models."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, cast, overload

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from sae_selfexplain_plugin import (
    FeatureExplanations,
    InputError,
    SelfExplainConfig,
    SelfExplainer,
    SelfExplainError,
    __version__,
)
from sae_selfexplain_plugin.activation_examples import ActivationExamples, Context, FeatureExamples
from sae_selfexplain_plugin.adapter_training import (
    DEFAULT_ARCHITECTURE,
    DEFAULT_RANK,
    DEFAULT_WORDS,
    LATENT_LABELS,
    TrainableModel,
    TrainingSettings,
)
from sae_selfexplain_plugin.config import DEFAULT_SCALES, POLICIES, WHOLE_SAE_CONFIG
from sae_selfexplain_plugin.dashboard import write_dashboard
from sae_selfexplain_plugin.direction_adapter import ARCHITECTURES, HELD_OUT_LATENTS
from sae_selfexplain_plugin.files import atomic_writer, check_writable
from sae_selfexplain_plugin.formats import SCHEMA_NAMES, checked_record
from sae_selfexplain_plugin.word_recovery import (
    default_source_layers,
    load_words,
    run_word_recovery,
    single_token_words,
)

from .contexts import DEFAULT_TOKENS, examples_beside
from .embedded import DEFAULT_MODEL, EMBEDDED_MODELS, get_embedded, load_backend
from .neuronpedia import DEFAULT_HOST, DEFAULT_TIMEOUT_S, MAX_TIMEOUT_S, redact_api_key
from .transformers import TransformersBackend

if TYPE_CHECKING:
    from .evaluation import Embedder

console = Console(stderr=True)


def _probe_task(progress: Progress, tokenizer: Any) -> Callable[[int], None]:
    """A progress bar for the vocabulary probe, shown once the probe starts."""
    from sae_selfexplain_plugin.vocabulary import probe_size

    task = progress.add_task("probing the vocabulary", total=probe_size(tokenizer), visible=False)
    return lambda n: progress.update(task, visible=True, advance=n)


def _progress() -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


@contextmanager
def _status(message: str, done: str) -> Iterator[None]:
    start = time.perf_counter()
    with console.status(message):
        yield
    console.print(f"[dim]{done} in {time.perf_counter() - start:.1f}s[/dim]", soft_wrap=True)


def _load(name: str) -> TransformersBackend:
    get_embedded(name)  # fail fast on an unknown name
    with _status(f"Loading {name} (the first run converts its GGUF, about a minute)...", f"loaded {name}"):
        return load_backend(name)


class Interrupted(SelfExplainError):
    """Ctrl-C during a long run: what was stored is kept."""


def _positive(text: str) -> int:
    """An argparse type: an integer >= 1 (ASCII digits)."""
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def _int_list(text: str, flag: str) -> list[int]:
    """Comma-separated non-negative integers (ASCII digits) for `flag`."""
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isascii() and p.isdigit() for p in parts):
        raise InputError(f"{flag} {text!r} must be comma-separated block numbers such as 10,15.")
    return [int(p) for p in parts]


def _scales(text: str | None) -> tuple[float, ...]:
    if not text:
        return DEFAULT_SCALES
    try:
        if not text.isascii():
            raise ValueError(text)
        return tuple(float(s) for s in text.split(","))
    except ValueError:
        raise SelfExplainError(f"--scales takes comma-separated numbers, e.g. 1,2,4; got {text!r}.") from None


def cmd_demo(args: argparse.Namespace) -> int:
    from sae_selfexplain_plugin.export import export_jsonl
    from sae_selfexplain_plugin.store import ResultsStore

    from .demo_sae import demo_examples, load_demo_sae
    from .evaluation import score_records
    from .pipeline import explain_sae, parse_features, store_key, stored_records

    sae, examples = load_demo_sae(), demo_examples()
    sae_key = store_key(sae, "demo")
    features = parse_features(args.features, sae.cfg.d_sae) if args.features else examples.live_features()[:16]
    config = SelfExplainConfig(
        scales=_scales(args.scales),
        max_new_tokens=args.max_new_tokens,
        policy=args.policy,
        generate=args.generate,
        keep_top=args.keep_top,
        metrics=args.metrics,
    )
    backend = _load(DEFAULT_MODEL)
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


def _embedder_or_none() -> Embedder | None:
    """The sentence-embedding model for the embedding score, or None (with a note) when it is not installed."""
    from .evaluation import Embedder

    try:
        return Embedder()
    except SelfExplainError as e:
        console.print(f"[dim]embedding score skipped: {escape(str(e))}[/dim]")
        return None


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


def cmd_word_recovery(args: argparse.Namespace) -> int:
    sources = _int_list(args.sources, "--sources") if args.sources else None
    if args.json:
        check_writable(args.json, "--json")
    backend = _load(args.model)
    chat = EMBEDDED_MODELS[args.model].chat
    default = ["identity", "chat-repeat", "chat-meaning"] if chat else ["identity", "definition"]
    templates = args.templates.split(",") if args.templates else default
    adapter = None if args.adapter == "none" else args.adapter
    config = SelfExplainConfig(
        layer=args.layer, scales=_scales(args.scales), max_new_tokens=args.max_new_tokens, adapter=adapter
    )
    kinds = args.vectors.split(",")
    words = single_token_words(backend.tokenizer, load_words())[: args.limit or None]
    n_sources = 1 + len(sources if sources is not None else default_source_layers(backend.n_layers))
    n_scales = len(config.adapter_scales if adapter is not None else config.scales)
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
        rates = [f"{row.rate_by_scale[s]:.0%}" for s in scales]
        table.add_row(
            row.template,
            row.source,
            row.vectors,
            *rates,
            f"{row.best_rate:.0%} @{row.best_scale:g}",
            f"{row.default_rate:.0%}",
            *[f"{row.rate_by_policy[p]:.0%}" for p in policies],
        )
    view.print(table)
    view.print(f"{elapsed:.0f}s")
    if args.json:
        with atomic_writer(args.json) as f:
            json.dump({"elapsed_s": elapsed, "rows": [r.to_dict() for r in rows]}, f, indent=1, allow_nan=False)
        view.print(f"wrote {args.json}", markup=False)
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from sae_selfexplain_plugin.store import ResultsStore

    try:
        from .pipeline import explain_sae, load_model, load_sae, parse_features, stored_records
    except ImportError as e:
        raise SelfExplainError(f"`explain` needs SAELens ({e}): pip install 'sae-selfexplain[saelens]'.") from None

    store_path = Path(args.store) if args.store else Path(args.out).with_suffix(".db")
    check_writable(args.out, "--out", {"the results store": store_path, "--sae": args.sae})
    if args.contexts:
        check_writable(examples_beside(args.out), "--out's activation examples", {"--contexts": args.contexts})
    with _status(f"Loading SAE {args.sae}...", "loaded the SAE"):
        sae, sae_key = load_sae(args.sae, device=args.device or "cpu")
    features = parse_features(args.features, sae.cfg.d_sae) if args.features else list(range(sae.cfg.d_sae))
    config = SelfExplainConfig(
        layer=args.layer,
        template=args.template,
        scales=_scales(args.scales),
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        policy=args.policy,
        generate=args.generate,
        keep_top=args.keep_top,
        metrics=args.metrics,
    )
    store = ResultsStore(store_path)  # fail on an unwritable store before loading the model
    with _status("Loading the model...", "loaded the model"):
        backend = load_model(args.model, sae, args.device)
    config = _with_adapter(config, args, sae, backend)
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


def _collect_contexts(sae: Any, backend: Any, corpus: str, out: Path, tokens: int, resume: bool) -> None:
    from .contexts import collect_contexts, corpus_texts

    with _progress() as progress:
        task = progress.add_task("top-activating contexts", total=tokens)
        examples = collect_contexts(
            sae, backend, corpus_texts(corpus), out, max_tokens=tokens, resume=resume,
            progress=lambda n: progress.advance(task, n),
        )  # fmt: skip
    Console().print(
        f"activation examples of {len(examples.live_features())} of {examples.d_sae} features (the others never "
        f"fired in {tokens:,} tokens): {out}",
        markup=False,
    )


def cmd_contexts(args: argparse.Namespace) -> int:
    from .pipeline import load_model, load_sae

    check_writable(args.out, "--out", {"--corpus": args.corpus, "--sae": args.sae})
    sae, _ = load_sae(args.sae, device=args.device or "cpu")
    with _status("Loading the model...", "loaded the model"):
        backend = load_model(args.model, sae, args.device)
    _collect_contexts(sae, backend, args.corpus, Path(args.out), args.tokens, args.resume)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:

    from .evaluation import Embedder, evaluate
    from .pipeline import load_model, parse_features
    from .sae_lens import with_adapter

    config = SelfExplainConfig(
        layer=args.layer, template=args.template, scales=_scales(args.scales), max_new_tokens=args.max_new_tokens
    )
    if args.out:
        check_writable(args.out, "--out", {"--examples": args.examples, "--sae": args.sae})
    sae, examples = _sae_and_examples(args)
    live = examples.live_features()
    features = parse_features(args.features, sae.cfg.d_sae) if args.features else live[: args.limit]
    embedder = None if args.no_embedding else Embedder()
    if embedder is not None:
        embedder.model_dir  # noqa: B018 (fail on a missing embedding model before the long run)
    with _status("Loading the model...", "loaded the model"):
        backend = load_model(args.model, sae)
    with _progress() as progress:
        task = progress.add_task("explaining features at every scale", total=len(features) * len(config.scales))
        adapter = with_adapter(config, args.adapter, sae, backend).adapter
        report = evaluate(
            sae, backend, examples, features, config, embedder=embedder, adapter=adapter,
            progress=lambda n: progress.advance(task, n), vocabulary=not args.no_vocabulary,
            vocabulary_progress=None if args.no_vocabulary else _probe_task(progress, backend.tokenizer),
        )  # fmt: skip
    table = Table(title=f"{len(features)} features of {report.sae} on {report.model_id} ({report.seconds:.0f}s)")
    for column in ("labeller", "activation check", "embedding AUROC", "scored", "flagged"):
        table.add_column(column, justify="left" if column == "labeller" else "right")
    for r in report.results:
        fmt = [f"{v:.3f}" if v is not None else "-" for v in (r.activation_check, r.embedding_score)]
        table.add_row(r.labeller, *fmt, str(r.scored), str(r.flagged))
    view = Console(width=max(Console().width, 100))
    view.print(table)
    view.print(
        "activation check: 0.5 = chance, 1 = the explanation evokes its own feature most; "
        "embedding AUROC: 0.5 = chance.",
        markup=False,
    )
    if args.out:
        with atomic_writer(args.out) as f:
            json.dump(report.to_dict(), f, indent=1, allow_nan=False)
        view.print(f"wrote {args.out}", markup=False)
    return 0


@overload
def _sae_and_examples(args: argparse.Namespace) -> tuple[Any, ActivationExamples]: ...
@overload
def _sae_and_examples(args: argparse.Namespace, required: bool) -> tuple[Any, ActivationExamples | None]: ...
def _sae_and_examples(args: argparse.Namespace, required: bool = True) -> tuple[Any, ActivationExamples | None]:
    """--sae (default: the demo SAE) and its activation examples (--examples, default: in its folder; None
    when not `required` and there are none), refused if they were collected for another SAE."""
    from sae_selfexplain_plugin.activation_examples import EXAMPLES_FILE

    from .demo_sae import DEMO_SAE_DIR
    from .pipeline import load_sae
    from .sae_lens import sae_identity

    folder = Path(args.sae) if args.sae else DEMO_SAE_DIR
    sae, _ = load_sae(str(folder))
    path = Path(args.examples) if args.examples else folder / EXAMPLES_FILE
    if not required and not path.is_file():
        return sae, None
    return sae, _checked_examples(ActivationExamples.load(path), path, sae_identity(sae))


def cmd_train_adapter(args: argparse.Namespace) -> int:

    from .pipeline import load_model
    from .train_adapter import train_for_sae

    out = Path(args.out)
    check_writable(out, "--out", {"--examples": args.examples, "--sae": args.sae})
    sae, examples = _sae_and_examples(args, required=False)
    checkpoint = out.with_suffix(out.suffix + ".ckpt")
    if checkpoint.exists() and not args.resume:
        raise SelfExplainError(f"{checkpoint} exists from an earlier run: pass --resume to continue it, or delete it.")
    settings = TrainingSettings(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, eval_every=args.eval_every, patience=args.patience
    )
    config = SelfExplainConfig(layer=args.layer, template=args.template)
    with _status("Loading the model...", "loaded the model"):
        backend = load_model(args.model, sae)
    if not hasattr(backend, "continuation_logprobs"):
        raise SelfExplainError(f"training needs a transformers model; {type(backend).__name__} cannot train.")
    start = time.perf_counter()
    with _progress() as progress:
        task = progress.add_task("training (building data)", total=settings.steps)

        def advance(n: int, loss: float) -> None:
            progress.update(task, advance=n, description=f"training, loss {loss:.3f}")

        adapter, report = train_for_sae(
            sae, cast(TrainableModel, backend), examples, out, config=config, architecture=args.architecture,
            rank=_rank(args), slots=args.slots, n_words=args.words, latent_labels=args.latent_labels,
            held_out=args.held_out, settings=settings, checkpoint=checkpoint, progress=advance,
        )  # fmt: skip
    checkpoint.unlink(missing_ok=True)
    view = Console()
    for h in report.history:
        view.print(f"step {h['step']:5d}  train {h['train_loss']:.3f}  validation {h['validation_loss']:.3f}")
    view.print(
        f"validation loss {report.initial_validation_loss:.3f} -> {report.best_validation_loss:.3f} in "
        f"{report.steps} steps{' (stopped early)' if report.stopped_early else ''}, "
        f"{time.perf_counter() - start:.0f}s; {adapter.n_parameters} parameters; wrote {out}",
        markup=False,
    )
    return 0


def _rank(args: argparse.Namespace) -> int:
    if args.rank is not None:
        return int(args.rank)
    return DEFAULT_RANK if args.architecture == "scalar-affine-low-rank" else 0


def cmd_sae_latent(args: argparse.Namespace) -> int:

    from .evaluation import latent_recovery, token_latents
    from .pipeline import load_model, parse_features

    if args.json:
        check_writable(args.json, "--json", {"--examples": args.examples, "--sae": args.sae})
    sae, examples = _sae_and_examples(args)
    candidates = token_latents(examples, parse_features(args.latents, sae.cfg.d_sae), args.min_peaks)
    latents = candidates[: args.limit]
    config = SelfExplainConfig(
        template=args.template, scales=_scales(args.scales), max_new_tokens=args.max_new_tokens, policy=args.policy,
        generate=args.generate, keep_top=args.keep_top, metrics=args.metrics,
    )  # fmt: skip
    with _status("Loading the model...", "loaded the model"):
        backend = load_model(args.model, sae)
    config = _with_adapter(config, args, sae, backend)
    with _progress() as progress:
        task = progress.add_task("explaining latents", total=len(latents) * len(config.scales))
        row = latent_recovery(sae, backend, latents, config, progress=lambda n: progress.advance(task, n))
    view = Console(width=max(Console().width, 120))
    adapter = Path(str(config.adapter)).name if config.adapter is not None else "none"
    view.print(
        f"{len(candidates)} token latents in {args.latents} (>= {args.min_peaks} of 10 top contexts peak on one "
        f"word of >= 3 letters); the first {len(latents)}, template {row.template}, adapter {adapter}:",
        markup=False,
    )
    for s, rate in row.rate_by_scale.items():
        view.print(f"  scale {s:g}: {rate:.1%} named", markup=False)
    for policy, rate in row.rate_by_policy.items():
        view.print(f"  policy {policy}: {rate:.1%} named", markup=False)
    for key, text in list(row.examples.items())[:12]:
        view.print(f"  {key:24s} {text}", markup=False)
    if args.json:
        with atomic_writer(args.json) as f:
            json.dump({**row.to_dict(), "qualified": len(candidates), "adapter": adapter}, f, indent=1, allow_nan=False)
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    check_writable(args.out, "--out", {"the results": args.results, "--examples": args.examples})
    db = args.results.endswith(".db")
    records = list(
        _read_records(None if db else args.results, args.results if db else None, args.sae_id, args.settings)
    )
    _check_one_run(records, args.results)
    examples = _examples(args.examples, None if db else args.results, records)
    page = write_dashboard(records, args.out, examples=examples, title=args.title)
    Console().print(f"{len(records)} features; dashboard: {page.resolve()}", markup=False)
    return 0


def _examples(
    named: str | None, results: str | None, records: list[FeatureExplanations] | None
) -> ActivationExamples | None:
    """Activation examples for a command's records: the file named (--examples), else the one `explain
    --contexts` wrote beside a results JSONL, else (given the records) the demo SAE's for demo results."""
    path = Path(named) if named else examples_beside(results) if results else None
    if path is not None and (named or path.is_file()):
        examples = ActivationExamples.load(path)
        return _checked_examples(examples, path, records[0].sae) if records else examples
    return None if records is None else _demo_examples_for(records)


def _checked_examples(examples: ActivationExamples, path: Path, sae: dict[str, Any]) -> ActivationExamples:
    """`examples`, refused when they were collected for another SAE than `sae` (an identity: records' `sae`
    field, or adapters.sae_lens.sae_identity): by the weights' fingerprint where the file records one, else by
    the number of features."""
    from sae_selfexplain_plugin.identity import check_same_sae

    fix = "pass the examples collected for this SAE (sae-selfexplain contexts --sae ... --out FILE)."
    if examples.sae is not None:
        check_same_sae(sae, examples.sae, f"the activation examples {path}", fix)
    elif sae.get("d_sae") not in (None, examples.d_sae):
        raise InputError(
            f"the activation examples {path} cover {examples.d_sae} features, but the SAE has {sae['d_sae']}; {fix}"
        )
    return examples


def _check_one_run(records: list[FeatureExplanations], where: str) -> None:
    """Refuse results that mix SAEs or runs: their links, ids and examples would all be the first SAE's."""
    from sae_selfexplain_plugin.identity import check_one_sae

    check_one_sae(((r.sae, r.model_id, r.settings_hash) for r in records), where)


def _demo_examples_for(records: list[FeatureExplanations]) -> ActivationExamples | None:
    """The demo SAE's examples when the records come from it, judged by its weights where the records carry
    their fingerprint (else None: no contexts shown)."""
    from sae_selfexplain_plugin.identity import same_sae

    from .demo_sae import demo_examples, load_demo_sae
    from .sae_lens import sae_identity

    if records and same_sae(sae_identity(load_demo_sae()), records[0].sae):
        return demo_examples()
    return None


def cmd_validate(args: argparse.Namespace) -> int:
    from sae_selfexplain_plugin.formats import validate_file

    documents, problems = validate_file(args.file, args.schema)
    view = Console(soft_wrap=True)
    for problem in problems:
        view.print(str(problem), markup=False, highlight=False)
    if problems:
        view.print(f"{len(problems)} violations in {documents} documents of {args.file}", markup=False)
        return 1
    view.print(f"{args.file}: {documents} documents, all valid", markup=False)
    return 0


def _records(args: argparse.Namespace) -> Iterator[FeatureExplanations]:
    return _read_records(args.results, args.store, args.sae_id, args.settings)


def _read_records(
    results: str | None, store_path: str | None, sae_id: str | None, settings: str | None = None
) -> Iterator[FeatureExplanations]:
    """Records from a results JSONL (ours), else from a results store (optionally one SAE's, one run's)."""
    if results:
        from sae_selfexplain_plugin.formats import read_documents

        for line, doc in read_documents(results):
            yield checked_record(doc, f"{results} line {line}")
    else:
        from sae_selfexplain_plugin.store import ResultsStore

        if store_path is None or not Path(store_path).is_file():
            raise SelfExplainError(f"no results store at {store_path}; pass --results FILE or --store FILE.db.")
        with ResultsStore(store_path, read_only=True) as store:
            for _, record in store.records(sae_id=sae_id, settings_hash=settings):
                yield record


def cmd_export(args: argparse.Namespace) -> int:
    from sae_selfexplain_plugin import export

    if bool(args.results) == bool(args.store):
        raise SelfExplainError("pass exactly one of --results FILE.jsonl or --store FILE.db.")
    if args.format == "jsonl":
        check_writable(args.out, "--out", {"--results": args.results, "--store": args.store})
    if args.format == "neuronpedia":
        records = list(_records(args))
        _check_one_run(records, args.results or args.store)
        examples = _examples(args.examples, args.results, records)  # as upload: beside the results, or the demo's
        summary = export.export_neuronpedia(
            records, args.out, author_id=args.author_id or "",
            model_layers=args.model_layers or _model_blocks(records), model_id=args.model_id,
            source_id=args.source_id, type_name=args.type_name, explanation_model_name=args.explanation_model_name,
            examples=examples, visibility=args.visibility,
        )  # fmt: skip
        if summary.written:
            Console(soft_wrap=True).print(
                f"{'with' if examples else 'without'} activation examples; visibility {args.visibility.upper()}. "
                f"Before importing (docs/pipeline.md), create the author's User row once: psql "
                f'"$POSTGRES_URL_NON_POOLING" -f {Path(args.out) / export.AUTHOR_SQL}',
                markup=False, highlight=False,
            )  # fmt: skip
    elif args.format == "neuron-explainer":
        if args.layer_index is None:
            raise SelfExplainError("--format neuron-explainer needs --layer-index (the SAE's layer).")
        summary = export.export_neuron_explainer(_records(args), args.out, args.layer_index)
    else:
        summary = export.export_jsonl(_records(args), args.out)
    view = Console(soft_wrap=True)
    view.print(f"{summary.written} explanations written to {len(summary.files)} file(s) under {args.out}", markup=False)
    if summary.skipped:
        view.print(
            f"{len(summary.skipped)} features had no explanation to publish: {summary.skipped[:20]}", markup=False
        )
    return 0


def _model_blocks(records: list[FeatureExplanations]) -> int | None:
    """The number of blocks of the records' model (the SAE's `model_name`, else the explaining model), when known
    offline: from a checkpoint folder's config.json, an embedded model's, or a Hugging Face cache entry's; else
    None (export then asks for --model-layers)."""
    from sae_selfexplain_plugin.results import short_model_name

    names = [str(n) for n in (records[0].sae.get("model_name"), records[0].model_id) if n] if records else []
    for name in names:
        if not Path(name).is_dir():
            embedded = [
                s for s in EMBEDDED_MODELS.values() if short_model_name(name) in {s.name, short_model_name(s.hf_id)}
            ]
            if embedded:
                return embedded[0].n_layers
        try:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(name, local_files_only=True)
        except Exception:  # a probe: neither a checkpoint folder nor in the local cache
            continue
        config = getattr(config, "text_config", None) or config
        blocks = getattr(config, "num_hidden_layers", None)
        if isinstance(blocks, int) and blocks > 0:
            return blocks
    return None


def _timeout(text: str) -> float:
    """An argparse type: seconds above 0 and at most MAX_TIMEOUT_S (so never NaN or inf)."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds <= MAX_TIMEOUT_S:
        raise argparse.ArgumentTypeError(f"expected seconds above 0 and at most {MAX_TIMEOUT_S:g}, got {text!r}")
    return seconds


def cmd_upload(args: argparse.Namespace) -> int:
    import os

    from sae_selfexplain_plugin.formats import neuronpedia_ids
    from sae_selfexplain_plugin.store import ResultsStore

    from .neuronpedia import API_KEY_ENV, MODEL_NAME_REFUSED, api_key_from_env, check_host, upload

    if bool(args.results) == bool(args.store):
        raise SelfExplainError("pass exactly one of --results FILE.jsonl or --store FILE.db.")
    records = list(_records(args))
    if not records:
        raise SelfExplainError("no results to upload.")
    _check_one_run(records, args.results or args.store)  # before --create-source: all would go to one source
    host = check_host(args.host, args.allow_http)
    if args.model_name:
        raise InputError(MODEL_NAME_REFUSED)
    if not args.source:
        raise InputError(
            "upload needs --source: the id of a source in a source set you created on Neuronpedia (e.g. "
            "6-selfexplain-demo), since Neuronpedia accepts uploads only to your own source sets; create one with "
            "POST /api/model/new (your model) and POST /api/source-set/new (docs/pipeline.md)."
        )
    if not args.dry_run and os.environ.get(API_KEY_ENV, "").strip():
        api_key_from_env()  # a key that cannot be a header fails here, before any work (a missing one when needed)
    model_id, source = neuronpedia_ids(records[0], args.model_id, args.source)
    examples = _examples(args.examples, args.results, records)
    if examples is None:
        console.print(
            "note: no activation examples (--examples, or `explain --contexts`): each feature is uploaded with "
            "its activations over its own explanation, so its page will show little.",
            soft_wrap=True, markup=False, highlight=False,
        )  # fmt: skip
    ledger_path = Path(args.ledger or args.store or Path(args.results).with_suffix(".db"))
    # a dry run writes nothing: it reads the ledger if there is one, else starts from an empty one in memory
    ledger_at = ledger_path if not args.dry_run or ledger_path.is_file() else Path(":memory:")
    if args.create_source:
        from .neuronpedia import create_source_set

        if args.dry_run:
            console.print(f"dry run: would create the source set of {source} on {model_id}", markup=False)
        else:
            created = create_source_set(model_id, source, host=host, allow_http=args.allow_http, timeout_s=args.timeout)
            console.print(f"{'created' if created else 'found'} the source set of {source} on {model_id}", markup=False)
    with ResultsStore(ledger_at, read_only=args.dry_run and ledger_at != Path(":memory:")) as ledger:
        summary = upload(
            records, model_id=model_id, source=source, ledger=ledger, host=host, allow_http=args.allow_http,
            method_name=args.method_name, examples=examples, dry_run=args.dry_run, timeout_s=args.timeout,
            log=lambda m: console.print(m, soft_wrap=True, markup=False, highlight=False),
        )  # fmt: skip
    verb = "would send" if args.dry_run else "sent"
    Console(soft_wrap=True).print(
        f"{verb} {summary.sent} features in {summary.batches} batches to {model_id}/{source}; "
        f"{summary.already} already uploaded; {len(summary.skipped)} without explanation or activations",
        markup=False,
    )
    return 0


def _add_results_source(parser: argparse.ArgumentParser) -> None:
    """Where `export` and `upload` read results from (see _records)."""
    parser.add_argument("--results", help="a results JSONL written by `explain`")
    parser.add_argument("--store", help="a results store (.db)")
    parser.add_argument("--sae-id", help="with --store: only this SAE (its neuronpedia_id or path)")
    parser.add_argument("--settings", help="with --store: only the run with this settings hash")


def _add_policy_options(
    parser: argparse.ArgumentParser, default: SelfExplainConfig | None = None, policy: str | None = None
) -> None:
    default = default or SelfExplainConfig()
    parser.add_argument(
        "--policy", choices=POLICIES, default=policy or default.policy, help="scale policy (default: %(default)s)"
    )
    parser.add_argument(
        "--generate",
        choices=["all", "chosen"],
        default=default.generate,
        help="generate at every scale, or only at the policy's top scales (cheaper; default: %(default)s)",
    )
    parser.add_argument(
        "--keep-top", type=int, default=default.keep_top, help="scales generated with --generate chosen (%(default)s)"
    )
    parser.add_argument(
        "--metrics",
        action=argparse.BooleanOptionalAction,
        default=default.metrics,
        help="measure the metric sweep (a prompt pass per scale) even when the policy does not need it "
        "(default: %(default)s)",
    )


def _add_adapter_option(parser: argparse.ArgumentParser, help: str | None = None) -> None:
    parser.add_argument(
        "--adapter",
        default="auto",
        help=help
        or "direction adapter: auto (the shipped one when it fits the model, SAE hook, layer and template, "
        "unless --scales asks for a bare-direction sweep), none, or an adapter file (default: %(default)s)",
    )


REPEATS = {"auto": None, "ban": True, "allow": False}  # --repeats -> SelfExplainConfig.no_repeats


def _add_repeats_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--repeats",
        choices=list(REPEATS),
        default="auto",
        help="ban generating a word token twice in one label, or allow it; auto bans with an adapter "
        "(default: %(default)s)",
    )


def _with_adapter(config: SelfExplainConfig, args: argparse.Namespace, sae: Any, backend: Any) -> SelfExplainConfig:
    """`config` with --adapter applied. Explicit --scales are relative scales of the bare direction, so they
    turn "auto" off; with an adapter file named, they are multiples of the adapter's vector instead."""
    from .sae_lens import with_adapter

    scales = getattr(args, "scales", None)
    choice = "none" if args.adapter == "auto" and scales else str(args.adapter)
    config = with_adapter(config.replace(no_repeats=REPEATS[getattr(args, "repeats", "auto")]), choice, sae, backend)
    return config.replace(adapter_scales=_scales(scales)) if config.adapter is not None and scales else config


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block), exit 2 like every other input error."""

    def error(self, message: str) -> NoReturn:
        console.print(
            f"[bold red]error:[/bold red] {escape(self.prog)}: {escape(message)} (see {escape(self.prog)} --help)",
            soft_wrap=True,
            highlight=False,
        )
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sae-selfexplain", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of any error")
    sub = parser.add_subparsers(dest="command", required=True)
    models = sorted(EMBEDDED_MODELS)

    demo = sub.add_parser("demo", help="explain features of the shipped demo SAE on the embedded default model")
    demo.add_argument("--features", help="e.g. 0-15 or 3,7 (default: the first 16 live features)")
    demo.add_argument("--scales", help="comma-separated relative scales")
    demo.add_argument("--max-new-tokens", type=int, default=16)
    _add_policy_options(demo, policy="knee")  # the best measured policy (docs/scale_policies.md)
    _add_adapter_option(demo)
    _add_repeats_option(demo)
    demo.add_argument(
        "--out", default="out/demo", help="folder for results.db and results.jsonl (default: %(default)s)"
    )
    demo.set_defaults(func=cmd_demo)

    ex = sub.add_parser("explain", help="explain the features of a SAELens SAE; resumable")
    ex.add_argument("--sae", required=True, help="a SAELens SAE folder, or RELEASE:SAE_ID (needs the hub)")
    ex.add_argument("--model", help="embedded model name or checkpoint folder (default: the SAE's model_name)")
    ex.add_argument("--features", help="e.g. 0-1023, 1,5,9, or a file of indices (default: all)")
    ex.add_argument("--out", required=True, help="results JSONL, written atomically at the end")
    ex.add_argument("--store", help="SQLite results store (default: OUT with .db); committed per batch")
    ex.add_argument("--resume", action="store_true", help="skip features already in the store")
    ex.add_argument(
        "--retry-failed", action="store_true", help="with --resume: try again the features a run had to skip"
    )
    ex.add_argument(
        "--vocabulary",
        action="store_true",
        help="also record each feature's vocabulary probe tokens (docs/vocabulary_probe.md; one pass over the "
        "vocabulary for all features)",
    )
    ex.add_argument("--layer", type=int, default=SelfExplainConfig().layer)
    ex.add_argument("--template", help="prompt template (default: from the tokenizer)")
    ex.add_argument("--scales", help="comma-separated relative scales")
    ex.add_argument("--max-new-tokens", type=int, default=SelfExplainConfig().max_new_tokens)
    ex.add_argument("--batch-size", type=int, default=SelfExplainConfig().batch_size, help="rows per generate")
    _add_policy_options(ex, WHOLE_SAE_CONFIG)
    _add_adapter_option(ex)
    _add_repeats_option(ex)
    ex.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: a GPU if there is one)")
    ex.add_argument(
        "--contexts", metavar="CORPUS", help="also collect top-activating contexts over this corpus, beside --out"
    )
    ex.add_argument("--context-tokens", type=_positive, default=DEFAULT_TOKENS, help="with --contexts (%(default)s)")
    ex.set_defaults(func=cmd_explain)

    co = sub.add_parser("contexts", help="each feature's top-activating contexts and density over a corpus; resumable")
    co.add_argument("--sae", required=True, help="a SAELens SAE folder, or RELEASE:SAE_ID (needs the hub)")
    co.add_argument("--model", help="embedded model name or checkpoint folder (default: the SAE's model_name)")
    co.add_argument("--corpus", required=True, help="a text file (blank-line separated), a folder of .txt, or JSONL")
    co.add_argument("--tokens", type=_positive, default=DEFAULT_TOKENS, help="tokens to read (%(default)s)")
    co.add_argument("--out", required=True, help="activation-examples file (.safetensors)")
    co.add_argument("--resume", action="store_true", help="continue from OUT.partial")
    co.add_argument("--device", help="cpu, cuda, cuda:1 ...")
    co.set_defaults(func=cmd_contexts)

    ev = sub.add_parser("eval", help="score every scale policy and a top-tokens baseline, with no judge model")
    ev.add_argument("--sae", help="a SAELens SAE folder (default: the shipped demo SAE)")
    ev.add_argument("--examples", help="activation examples file (default: in the SAE folder)")
    ev.add_argument("--model", help="embedded model name or checkpoint folder (default: the SAE's model_name)")
    ev.add_argument("--features", help="e.g. 0-63 (default: the first --limit live features)")
    ev.add_argument("--limit", type=_positive, default=64, help="how many live features (default: %(default)s)")
    ev.add_argument("--layer", type=int, default=SelfExplainConfig().layer)
    ev.add_argument("--template", help="prompt template (default: from the tokenizer)")
    ev.add_argument("--scales", help="comma-separated relative scales")
    ev.add_argument("--max-new-tokens", type=int, default=16)
    ev.add_argument("--no-embedding", action="store_true", help="skip the embedding score")
    ev.add_argument(
        "--no-vocabulary",
        action="store_true",
        help="skip the vocabulary probe and direction lens labellers (one pass over the vocabulary for both)",
    )
    ev.add_argument("--out", help="write the full report (per feature) to this JSON file")
    _add_adapter_option(ev, "also score the labels of this adapter (auto: the shipped one that fits, if any)")
    ev.set_defaults(func=cmd_eval)

    tr = sub.add_parser("train-adapter", help="train a direction adapter for an SAE on the frozen model (CPU)")
    tr.add_argument("--sae", help="a SAELens SAE folder (default: the shipped demo SAE)")
    tr.add_argument("--examples", help="activation examples, for token-feature latents (default: in the SAE folder)")
    tr.add_argument("--model", help="embedded model name or checkpoint folder (default: the SAE's model_name)")
    tr.add_argument("--out", default="out/adapter.safetensors", help="adapter file (default: %(default)s)")
    tr.add_argument("--architecture", choices=ARCHITECTURES, default=DEFAULT_ARCHITECTURE, help="(%(default)s)")
    tr.add_argument(
        "--rank", type=int, help=f"of the low-rank part (default: {DEFAULT_RANK} for scalar-affine-low-rank, else 0)"
    )
    tr.add_argument(
        "--slots", type=int,
        help="injected vectors per feature: 1 for every placeholder, or one per placeholder (the default)",
    )  # fmt: skip
    tr.add_argument("--layer", type=int, default=SelfExplainConfig().layer, help="injection block")
    tr.add_argument("--template", help="prompt template (default: from the tokenizer)")
    tr.add_argument("--words", type=_positive, default=DEFAULT_WORDS, help="vocabulary words to train on (%(default)s)")
    tr.add_argument(
        "--latent-labels", choices=LATENT_LABELS, default=LATENT_LABELS[0],
        help="label each training latent with its top peak tokens, or train only on token features with their word",
    )  # fmt: skip
    tr.add_argument("--held-out", type=int, default=HELD_OUT_LATENTS, help="latents below this never train")
    defaults = TrainingSettings()
    tr.add_argument("--steps", type=int, default=defaults.steps, help="(%(default)s)")
    tr.add_argument("--batch-size", type=int, default=defaults.batch_size, help="(%(default)s)")
    tr.add_argument("--lr", type=float, default=defaults.lr, help="(%(default)s)")
    tr.add_argument("--eval-every", type=int, default=defaults.eval_every, help="steps (%(default)s)")
    tr.add_argument("--patience", type=int, default=defaults.patience, help="evaluations without improvement")
    tr.add_argument("--resume", action="store_true", help="continue from OUT.ckpt")
    tr.set_defaults(func=cmd_train_adapter)

    da = sub.add_parser("dashboard", help="write an offline HTML dashboard of results (JSONL or .db)")
    da.add_argument("results", help="a results JSONL written by `explain`/`demo`, or a results store (.db)")
    da.add_argument("--out", required=True, help="the HTML file to write")
    da.add_argument(
        "--examples", help="activation examples file, for top contexts (default: the demo SAE's if it is that SAE)"
    )
    da.add_argument("--sae-id", help="with a .db: only this SAE (its neuronpedia_id or path)")
    da.add_argument("--settings", help="with a .db: only the run with this settings hash")
    da.add_argument("--title", help="page title")
    da.set_defaults(func=cmd_dashboard)

    va = sub.add_parser("validate", help="check a JSON/JSONL(.gz) file against the schema it claims")
    va.add_argument("file")
    va.add_argument("--schema", choices=SCHEMA_NAMES, help="default: detected from each document's keys")
    va.set_defaults(func=cmd_validate)

    exp = sub.add_parser("export", help="export results as Neuronpedia, neuron-explainer or our JSONL")
    _add_results_source(exp)
    exp.add_argument("--format", choices=["neuronpedia", "neuron-explainer", "jsonl"], required=True)
    exp.add_argument("--out", required=True, help="output folder (neuronpedia, neuron-explainer) or file (jsonl)")
    exp.add_argument("--model-id", help="Neuronpedia model id (default: from the SAE's neuronpedia_id)")
    exp.add_argument("--source-id", help="Neuronpedia source id, e.g. 6-res-jb (default: from neuronpedia_id)")
    exp.add_argument("--author-id", help="neuronpedia: the Neuronpedia user id the explanations belong to (required)")
    exp.add_argument(
        "--model-layers", type=_positive, help="neuronpedia: the SAE's model's number of blocks (default: when known)"
    )
    exp.add_argument(
        "--visibility", choices=["public", "unlisted", "private"], default="public",
        help="neuronpedia: of the model, source set and source rows (default: %(default)s)",
    )  # fmt: skip
    exp.add_argument(
        "--examples", help="neuronpedia: activation examples (top contexts, density; default: as upload finds them)"
    )
    exp.add_argument("--type-name", help="neuronpedia: an explanation type Neuronpedia knows (default: none)")
    exp.add_argument("--explanation-model-name", help="neuronpedia: an explanation model it knows (default: none)")
    exp.add_argument("--layer-index", type=int, help="neuron-explainer layer_index")
    exp.set_defaults(func=cmd_export)

    up = sub.add_parser("upload", help="upload explanations to Neuronpedia (key in NEURONPEDIA_API_KEY)")
    _add_results_source(up)
    up.add_argument("--model-id", help="Neuronpedia model id (default: from the SAE's neuronpedia_id)")
    up.add_argument("--source", help="Neuronpedia source id, in a source set you created (required)")
    up.add_argument("--ledger", help="store that remembers what was uploaded (default: the results' store)")
    up.add_argument("--host", default=DEFAULT_HOST, help="https origin (default: %(default)s)")
    up.add_argument("--allow-http", action="store_true", help="allow a plain-http loopback host (test servers)")
    up.add_argument(
        "--create-source", action="store_true", help="create --source's source set on Neuronpedia if it does not exist"
    )
    up.add_argument("--method-name", help="an explanation type Neuronpedia knows (else omitted)")
    up.add_argument("--model-name", help=argparse.SUPPRESS)  # refused with the reason (Neuronpedia cannot store it)
    up.add_argument(
        "--examples", help="activation examples (top contexts, density) to upload (default: beside --results)"
    )
    up.add_argument("--dry-run", action="store_true", help="print what would be sent; send nothing")
    up.add_argument(
        "--timeout", type=_timeout, default=DEFAULT_TIMEOUT_S,
        help="seconds to wait for each answer; a server silent twice is given up on (default: %(default)g)",
    )  # fmt: skip
    up.set_defaults(func=cmd_upload)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    wr = bench.add_parser("word-recovery", help="does the explanation name an injected word's residual?")
    wr.add_argument("--model", default=DEFAULT_MODEL, choices=models)
    wr.add_argument("--templates", help="comma-separated template names (default: identity and the model's others)")
    wr.add_argument(
        "--sources",
        help="comma-separated source blocks for the cross-layer case (default: 1/3 and 1/2 depth)",
    )
    wr.add_argument("--layer", type=int, default=SelfExplainConfig().layer, help="injection block")
    wr.add_argument("--scales", help="comma-separated relative scales")
    wr.add_argument("--max-new-tokens", type=int, default=8)
    wr.add_argument("--limit", type=int, default=0, help="use only the first N words (0 = all)")
    wr.add_argument(
        "--vectors", default="raw", help="cross-layer vectors: raw, centred (like SAE features), or raw,centred"
    )
    wr.add_argument("--adapter", default="none", help="an adapter file to inject through (default: none)")
    wr.add_argument("--json", help="write the results to this JSON file")
    wr.set_defaults(func=cmd_word_recovery)

    sl = bench.add_parser("sae-latent", help="are token-feature latents of an SAE named by their token?")
    sl.add_argument("--sae", help="a SAELens SAE folder (default: the shipped demo SAE)")
    sl.add_argument("--examples", help="activation examples file (default: in the SAE folder)")
    sl.add_argument("--model", help="embedded model name or checkpoint folder (default: the SAE's model_name)")
    sl.add_argument("--latents", default=f"0-{HELD_OUT_LATENTS - 1}", help="latents to pick from (%(default)s)")
    sl.add_argument("--limit", type=_positive, default=64, help="the first N token latents (default: %(default)s)")
    sl.add_argument("--min-peaks", type=int, default=8, help="top contexts that must peak on the word (of 10)")
    sl.add_argument("--template", help="prompt template (default: from the tokenizer)")
    sl.add_argument("--scales", help="comma-separated relative scales")
    sl.add_argument(
        "--max-new-tokens", type=int, default=16, help="as demo and eval: room for a list label (%(default)s)"
    )
    _add_policy_options(sl, policy="knee")
    _add_adapter_option(sl)
    _add_repeats_option(sl)
    sl.add_argument("--json", help="write the results to this JSON file")
    sl.set_defaults(func=cmd_sae_latent)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `sae-selfexplain` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    # Every message below passes through redact_api_key: an exception may quote NEURONPEDIA_API_KEY's value.
    except Interrupted as e:
        console.print(f"[bold yellow]{escape(redact_api_key(str(e)))}[/bold yellow]", soft_wrap=True, highlight=False)
        return 130
    except KeyboardInterrupt:
        console.print("[bold yellow]interrupted[/bold yellow]", highlight=False)
        return 130
    except SelfExplainError as e:  # bad input, or a service that refused: one line, naming the fix
        if args.debug:
            _print_traceback(e)
        console.print(f"[bold red]error:[/bold red] {escape(redact_api_key(str(e)))}", soft_wrap=True, highlight=False)
        return 2
    except Exception as e:  # a bug: say so in one line; --debug shows where
        if args.debug:
            _print_traceback(e)
            return 1
        console.print(
            f"[bold red]internal error:[/bold red] {escape(type(e).__name__)}: {escape(redact_api_key(str(e))[:300])}. "
            "This is a bug in sae-selfexplain: rerun with --debug and report the traceback.",
            soft_wrap=True,
            highlight=False,
        )
        return 1


def _print_traceback(error: BaseException) -> None:
    """--debug's traceback, plain (a pretty one wraps long lines, which could split a key past redaction)."""
    import sys
    import traceback

    sys.stderr.write(redact_api_key("".join(traceback.format_exception(error))))


if __name__ == "__main__":
    raise SystemExit(main())
