"""Diagnostic, never shipped: an adapter trained ON the latents it is then scored on.

    python research/fit_ceiling.py --out out/fit_ceiling.safetensors        # about 18 minutes on 2 CPU cores
    sae-selfexplain eval --limit 256 --adapter out/fit_ceiling.safetensors --no-vocabulary

It asks whether one injected vector per placeholder can make the frozen model say a latent's label at all.
Same architecture, template, layer and labels (up to 5 distinct peak tokens) as `train-adapter`, but the
training data are the eval's own first `--limit` live latents, trained on until they are fitted. Its eval
figures are an upper bound for the design on this model, not a held-out result: never ship such a file.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import cast

from sae_selfexplain_plugin.adapters.apps.demo_sae import DEMO_SAE_DIR
from sae_selfexplain_plugin.adapters.apps.train_direction_adapter import peak_label, untrained_adapter
from sae_selfexplain_plugin.adapters.backends import load_model
from sae_selfexplain_plugin.adapters.sae_lens import decoder_rows, load_sae

from sae_selfexplain_plugin import SelfExplainConfig
from sae_selfexplain_plugin.activation_examples import EXAMPLES_FILE, ActivationExamples
from sae_selfexplain_plugin.direction_adapter.training import (
    LabelledDirections,
    TrainableModel,
    TrainingSettings,
    train_adapter,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="adapter file to write")
    parser.add_argument("--sae", type=Path, default=DEMO_SAE_DIR, help="SAE folder with its activation examples")
    parser.add_argument("--model", help="model name or folder (default: the SAE's model_name)")
    parser.add_argument("--template", help="prompt template (default: from the tokenizer)")
    parser.add_argument("--layer", type=int, default=SelfExplainConfig().layer, help="injection block")
    parser.add_argument("--limit", type=int, default=256, help="the first N live latents, as `eval --limit N`")
    parser.add_argument("--steps", type=int, default=TrainingSettings().steps)
    parser.add_argument("--batch-size", type=int, default=TrainingSettings().batch_size)
    args = parser.parse_args(argv)

    sae, _ = load_sae(str(args.sae))
    examples = ActivationExamples.load(args.sae / EXAMPLES_FILE)
    found = [(f, label) for f in examples.live_features()[: args.limit] if (label := peak_label(examples, f))]
    data = LabelledDirections(decoder_rows(sae, [f for f, _ in found]), [label for _, label in found])
    backend = cast(TrainableModel, load_model(args.model, model_name=sae.cfg.metadata.model_name))
    config = SelfExplainConfig(layer=args.layer, template=args.template)
    adapter, explainer = untrained_adapter(sae, backend, config)
    adapter.metadata.trained_on = f"DIAGNOSTIC: the eval's first {args.limit} live latents ({len(found)}); never ship"
    start = time.perf_counter()
    # Validation = the training rows: the question is how far they can be fitted, not generalisation.
    settings = TrainingSettings(steps=args.steps, batch_size=args.batch_size, patience=args.steps)
    report = train_adapter(adapter, backend, explainer.prompt, data, data, settings)
    for h in report.history:
        print(f"step {h['step']:5d}  train {h['train_loss']:.3f}  fitted rows {h['validation_loss']:.3f}")
    adapter.metadata.validation = {
        "initial_loss": round(report.initial_validation_loss, 4),
        "fitted_loss": round(report.best_validation_loss, 4),
        "steps": report.steps,
    }
    adapter.save(args.out)
    print(f"{len(found)} latents, loss {report.initial_validation_loss:.3f} -> {report.best_validation_loss:.3f}")
    print(f"{time.perf_counter() - start:.0f}s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
