"""`train-adapter`: a direction adapter for an SAE, trained on the frozen model."""

from __future__ import annotations

import argparse
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
    _positive,
    _progress,
    _status,
    add_model_option,
    add_prompt_options,
    command_inputs,
    config_from_args,
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


def add_parsers(sub: Any) -> None:
    """Declare this module's commands on the top parser's subparsers."""
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
        help="label each training latent with its top peak tokens, or train only on token features with their word",
    )  # fmt: skip
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
