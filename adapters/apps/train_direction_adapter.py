"""Training a direction adapter for an SAE, from offline data only (no hub, no judge model):

- word directions: single-token words of the model's own vocabulary, read in a carrier sentence at the
  SAE's layer, minus their mean (an SAE decoder row has no mean component either), labelled with the word.
  The benchmark's word list (data/words.txt) is left out;
- SAE latents, from the SAE's activation examples: by default every live latent, labelled with up to 5
  distinct peak tokens of its top contexts (`peak_label`); or ("word") only token features (at least 5 of
  10 top contexts peak on one alphabetic word of >= 3 letters), labelled with that word; or
  ("descriptions") every latent an explainer model described in words (descriptions.py: a file written by
  `describe`, token lists and empty answers left out); or ("mixed") descriptions, but the word for token
  features. Latents below `held_out` never train: the demo SAE's eval, `sae-latent` benchmark and demo use
  latents 0..1023.

Both are split 90/10 into training and validation by a seeded shuffle.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE

from sae_selfexplain_plugin import SelfExplainConfig, SelfExplainer
from sae_selfexplain_plugin.activation_examples import ActivationExamples
from sae_selfexplain_plugin.config import DEFAULT_SCALE
from sae_selfexplain_plugin.direction_adapter import HELD_OUT_LATENTS, AdapterMetadata, DirectionAdapter
from sae_selfexplain_plugin.direction_adapter.training import (
    DEFAULT_ARCHITECTURE,
    DEFAULT_RANK,
    DEFAULT_WORDS,
    LATENT_LABELS,
    LabelledDirections,
    TrainableModel,
    TrainingReport,
    TrainingSettings,
    train_adapter,
)
from sae_selfexplain_plugin.errors import InputError
from sae_selfexplain_plugin.word_recovery import CARRIER, load_words, single_token_words, word_vectors

from ..sae_lens import check_compatible, decoder_rows, sae_identity, sae_layer
from .descriptions import usable_description
from .sae_latent import token_latents

LATENT_MIN_PEAKS = 5  # a "word" training latent: >= 5 of its 10 top contexts peak on one word
LATENT_LABEL_TOKENS = 5  # a "tokens" label names up to 5 peak tokens (as many as the top-tokens baseline)
LATENT_LABEL_MEANING = {
    "tokens": f"with up to {LATENT_LABEL_TOKENS} peak tokens of their top contexts",
    "word": f"with their word (token features: >= {LATENT_MIN_PEAKS} of 10 top contexts peak on it)",
    "descriptions": "with an explainer model's descriptions of their explain-split contexts",
    "mixed": "with an explainer model's descriptions, and token features with their word",
}


def vocabulary_words(tokenizer: Any, exclude: set[str], n: int, seed: int = 0) -> list[str]:
    """Up to `n` lowercase alphabetic words (>= 3 letters) that are one token after a space and inside the
    carrier sentence, not in `exclude`, in a seeded random order."""
    candidates = sorted(
        {
            w
            for w in (tokenizer.convert_tokens_to_string([t]) for t in tokenizer.get_vocab())
            if w.startswith(" ") and w[1:].isalpha() and w[1:].islower() and len(w) >= 4
        }
    )
    random.Random(seed).shuffle(candidates)
    words = []
    for w in (c[1:] for c in candidates):
        if w in exclude or not single_token_words(tokenizer, [w]):
            continue
        text = CARRIER.format(word=" " + w)
        start = text.index(" " + w)
        spans = tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
        if sum(1 for s, e in spans if e > s and s < start + len(w) + 1 and e > start) == 1:
            words.append(w)
        if len(words) == n:
            break
    return words


def word_directions(backend: Any, words: list[str], layer: int) -> LabelledDirections:
    """Each word's in-context residual entering block `layer`, minus the mean over `words`."""
    vectors = word_vectors(backend, words, layer, in_context=True)
    return LabelledDirections(vectors - vectors.mean(0), list(words))


def latent_directions(
    sae: SAE[Any],
    examples: ActivationExamples,
    latents: range,
    labels: str = LATENT_LABELS[0],
    min_peaks: int = LATENT_MIN_PEAKS,
    descriptions: dict[int, str] | None = None,
) -> LabelledDirections:
    """Decoder rows of latents among `latents` with their labels, by `labels`:
    "tokens": every live latent, labelled with its top contexts' distinct peak tokens (`peak_label`);
    "word": token-feature latents only (the sae-latent benchmark's rule, with `min_peaks`), with their word;
    "descriptions": the latents `descriptions` describes in words (`usable_description`), with them;
    "mixed": as "descriptions", but a token feature's label is its word."""
    check_latent_labels(labels)
    if labels in ("descriptions", "mixed"):
        if descriptions is None:
            raise InputError(f"--latent-labels {labels} needs the descriptions: pass --descriptions FILE (`describe`).")
        words = dict(token_latents(examples, latents, min_peaks)) if labels == "mixed" else {}
        found = [
            (f, words.get(f) or descriptions[f])
            for f in latents
            if f in words or (f in descriptions and usable_description(descriptions[f]))
        ]
    elif labels == "word":
        found = token_latents(examples, latents, min_peaks)
    else:
        live = set(examples.live_features())
        found = [(f, label) for f in latents if f in live and (label := peak_label(examples, f))]
    if not found:
        raise InputError(f"no latent in the training range has a {labels!r} label; train on words only.")
    return LabelledDirections(decoder_rows(sae, [f for f, _ in found]), [w for _, w in found])


def check_latent_labels(labels: str) -> None:
    if labels not in LATENT_LABELS:
        raise InputError(f"latent labels must be one of {', '.join(LATENT_LABELS)}, got {labels!r}.")


def peak_label(examples: ActivationExamples, feature: int, n: int = LATENT_LABEL_TOKENS) -> str:
    """Up to `n` distinct (case-insensitively) peak tokens of `feature`'s top contexts, strongest first, joined
    by ", "; tokens with a quote are left out (the label sits inside the template's quotes)."""
    seen: dict[str, str] = {}
    for token in examples[feature].peak_tokens():
        if token and '"' not in token and token.lower() not in seen:
            seen[token.lower()] = token
    return ", ".join(list(seen.values())[:n])


def split(data: LabelledDirections, fraction: float, seed: int) -> tuple[LabelledDirections, LabelledDirections]:
    """(train, validation) with `fraction` of the rows in validation, by a seeded shuffle."""
    order = list(range(len(data)))
    random.Random(seed).shuffle(order)
    cut = max(1, round(len(order) * fraction))

    def part(rows: list[int]) -> LabelledDirections:
        return LabelledDirections(data.directions[rows], [data.labels[i] for i in rows])

    return part(order[cut:]), part(order[:cut])


def join(*parts: LabelledDirections) -> LabelledDirections:
    return LabelledDirections(torch.cat([p.directions for p in parts]), [x for p in parts for x in p.labels])


def untrained_adapter(
    sae: SAE[Any],
    backend: TrainableModel,
    config: SelfExplainConfig,
    architecture: str = DEFAULT_ARCHITECTURE,
    rank: int = DEFAULT_RANK,
    slots: int | None = None,
    seed: int = 0,
) -> tuple[DirectionAdapter, SelfExplainer]:
    """A new adapter for `sae`'s directions on `backend`, and the bare explainer it trains against. `slots`:
    injected vectors per feature, 1 or the template's number of placeholders (the default). Untrained, it
    injects what the fixed policy does: the direction at the default scale. Checked before any data is built."""
    check_compatible(sae, backend)
    explainer = SelfExplainer(backend, config.replace(adapter=None))
    placeholders = len(explainer.prompt.placeholder_positions)
    metadata = AdapterMetadata(
        model_id=backend.model_id,
        d_model=backend.d_model,
        source=str(sae.cfg.metadata.hook_name),
        layer=config.layer,
        template=explainer.prompt.template,
        architecture=architecture,
        rank=rank,
        slots=placeholders if slots is None else slots,
    )
    adapter = DirectionAdapter(metadata, init_scale=explainer.reference_norm * DEFAULT_SCALE, seed=seed)
    adapter.check_slots(placeholders)
    return adapter, explainer


def train_for_sae(
    sae: SAE[Any],
    backend: TrainableModel,
    examples: ActivationExamples | None,
    out: Path,
    *,
    config: SelfExplainConfig,
    architecture: str = DEFAULT_ARCHITECTURE,
    rank: int = DEFAULT_RANK,
    slots: int | None = None,
    n_words: int = DEFAULT_WORDS,
    latent_labels: str = LATENT_LABELS[0],
    descriptions: tuple[str, dict[int, str]] | None = None,
    held_out: int = HELD_OUT_LATENTS,
    settings: TrainingSettings | None = None,
    checkpoint: Path | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[DirectionAdapter, TrainingReport]:
    """Build the training data, train an adapter (`untrained_adapter`) on the frozen model, save it to `out`.
    `descriptions`: (what they are, feature -> description) for the "descriptions" and "mixed" labels."""
    check_latent_labels(latent_labels)  # before the word data is built
    if n_words < 1:  # 0 would never reach `len(words) == n` and read the whole vocabulary
        raise InputError(f"n_words (--words) must be >= 1, got {n_words}; pass e.g. --words {DEFAULT_WORDS}.")
    settings = settings or TrainingSettings()
    adapter, explainer = untrained_adapter(sae, backend, config, architecture, rank, slots, settings.seed)
    source = sae_layer(sae)
    words = vocabulary_words(backend.tokenizer, set(load_words()), n_words, settings.seed)
    train_words, val_words = split(word_directions(backend, words, source), 0.1, settings.seed)
    parts = [(train_words, val_words)]
    if examples is not None and held_out < sae.cfg.d_sae:
        written = None if descriptions is None else descriptions[1]
        latents = latent_directions(sae, examples, range(held_out, sae.cfg.d_sae), latent_labels, descriptions=written)
        parts.append(split(latents, 0.1, settings.seed))
    train, validation = join(*(p[0] for p in parts)), join(*(p[1] for p in parts))
    described = f"{len(words)} vocabulary words (centred in-context residuals at block {source}, words.txt excluded)"
    if len(parts) > 1:
        n_latents = len(parts[1][0]) + len(parts[1][1])
        described += f"; {n_latents} latents >= {held_out} labelled {LATENT_LABEL_MEANING[latent_labels]}"
        if descriptions is not None and latent_labels in ("descriptions", "mixed"):
            described += f" ({descriptions[0]})"  # which file, by whom
        adapter.metadata.trained_latents = [[held_out, sae.cfg.d_sae - 1]]
    adapter.metadata.trained_on = described + "; 10% of each held out for validation"
    report = train_adapter(
        adapter, backend, explainer.prompt, train, validation, settings, checkpoint=checkpoint, progress=progress,
        identity={"sae": sae_identity(sae)},
    )  # fmt: skip
    adapter.metadata.validation = {
        "initial_loss": round(report.initial_validation_loss, 4),
        "best_loss": round(report.best_validation_loss, 4),
        "steps": report.steps,
        "train_rows": len(train),
        "validation_rows": len(validation),
    }
    adapter.save(out)
    return adapter, report
