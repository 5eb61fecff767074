"""Ground-truth benchmark: inject a residual vector that stands for a known word; is the word named?

Two cases:
- same-layer: the word's residual at the injection layer, the word alone after BOS (a sanity check);
- cross-layer, in context: the residual at the word's position inside a sentence, read at a later
  layer (where SAEs usually sit) and injected at the engine's layer.

Two criteria: *literal* (the explanation names the word) and *semantic* (among all the benchmark's words, the
explanation's sentence embedding is nearest to its own word's: "violin" -> "a stringed instrument with four
strings" counts). Semantic rates are success@1 and MRR over the candidate words (chance: 1/n_words).

The cross-layer vectors come `raw`, or `centred`: minus the mean over the word list. A raw residual carries
the large mean component every residual shares; an SAE decoder row has none of it, so `centred` is the case
that looks like an SAE feature.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib.resources import files
from typing import Any

import torch

from .backend import Backend, left_pad
from .config import POLICIES, SelfExplainConfig
from .engine import SelfExplainer
from .errors import InputError
from .policies import ranked_scales
from .results import FeatureExplanations

Embed = Callable[[Sequence[str]], torch.Tensor]
"""Texts -> unit-norm sentence embeddings [n, dim] (e.g. evaluation.Embedder.embed)."""

CARRIER = "We talked about{word} and other things."
"""Sentence the cross-layer case reads each word from; `{word}` takes the word with its leading space."""


def load_words() -> list[str]:
    """The shipped list of common English words."""
    text = files("sae_selfexplain_plugin").joinpath("data/words.txt").read_text(encoding="utf-8")
    return [w.strip() for w in text.splitlines() if w.strip() and not w.startswith("#")]


def single_token_words(tokenizer: Any, words: Sequence[str]) -> list[str]:
    """The words whose space-prefixed form (" cat") is one token for this tokenizer."""
    return [w for w in words if len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1]


def recovered(text: str, word: str) -> bool:
    """Whether `text` names `word` as a whole word (case-insensitive)."""
    return re.search(rf"(?<![A-Za-z]){re.escape(word)}(?![A-Za-z])", text, flags=re.IGNORECASE) is not None


def word_vectors(backend: Backend, words: Sequence[str], layer: int, in_context: bool) -> torch.Tensor:
    """One residual vector per word, read at the input of block `layer`: [n_words, d_model]."""
    tok = backend.tokenizer
    seqs: list[list[int]] = []
    where: list[int] = []  # index of the word's token within its own (unpadded) sequence
    for w in words:
        if in_context:
            text = CARRIER.format(word=" " + w)
            start = text.index(" " + w)
            enc = tok(text, return_offsets_mapping=True)
            hits = [
                i for i, (s, e) in enumerate(enc["offset_mapping"]) if e > s and s < start + len(w) + 1 and e > start
            ]
            if len(hits) != 1:
                raise InputError(f"word {w!r} is not a single token in the carrier sentence; filter the word list.")
            seqs.append(list(enc["input_ids"]))
            where.append(hits[0])
        else:
            bos = getattr(tok, "bos_token_id", None)
            ids = tok(" " + w, add_special_tokens=False)["input_ids"]
            seqs.append(([bos] if bos is not None else []) + list(ids))
            where.append(len(seqs[-1]) - 1)
    pad = getattr(tok, "pad_token_id", None) or 0
    out = []
    for start in range(0, len(seqs), 64):
        batch = seqs[start : start + 64]
        ids, mask = left_pad(batch, pad)
        resid = backend.residual(ids, mask, layer)
        width = ids.shape[1]
        for row, (seq, pos) in enumerate(zip(batch, where[start : start + 64])):
            out.append(resid[row, width - len(seq) + pos].float().cpu())
    return torch.stack(out)


@dataclass
class RecoveryRow:
    """Recovery rate per scale for one (template, source) pair."""

    model_id: str
    template: str
    source: str  # "same-layer" or "block N"
    source_layer: int
    inject_layer: int
    n_words: int
    rate_by_scale: dict[float, float]
    default_scale: float
    examples: dict[str, str] = field(default_factory=dict)  # word -> explanation at the default scale
    # policy -> recovery when each word's scale is chosen by that policy from its own metric sweep
    rate_by_policy: dict[str, float] = field(default_factory=dict)
    vectors: str = "raw"  # cross-layer vectors: "raw" or "centred"
    # semantic criterion (empty without an embedder): success@1 and MRR of the word among all n_words
    semantic_by_scale: dict[float, float] = field(default_factory=dict)
    mrr_by_scale: dict[float, float] = field(default_factory=dict)
    semantic_by_policy: dict[str, float] = field(default_factory=dict)

    @property
    def best_scale(self) -> float:
        return max(self.rate_by_scale, key=lambda s: self.rate_by_scale[s])

    @property
    def best_rate(self) -> float:
        return self.rate_by_scale[self.best_scale]

    @property
    def default_rate(self) -> float:
        return self.rate_by_scale[self.default_scale]

    @property
    def semantic_chance(self) -> float:
        """success@1 of an explanation unrelated to its word."""
        return 1 / self.n_words

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("rate_by_scale", "semantic_by_scale", "mrr_by_scale"):
            d[key] = {str(k): v for k, v in d[key].items()}
        d["semantic_chance"] = self.semantic_chance
        return d


def semantic_ranks(texts: Sequence[str], truth: Sequence[int], candidates: torch.Tensor, embed: Embed) -> torch.Tensor:
    """The 1-based rank of each text's own candidate (`truth[i]`, a row of `candidates`, the candidates' unit
    embeddings) among all candidates by cosine similarity to the text's embedding. Ties rank pessimistically,
    so an empty or constant explanation never ranks first by luck."""
    sims = embed(texts) @ candidates.T  # [n_texts, n_candidates]
    own = sims[torch.arange(len(truth)), torch.as_tensor(list(truth))]
    return (sims >= own[:, None]).sum(dim=1)


def default_source_layers(n_layers: int) -> list[int]:
    """Blocks at 1/3 and 1/2 depth: 6 and 9 on an 18-layer model, 10 and 15 on a 30-layer one."""
    return sorted({round(n_layers / 3), round(n_layers / 2)})


def run_word_recovery(
    backend: Backend,
    *,
    templates: Sequence[str],
    config: SelfExplainConfig,
    source_layers: Sequence[int] | None = None,
    words: Sequence[str] | None = None,
    progress: Callable[[int], None] | None = None,
    vectors: str = "raw",
    same_layer: bool = True,
    embed: Embed | None = None,
) -> list[RecoveryRow]:
    """Recovery per template, source (same-layer and each cross-layer source) and scale; cross-layer
    vectors `raw` or `centred` (module docstring)."""
    if vectors not in ("raw", "centred"):
        raise InputError(f"vectors must be 'raw' or 'centred', got {vectors!r}.")
    tok = backend.tokenizer
    words = single_token_words(tok, load_words() if words is None else words)
    if not words:
        raise InputError("no word of the list is a single token for this tokenizer.")
    sources = [("same-layer", config.layer, False)] if same_layer else []
    sources += [
        (f"block {layer}", layer, True)
        for layer in (default_source_layers(backend.n_layers) if source_layers is None else source_layers)
    ]
    inputs = {}
    for name, layer, ctx in sources:
        v = word_vectors(backend, words, layer, ctx)
        inputs[name] = v - v.mean(0) if ctx and vectors == "centred" else v
    rows = []
    for template in templates:
        explainer = SelfExplainer(backend, config.replace(template=template))
        for name, layer, ctx in sources:
            records = explainer.explain(inputs[name], progress=progress)
            kind = vectors if ctx else "raw"
            rows.append(recovery_row(explainer, records, words, name, layer, kind, embed=embed))
    return rows


def recovery_row(
    explainer: SelfExplainer,
    records: Sequence[FeatureExplanations],
    names: Sequence[str],
    source: str,
    source_layer: int,
    vectors: str,
    keys: Sequence[str] | None = None,
    embed: Embed | None = None,
) -> RecoveryRow:
    """The recovery of `names` by `records` (explained by `explainer`), per scale and policy; examples at the
    default scale under `keys` (default: the names). With `embed`, the semantic criterion too."""
    cfg = explainer.config  # with an adapter, its own sweep
    default_scale = min(cfg.scales, key=lambda s: abs(s - cfg.chosen_scale))
    row = RecoveryRow(
        explainer.backend.model_id,
        explainer.prompt.template,
        source,
        source_layer,
        cfg.layer,
        len(names),
        recovery_by_scale(records, names, cfg),
        default_scale,
        {k: r.at_scale(default_scale)[0].text for r, k in zip(records, keys or names)},
        rate_by_policy(records, names, cfg),
        vectors,
    )
    if embed is not None:
        add_semantic(row, records, names, cfg, embed)
    return row


def add_semantic(
    row: RecoveryRow,
    records: Sequence[FeatureExplanations],
    names: Sequence[str],
    config: SelfExplainConfig,
    embed: Embed,
) -> None:
    """Fill `row`'s semantic rates: per scale over every sample, per policy over the first sample."""
    candidates = embed(list(names))
    for s in config.scales:
        pairs = [(c.text, i) for i, r in enumerate(records) for c in r.at_scale(s)]
        ranks = semantic_ranks([t for t, _ in pairs], [i for _, i in pairs], candidates, embed).float()
        row.semantic_by_scale[s] = float((ranks == 1).float().mean())
        row.mrr_by_scale[s] = float((1 / ranks).mean())
    for policy, chosen in _texts_by_policy(records, config).items():
        ranks = semantic_ranks(chosen, range(len(records)), candidates, embed)
        row.semantic_by_policy[policy] = float((ranks == 1).float().mean())


def recovery_by_scale(
    records: Sequence[FeatureExplanations], names: Sequence[str], config: SelfExplainConfig
) -> dict[float, float]:
    """Per scale, the fraction of explanations (all samples) that name the record's word."""
    return {
        s: sum(recovered(c.text, w) for r, w in zip(records, names) for c in r.at_scale(s))
        / (len(names) * config.n_samples)
        for s in config.scales
    }


def rate_by_policy(
    records: Sequence[FeatureExplanations], words: Sequence[str], config: SelfExplainConfig
) -> dict[str, float]:
    """Per policy, the fraction of words recovered at the scale the policy picks for each word by itself
    (first sample); policies that need metrics are skipped when the records have no sweep."""
    return {
        policy: sum(recovered(text, word) for text, word in zip(texts, words)) / len(words)
        for policy, texts in _texts_by_policy(records, config).items()
    }


def _texts_by_policy(records: Sequence[FeatureExplanations], config: SelfExplainConfig) -> dict[str, list[str]]:
    """Per policy, each record's first explanation at the scale that policy picks from the record's own sweep."""
    out = {}
    for policy in POLICIES:
        if policy != "fixed" and not all(r.sweep for r in records):
            continue
        out[policy] = [
            r.at_scale(ranked_scales(r.sweep or {"scale": list(config.scales)}, config, policy)[0])[0].text
            for r in records
        ]
    return out
