"""The `sae-selfexplain` command line. One module per command group, each declaring its own commands:

- `explain`: demo, explain, contexts;
- `evaluate`: eval, bench word-recovery, bench sae-latent;
- `train`: describe, train-adapter;
- `results`: dashboard, validate, export, upload;
- `common`: options several commands share and the one place they become a `SelfExplainConfig`;
- `inputs`: SAEs, activation examples and results as commands read them, and their identity checks.

A new command goes in the module of its group (or a new one listed in `build_parser`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from rich.markup import escape

from sae_selfexplain_plugin import SelfExplainError, __version__

from ..neuronpedia.api_key import redact_api_key
from . import evaluate, explain, results, train
from .common import Interrupted, _Parser, console


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sae-selfexplain", description="Make a language model explain its own SAE features.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of any error")
    sub = parser.add_subparsers(dest="command", required=True)
    for commands in (explain, evaluate, train, results):
        commands.add_parsers(sub)
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
