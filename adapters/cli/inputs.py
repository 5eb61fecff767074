"""What commands read besides a model: an SAE and its activation examples, results from a JSONL file or a store,
and the checks that they belong together (one SAE, one run)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

from sae_selfexplain_plugin import (
    FeatureExplanations,
    InputError,
    SelfExplainError,
)
from sae_selfexplain_plugin.activation_examples import ActivationExamples
from sae_selfexplain_plugin.formats import checked_record

from ..apps.contexts import examples_beside

if TYPE_CHECKING:
    pass


@overload
def _sae_and_examples(args: argparse.Namespace) -> tuple[Any, ActivationExamples]: ...


@overload
def _sae_and_examples(args: argparse.Namespace, required: bool) -> tuple[Any, ActivationExamples | None]: ...


def _sae_and_examples(args: argparse.Namespace, required: bool = True) -> tuple[Any, ActivationExamples | None]:
    """--sae (default: the demo SAE) and its activation examples (--examples, default: in its folder; None
    when not `required` and there are none), refused if they were collected for another SAE."""
    from ..apps.demo_sae import DEMO_SAE_DIR
    from ..sae_lens import load_sae, sae_identity

    sae, _ = load_sae(str(Path(args.sae) if args.sae else DEMO_SAE_DIR))
    path = examples_path(args)
    if not required and not path.is_file():
        return sae, None
    return sae, _checked_examples(ActivationExamples.load(path), path, sae_identity(sae))


def examples_path(args: argparse.Namespace) -> Path:
    """--examples, else the activation examples in the --sae folder (default: the demo SAE's)."""
    from sae_selfexplain_plugin.activation_examples import EXAMPLES_FILE

    from ..apps.demo_sae import DEMO_SAE_DIR

    return Path(args.examples) if args.examples else Path(args.sae or DEMO_SAE_DIR) / EXAMPLES_FILE


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

    from ..apps.demo_sae import demo_examples, load_demo_sae
    from ..sae_lens import sae_identity

    if records and same_sae(sae_identity(load_demo_sae()), records[0].sae):
        return demo_examples()
    return None


def _records(args: argparse.Namespace) -> list[FeatureExplanations]:
    return _read_records(args.results, args.store, args.sae_id, args.settings)


def _read_records(
    results: str | None, store_path: str | None, sae_id: str | None, settings: str | None = None
) -> list[FeatureExplanations]:
    """Records from a results JSONL (ours) or a results store, optionally one SAE's (`sae_id`: its name, or
    name@fingerprint) and one run's (`settings`); none is an error that names the filters."""
    if results:
        from sae_selfexplain_plugin.formats import read_documents

        records = [checked_record(doc, f"{results} line {line}") for line, doc in read_documents(results)]
        records = [r for r in records if _selected(r, sae_id, settings)]
    else:
        from sae_selfexplain_plugin.store import ResultsStore

        if store_path is None or not Path(store_path).is_file():
            raise SelfExplainError(f"no results store at {store_path}; pass --results FILE or --store FILE.db.")
        with ResultsStore(store_path, read_only=True) as store:
            records = [record for _, record in store.records(sae_id=sae_id, settings_hash=settings)]
    if not records:
        filters = [f"{flag} {value}" for flag, value in (("--sae-id", sae_id), ("--settings", settings)) if value]
        raise SelfExplainError(
            f"no results in {results or store_path}"
            + (f" match {' and '.join(filters)}" if filters else "")
            + "; check the file"
            + (", or the filters" if filters else "")
            + "."
        )
    return records


def _selected(record: FeatureExplanations, sae_id: str | None, settings: str | None) -> bool:
    """Whether a record from a JSONL passes the filters a store applies in SQL (ResultsStore.records)."""
    name, fingerprint = record.sae.get("neuronpedia_id"), record.sae.get("fingerprint")
    keys = {str(name), f"{name}@{fingerprint}"} if name else set()
    return (sae_id is None or sae_id in keys) and (settings is None or record.settings_hash == settings)


def _add_results_source(parser: argparse.ArgumentParser) -> None:
    """Where `export` and `upload` read results from (see _records)."""
    parser.add_argument("--results", help="a results JSONL written by `explain`")
    parser.add_argument("--store", help="a results store (.db)")
    parser.add_argument("--sae-id", help="with --store: only this SAE (its neuronpedia_id or path)")
    parser.add_argument("--settings", help="with --store: only the run with this settings hash")
