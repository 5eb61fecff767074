"""`dashboard`, `validate`, `merge`, `export` and `upload`: what is done with results once they exist."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from sae_selfexplain_plugin import (
    FeatureExplanations,
    InputError,
    SelfExplainError,
)
from sae_selfexplain_plugin.dashboard import write_dashboard
from sae_selfexplain_plugin.files import check_writable
from sae_selfexplain_plugin.formats import SCHEMA_NAMES

from ..backends.embedded import EMBEDDED_MODELS
from ..neuronpedia import DEFAULT_HOST, DEFAULT_TIMEOUT_S
from .common import (
    _positive,
    _timeout,
    command_inputs,
    console,
)
from .inputs import (
    _add_results_source,
    _check_one_run,
    _examples,
    _read_records,
    _records,
)

if TYPE_CHECKING:
    pass


def cmd_dashboard(args: argparse.Namespace) -> int:
    check_writable(args.out, "--out", command_inputs(args))
    db = args.results.endswith(".db")
    records = _read_records(None if db else args.results, args.results if db else None, args.sae_id, args.settings)
    _check_one_run(records, args.results)
    examples = _examples(args.examples, None if db else args.results, records)
    page = write_dashboard(records, args.out, examples=examples, title=args.title)
    Console().print(f"{len(records)} features; dashboard: {page.resolve()}", markup=False)
    return 0


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


def cmd_merge(args: argparse.Namespace) -> int:
    from sae_selfexplain_plugin.shards import merge_stores

    check_writable(args.out, "--out", {f"the input store {p}": p for p in args.stores})
    report = merge_stores(args.stores, args.out)
    view = Console(soft_wrap=True)
    view.print(
        f"{report.records} records and {report.failed} failed features from {len(args.stores)} stores: {args.out}",
        markup=False,
    )
    if report.shards is not None:
        held, count = ", ".join(map(str, report.shards["indices"])), report.shards["count"]
        view.print(f"shards {held} of {count} (run {report.shards['run']})", markup=False)
        if report.missing:
            view.print(
                f"missing shards: {', '.join(map(str, report.missing))} of {count}; run them (explain --shard K/N) "
                "and merge again.",
                markup=False,
            )
    if report.differing:
        shown = ", ".join(map(str, report.differing[:10]))
        view.print(
            f"{len(report.differing)} features were stored differently by two inputs ({shown}); the input named "
            "first was kept. Same settings give the same records: a difference means another machine, library "
            "or thread count.",
            markup=False,
        )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from sae_selfexplain_plugin import export

    if bool(args.results) == bool(args.store):
        raise SelfExplainError("pass exactly one of --results FILE.jsonl or --store FILE.db.")
    if args.format == "jsonl":
        check_writable(args.out, "--out", command_inputs(args))
    if args.format == "neuronpedia":
        records = _records(args)
        _check_one_run(records, args.results or args.store)
        layers = _checked_layers(args.model_layers, _model_blocks(records))
        examples = _examples(args.examples, args.results, records)  # as upload: beside the results, or the demo's
        summary = export.export_neuronpedia(
            records, args.out, author_id=args.author_id or "",
            model_layers=layers, model_id=args.model_id,
            source_id=args.source_id, type_name=args.type_name, explanation_model_name=args.explanation_model_name,
            examples=examples, visibility=args.visibility, inputs=command_inputs(args),
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
        summary = export.export_neuron_explainer(_records(args), args.out, args.layer_index, command_inputs(args))
    else:
        summary = export.export_jsonl(_records(args), args.out)
    view = Console(soft_wrap=True)
    view.print(f"{summary.written} explanations written to {len(summary.files)} file(s) under {args.out}", markup=False)
    if summary.skipped:
        view.print(
            f"{len(summary.skipped)} features had no explanation to publish: {summary.skipped[:20]}", markup=False
        )
    return 0


def _checked_layers(given: int | None, known: int | None) -> int | None:
    """--model-layers, or the model's own number of blocks when known; refused where the two disagree."""
    if given is not None and known is not None and given != known:
        raise InputError(f"--model-layers {given}, but the SAE's model has {known} blocks; drop --model-layers.")
    if given is not None and given > 10_000:  # Neuronpedia stores it as a 32-bit integer; no model is this deep
        raise InputError(f"--model-layers {given} is no model's number of blocks; pass the model's (e.g. 30).")
    return given if given is not None else known


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


def cmd_upload(args: argparse.Namespace) -> int:
    import os

    from sae_selfexplain_plugin.formats import neuronpedia_ids
    from sae_selfexplain_plugin.store import ResultsStore

    from ..neuronpedia import MODEL_NAME_REFUSED, check_host, upload
    from ..neuronpedia.api_key import API_KEY_ENV, api_key_from_env

    if bool(args.results) == bool(args.store):
        raise SelfExplainError("pass exactly one of --results FILE.jsonl or --store FILE.db.")
    records = _records(args)
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
        from ..neuronpedia import create_source_set

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


def add_parsers(sub: Any) -> None:
    """Declare this module's commands on the top parser's subparsers."""
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

    me = sub.add_parser(
        "merge", help="combine the results stores of one run (its shards) into one store; atomic, idempotent"
    )
    me.add_argument("stores", nargs="+", help="results stores (.db) of one SAE, model and settings")
    me.add_argument("--out", required=True, help="the merged store to write (replaced atomically)")
    me.set_defaults(func=cmd_merge)

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
