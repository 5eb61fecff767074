"""`train-adapter`: a direction adapter for an SAE, trained on the frozen model."""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from rich.console import Console

from sae_selfexplain_plugin import (
    SelfExplainError,
)
from sae_selfexplain_plugin.direction_adapter import ARCHITECTURES, HELD_OUT_LATENTS
from sae_selfexplain_plugin.direction_adapter.training import (
    DEFAULT_ARCHITECTURE,
    DEFAULT_RANK,
    DEFAULT_WORDS,
    LATENT_LABELS,
    TrainableModel,
    TrainingSettings,
)
from sae_selfexplain_plugin.files import check_writable

from .common import (
    Interrupted,
    _positive,
    _progress,
    _status,
    add_model_option,
    add_prompt_options,
    command_inputs,
    config_from_args,
    parse_features,
)
from .inputs import (
    _sae_and_examples,
)

if TYPE_CHECKING:
    pass


def cmd_train_adapter(args: argparse.Namespace) -> int:

    from ..apps.train_direction_adapter import train_for_sae
    from ..backends import load_model

    out = Path(args.out)
    check_writable(out, "--out", command_inputs(args))
    sae, examples = _sae_and_examples(args, required=False)
    checkpoint = out.with_suffix(out.suffix + ".ckpt")
    if checkpoint.exists() and not args.resume:
        raise SelfExplainError(f"{checkpoint} exists from an earlier run: pass --resume to continue it, or delete it.")
    settings = TrainingSettings(
        steps=args.steps,
        batch_size=args.train_batch_size,
        lr=args.lr,
        eval_every=args.eval_every,
        patience=args.patience,
    )
    config = config_from_args(args)
    with _status("Loading the model...", "loaded the model"):
        backend = load_model(args.model, model_name=sae.cfg.metadata.model_name)
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
            descriptions=_descriptions(args, sae),
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


def cmd_describe(args: argparse.Namespace) -> int:
    from ..apps.descriptions import describe_latents, descriptions_header, usable_description
    from ..backends import load_model
    from ..sae_lens import sae_identity

    out = Path(args.out)
    check_writable(out, "--out", command_inputs(args))
    sae, examples = _sae_and_examples(args)
    if args.latents:
        latents = parse_features(args.latents, sae.cfg.d_sae)
    elif sae.cfg.d_sae > args.held_out:
        latents = list(range(args.held_out, sae.cfg.d_sae))  # the latents train-adapter trains on
    else:
        raise SelfExplainError(f"the SAE has no latents at or above --held-out {args.held_out}: pass --latents.")
    with _status(f"Loading the explainer {args.explainer}...", "loaded the explainer"):
        backend = load_model(args.explainer)
    header = descriptions_header(sae_identity(sae), backend.model_id)
    start = time.perf_counter()
    try:
        with _progress() as progress:
            task = progress.add_task(f"describing latents ({backend.model_id})", total=len(latents))
            texts = describe_latents(
                backend, examples, latents, out, header, resume=args.resume, batch_size=args.batch_size,
                progress=lambda n: progress.advance(task, n),
            )  # fmt: skip
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted; every finished batch is in {out}: rerun with --resume.") from None
    usable = sum(usable_description(texts.get(f, "")) for f in latents)
    Console().print(
        f"{len(latents)} latents described by {backend.model_id} in {time.perf_counter() - start:.0f}s: {out}; "
        f"{usable} usable as teacher labels (words, not a token list)",
        markup=False,
    )
    return 0


def _descriptions(args: argparse.Namespace, sae: Any) -> tuple[str, dict[int, str]] | None:
    """--descriptions, read and checked against the SAE: (what they are, feature -> description)."""
    from ..apps.descriptions import read_descriptions
    from ..sae_lens import sae_identity

    if args.descriptions is None:
        return None
    path = Path(args.descriptions)
    if not path.is_file():
        raise SelfExplainError(f"--descriptions {path} does not exist; write it with `sae-selfexplain describe`.")
    header, texts = read_descriptions(path, sae=sae_identity(sae))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return f"{path.name}, sha256 {digest}, by {header.get('explainer')}", texts


def _rank(args: argparse.Namespace) -> int:
    if args.rank is not None:
        return int(args.rank)
    return DEFAULT_RANK if args.architecture == "scalar-affine-low-rank" else 0


def add_parsers(sub: Any) -> None:
    """Declare this module's commands on the top parser's subparsers."""
    de = sub.add_parser(
        "describe", help="describe SAE latents with an explainer model (auto-interp), resumable: teacher labels"
    )
    de.add_argument("--sae", help="a SAELens SAE folder (default: the shipped demo SAE)")
    de.add_argument("--examples", help="activation examples, explain split (default: in the SAE folder)")
    de.add_argument("--explainer", default="qwen2.5-coder-1.5b-instruct", help="embedded model or folder (%(default)s)")
    de.add_argument("--latents", help="e.g. 1024-4095 (default: the latents at or above --held-out)")
    de.add_argument("--held-out", type=int, default=HELD_OUT_LATENTS, help="(%(default)s)")
    de.add_argument("--out", required=True, help="descriptions file (JSONL), appended batch by batch")
    de.add_argument("--resume", action="store_true", help="keep the descriptions already in --out, do the rest")
    de.add_argument("--batch-size", type=_positive, default=4, help="prompts per generate (%(default)s)")
    de.set_defaults(func=cmd_describe)

    tr = sub.add_parser("train-adapter", help="train a direction adapter for an SAE on the frozen model (CPU)")
    tr.add_argument("--sae", help="a SAELens SAE folder (default: the shipped demo SAE)")
    tr.add_argument("--examples", help="activation examples, for token-feature latents (default: in the SAE folder)")
    add_model_option(tr)
    tr.add_argument("--out", default="out/adapter.safetensors", help="adapter file (default: %(default)s)")
    tr.add_argument("--architecture", choices=ARCHITECTURES, default=DEFAULT_ARCHITECTURE, help="(%(default)s)")
    tr.add_argument(
        "--rank", type=int, help=f"of the low-rank part (default: {DEFAULT_RANK} for scalar-affine-low-rank, else 0)"
    )
    tr.add_argument(
        "--slots", type=int,
        help="injected vectors per feature: 1 for every placeholder, or one per placeholder (the default)",
    )  # fmt: skip
    add_prompt_options(tr)
    tr.add_argument("--words", type=_positive, default=DEFAULT_WORDS, help="vocabulary words to train on (%(default)s)")
    tr.add_argument(
        "--latent-labels", choices=LATENT_LABELS, default=LATENT_LABELS[0],
        help="label each training latent with its top peak tokens, train only on token features with their word, or "
        "with the descriptions of --descriptions (mixed: the word for token features)",
    )  # fmt: skip
    tr.add_argument(
        "--descriptions", help="with --latent-labels descriptions or mixed: the latents' descriptions (`describe`)"
    )
    tr.add_argument("--held-out", type=int, default=HELD_OUT_LATENTS, help="latents below this never train")
    defaults = TrainingSettings()
    tr.add_argument("--steps", type=int, default=defaults.steps, help="(%(default)s)")
    # dest: a training batch, not SelfExplainConfig.batch_size (generation rows), which config_from_args reads
    tr.add_argument(
        "--batch-size", dest="train_batch_size", type=int, default=defaults.batch_size, help="(%(default)s)"
    )
    tr.add_argument("--lr", type=float, default=defaults.lr, help="(%(default)s)")
    tr.add_argument("--eval-every", type=int, default=defaults.eval_every, help="steps (%(default)s)")
    tr.add_argument("--patience", type=int, default=defaults.patience, help="evaluations without improvement")
    tr.add_argument("--resume", action="store_true", help="continue from OUT.ckpt")
    tr.set_defaults(func=cmd_train_adapter)
