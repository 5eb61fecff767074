"""What every command shares: the console and progress bars, option types, the options several commands
declare, and how those become a `SelfExplainConfig`."""

from __future__ import annotations

import argparse
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

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

from sae_selfexplain_plugin import (
    InputError,
    SelfExplainConfig,
    SelfExplainError,
)
from sae_selfexplain_plugin.config import DEFAULT_SCALES, POLICIES

from ..backends.embedded import get_embedded, load_backend
from ..backends.transformers import TransformersBackend
from ..neuronpedia import MAX_TIMEOUT_S

if TYPE_CHECKING:
    from ..apps.evaluation import Embedder


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


def _embedder_or_none() -> Embedder | None:
    """The sentence-embedding model for the embedding score, or None (with a note) when it is not installed."""
    from ..apps.evaluation import Embedder

    try:
        return Embedder()
    except SelfExplainError as e:
        console.print(f"[dim]embedding score skipped: {escape(str(e))}[/dim]")
        return None


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
    from sae_selfexplain_plugin.direction_adapter.choice import AUTO, choose_adapter

    scales = getattr(args, "scales", None)
    choice = "none" if args.adapter == AUTO and scales else str(args.adapter)
    config = config.replace(no_repeats=REPEATS[getattr(args, "repeats", "auto")])
    config = choose_adapter(config, choice, str(sae.cfg.metadata.hook_name), backend)
    return config.replace(adapter_scales=_scales(scales)) if config.adapter is not None and scales else config


def _timeout(text: str) -> float:
    """An argparse type: seconds above 0 and at most MAX_TIMEOUT_S (so never NaN or inf)."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds <= MAX_TIMEOUT_S:
        raise argparse.ArgumentTypeError(f"expected seconds above 0 and at most {MAX_TIMEOUT_S:g}, got {text!r}")
    return seconds


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block), exit 2 like every other input error."""

    def error(self, message: str) -> NoReturn:
        console.print(
            f"[bold red]error:[/bold red] {escape(self.prog)}: {escape(message)} (see {escape(self.prog)} --help)",
            soft_wrap=True,
            highlight=False,
        )
        raise SystemExit(2)


def add_model_option(parser: argparse.ArgumentParser) -> None:
    """--model for commands that work on an SAE: its model unless another is named."""
    parser.add_argument("--model", help="embedded model name or checkpoint folder (default: the SAE's model_name)")


def add_prompt_options(parser: argparse.ArgumentParser, *, template: bool = True, layer: bool = True) -> None:
    """--layer (the injection block) and --template (see `config_from_args`)."""
    if layer:
        parser.add_argument("--layer", type=int, default=SelfExplainConfig().layer, help="injection block")
    if template:
        parser.add_argument("--template", help="prompt template (default: from the tokenizer)")


def add_generation_options(
    parser: argparse.ArgumentParser, *, max_new_tokens: int, template: bool = True, layer: bool = True
) -> None:
    """The prompt options, --scales and --max-new-tokens (see `config_from_args`). `max_new_tokens` is the
    command's default: each command states why it differs from the library's."""
    add_prompt_options(parser, template=template, layer=layer)
    parser.add_argument("--scales", help="comma-separated relative scales")
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="(default: %(default)s)")


# The options `config_from_args` reads, by SelfExplainConfig field (each is declared once, above or beside it).
_CONFIG_OPTIONS = ("layer", "template", "max_new_tokens", "batch_size", "policy", "generate", "keep_top", "metrics")


def config_from_args(args: argparse.Namespace) -> SelfExplainConfig:
    """The one place a command's options become a SelfExplainConfig: every option the command declared sets
    its field (--scales parsed), the others keep the library's defaults."""
    fields = {name: getattr(args, name) for name in _CONFIG_OPTIONS if hasattr(args, name)}
    if hasattr(args, "scales"):
        fields["scales"] = _scales(args.scales)
    return SelfExplainConfig(**fields)


def parse_features(spec: str, d_sae: int) -> list[int]:
    """`0-1023`, `1,5,9`, `0-9,20`, or the path of a file of indices (whitespace or comma separated)."""
    path = Path(spec)
    try:
        text = path.read_text(encoding="utf-8") if path.is_file() else spec
    except UnicodeDecodeError:
        raise InputError(f"--features file {spec} is not text: write indices and ranges such as 0-1023,2048.") from None
    ranges: list[tuple[int, int]] = []
    for part in (p for p in re.split(r"[\s,]+", text.strip()) if p):
        m = re.fullmatch(r"([0-9]+)(?:-([0-9]+))?", part)  # ASCII digits only: no full-width or other scripts
        if not m:
            raise InputError(f"cannot read feature {part!r}: use indices and ranges such as 0-1023,2048 or a file.")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise InputError(f"feature range {part!r} is empty: write it low-high.")
        if hi >= d_sae:  # checked per range, before any list is built
            raise InputError(f"features up to {hi} are outside the SAE, which has features 0..{d_sae - 1}.")
        ranges.append((lo, hi))
    if not ranges:
        raise InputError(f"no features in {spec!r}.")
    return list(dict.fromkeys(f for lo, hi in ranges for f in range(lo, hi + 1)))  # de-duplicated, order kept


# The options that name files or folders a command reads (a name that is not a path matches no output).
_INPUT_OPTIONS = (
    "sae", "model", "features", "adapter", "examples", "corpus", "contexts", "results", "store", "descriptions",
    "explainer", "latents", "judge",
)  # fmt: skip


def command_inputs(args: argparse.Namespace, **more: str | Path | None) -> dict[str, str | Path | None]:
    """Every file or folder the command reads, by option ({"--model": ...}), and `more` ({what: path}): what
    no output may overwrite (`files.refuse_input`). A results JSONL brings the examples found beside it."""
    found: dict[str, str | Path | None] = {
        f"--{name}": getattr(args, name) for name in _INPUT_OPTIONS if hasattr(args, name)
    }
    results = getattr(args, "results", None)
    if isinstance(results, str) and not results.endswith(".db"):
        from ..apps.contexts import examples_beside

        found["the examples beside the results"] = examples_beside(results)
    return {**found, **more}
