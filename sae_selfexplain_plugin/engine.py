"""The self-explanation engine: feature directions in, explanations at every scale out.

    explainer = SelfExplainer(backend, SelfExplainConfig(layer=2))
    records = explainer.explain(directions, feature_ids)   # list[FeatureExplanations]

It renders the template once, measures the typical residual norm at the injection layer once, then
runs every (feature, scale, sample) row through the backend in batches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path
from typing import cast

import torch

from .backend import (
    Backend,
    GenerationRequest,
    GenerationResult,
    Injection,
    ProbeModel,
    check_layer,
    context_length,
    left_pad,
)
from .config import SelfExplainConfig
from .direction_adapter import DirectionAdapter
from .directions import check_directions, feature_id_list
from .errors import InputError
from .policies import Sweep, explainable, ranked_scales
from .results import Explanation, FeatureExplanations
from .scale_metrics import METRICS, cross_entropy, default_probe_layer, entropy, relevancy, self_similarity
from .templates import RenderedPrompt, default_template_name, render

ROWS_PER_CALL = 4096  # cap on the rows one generate_many call (one remote request) carries

ProgressCallback = Callable[[int], None]
"""Called with the number of rows just finished."""


class SelfExplainer:
    """Explains feature directions through one backend with one configuration."""

    def __init__(self, backend: Backend, config: SelfExplainConfig | None = None) -> None:
        self.backend = backend
        config = config or SelfExplainConfig()
        check_layer(config.layer, backend.n_layers)
        self.adapter = _load_adapter(config.adapter, backend.d_model)
        if self.adapter is not None:
            # the sweep becomes multiples of the adapter's vector (1.0: as trained)
            self.adapter.check(backend.model_id, backend.d_model, config.layer, render_name(config, backend))
            config = config.replace(
                adapter=self.adapter,
                scales=config.adapter_scales,
                chosen_scale=1.0,
                scale_mode="adapter",
                min_scale=0.0,
            )
        self.config = config
        if self.adapter is not None:
            self.adapter.check_slots(len(self.prompt.placeholder_positions))
        self.adapter_id = None if self.adapter is None else self.adapter.fingerprint  # recorded with each text

    @property
    def template_name(self) -> str:
        return render_name(self.config, self.backend)

    @cached_property
    def settings_hash(self) -> str:
        """Hash of the configuration with the template resolved: keys results in stores and exports."""
        return self.config.replace(template=self.prompt.template).settings_hash()

    @cached_property
    def prompt(self) -> RenderedPrompt:
        """The rendered template with its placeholder positions; it and the generation budget must fit the
        model's context (past it, position embeddings run out or attention silently degrades)."""
        prompt = render(self.template_name, self.backend.tokenizer)
        limit = context_length(self.backend)
        need = len(prompt.input_ids) + self.config.max_new_tokens
        if limit is not None and need > limit:
            raise InputError(
                f"template {prompt.template!r} renders to {len(prompt.input_ids)} tokens, which with "
                f"max_new_tokens={self.config.max_new_tokens} makes {need}, past the {limit}-token context of "
                f"{self.backend.model_id}; shorten the template or lower max_new_tokens."
            )
        return prompt

    @cached_property
    def reference_norm(self) -> float:
        """Typical residual norm at the injection layer: the median over the prompt's positions,
        excluding special tokens such as BOS, which carry norms many times larger."""
        ids = torch.tensor([self.prompt.input_ids])
        resid = self.backend.residual(ids, torch.ones_like(ids), self.config.layer)[0]
        special = set(getattr(self.backend.tokenizer, "all_special_ids", []) or [])
        keep = [i for i, t in enumerate(self.prompt.input_ids) if t not in special] or list(range(ids.shape[1]))
        return float(resid[keep].float().norm(dim=-1).median())

    def injected_vectors(self, directions: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """Rows of `directions` (normalised, then mapped through the adapter if any) times `scales`, in
        residual units."""
        unit = directions.float() / directions.float().norm(dim=-1, keepdim=True)
        factor = scales.float()
        if self.adapter is not None:
            with torch.no_grad():
                unit = self.adapter(unit).float()
        elif self.config.scale_mode == "relative":
            factor = factor * self.reference_norm
        vectors: torch.Tensor = unit * factor.view(-1, *[1] * (unit.ndim - 1))  # unit: [n, d] or [n, slots, d]
        return vectors

    @cached_property
    def probe_layer(self) -> int:
        """The block whose input residual self-similarity reads."""
        layer = self.config.probe_layer
        layer = default_probe_layer(self.backend.n_layers) if layer is None else layer
        check_layer(layer, self.backend.n_layers)
        return layer

    @property
    def can_measure(self) -> bool:
        """Whether the backend runs the prompt probes the scale metrics need."""
        return isinstance(self.backend, ProbeModel)

    def measure(self, directions: torch.Tensor) -> list[Sweep]:
        """Per feature, the metric sweep over config.scales (scale_metrics.py), from prompt passes only:
        one batch of rows per (feature, scale), plus two baseline rows for all features."""
        directions = check_directions(directions, self.backend.d_model)
        if not self.can_measure:
            raise InputError(
                f"{type(self.backend).__name__} cannot run prompt probes, so the scale metrics are unavailable; "
                "use a transformers model, or policy='fixed'."
            )
        cfg = self.config
        scales = torch.tensor(cfg.scales)
        sweep = _SweepTable(len(directions), len(scales), self.backend.n_layers)
        rows = [(f, j) for f in range(len(directions)) for j in range(len(scales))]
        for start in range(0, len(rows), cfg.batch_size):
            feats = torch.tensor([f for f, _ in rows[start : start + cfg.batch_size]])
            cols = torch.tensor([j for _, j in rows[start : start + cfg.batch_size]])
            resid, logits = self._probe(self.injected_vectors(directions[feats], scales[cols]))
            sweep.put(feats, cols, *self._metrics(resid, logits, directions[feats]))
        return sweep.sweeps(cfg.scales, self.probe_layer)

    @cached_property
    def _baselines(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scale 0 (zero vector) and neutral (unit-norm mean embedding) runs: (zero-run residuals [L, d],
        zero-run entropy, zero-run cross-entropy, neutral logits [V])."""
        neutral = cast(ProbeModel, self.backend).mean_token_embedding().float().cpu()
        resid, logits = self._probe(torch.stack([torch.zeros_like(neutral), neutral / neutral.norm()]))
        zero_logits, neutral_logits = logits[:1], logits[1]
        return resid[0], entropy(zero_logits)[0], cross_entropy(zero_logits, neutral_logits)[0], neutral_logits

    def _metrics(
        self, resid: torch.Tensor, logits: torch.Tensor, dirs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Baseline-subtracted (self-similarity at every block [B, L], entropy [B], cross-entropy [B])."""
        zero_resid, zero_entropy, zero_ce, neutral_logits = self._baselines
        dirs = dirs.float()[:, None].expand_as(resid)
        similarity = self_similarity(resid, dirs) - self_similarity(zero_resid.expand_as(resid), dirs)
        return similarity, entropy(logits) - zero_entropy, cross_entropy(logits, neutral_logits) - zero_ce

    def explain(
        self,
        directions: torch.Tensor,
        feature_ids: Sequence[int] | None = None,
        *,
        progress: ProgressCallback | None = None,
    ) -> list[FeatureExplanations]:
        """Explain each row of `directions` ([n_features, d_model], or one [d_model]).

        With a backend that runs prompt probes the scale metrics are measured: with `generate="all"` on the
        generation's own prompt pass (no extra pass), with `"chosen"` by prompt passes first (`measure`), so
        that only the policy's kept scales are generated."""
        ids = None if feature_ids is None else feature_id_list(feature_ids)
        directions = check_directions(directions, self.backend.d_model, ids)
        ids = list(range(len(directions))) if ids is None else ids
        cfg = self.config
        measured = self.can_measure and (cfg.metrics or cfg.policy != "fixed")
        unmeasured: list[Sweep] = [{"scale": list(cfg.scales)} for _ in ids]
        sweeps = self.measure(directions) if measured and cfg.generate == "chosen" else unmeasured
        if cfg.generate == "all":
            wanted = [list(cfg.scales) for _ in ids]
        else:
            wanted = [ranked_scales(sweep, cfg) for sweep in sweeps]
        table = _SweepTable(len(ids), len(cfg.scales), self.backend.n_layers) if measured else None
        probe_layers = tuple(range(self.backend.n_layers)) if table is not None and cfg.generate == "all" else ()
        rows = [(f, s, k) for f in range(len(ids)) for s in wanted[f] for k in range(cfg.n_samples)]
        candidates: list[list[Explanation]] = [[] for _ in ids]
        tokens: dict[tuple[int, float, int], list[int]] = {}
        starts = list(range(0, len(rows), cfg.batch_size))
        # A backend with generate_many (remote nnsight) takes several batches as one request.
        many = getattr(self.backend, "generate_many", None)
        per_call = max(1, ROWS_PER_CALL // cfg.batch_size) if many is not None else 1
        for group in range(0, len(starts), per_call):
            group_starts = starts[group : group + per_call]
            chunks = [rows[s : s + cfg.batch_size] for s in group_starts]
            requests = [
                self._request(directions, c, seed=cfg.seed + s, probe_layers=probe_layers)
                for c, s in zip(chunks, group_starts)
            ]
            results = many(requests) if many is not None else [self.backend.generate(requests[0])]
            for chunk, result in zip(chunks, results):
                self._collect(chunk, result, ids, candidates)
                tokens.update(zip(chunk, result.tokens))
                resid, logits = result.prompt_residuals, result.prompt_logits
                if probe_layers and table is not None and resid is not None and logits is not None:
                    feats = torch.tensor([f for f, _, _ in chunk])
                    cols = torch.tensor([cfg.scales.index(s) for _, s, _ in chunk])
                    table.put(feats, cols, *self._metrics(resid, logits, directions[feats]))
                if progress is not None:
                    progress(len(chunk))
        if probe_layers and table is not None:
            # a backend that ignores probe_layers leaves holes: measure with prompt passes instead
            sweeps = table.sweeps(cfg.scales, self.probe_layer) if table.complete else self.measure(directions)
        rankings = [ranked_scales(sweep, cfg) for sweep in sweeps]
        records = [
            self._record(fid, cands, sweep, ranked)
            for fid, cands, sweep, ranked in zip(ids, candidates, sweeps, rankings)
        ]
        if cfg.relevancy and self.can_measure:
            self._add_relevancy(records, directions, tokens)
        return records

    def _record(
        self, feature_id: int, candidates: list[Explanation], sweep: Sweep, ranked: list[float]
    ) -> FeatureExplanations:
        for c in candidates:
            j = sweep["scale"].index(c.scale)
            c.metrics.update({m: sweep[m][j] for m in METRICS if m in sweep})
        flags = [] if explainable(sweep, self.config) else ["not_self_explainable"]
        chosen = next((i for i, c in enumerate(candidates) if c.scale == ranked[0] and c.sample == 0), None)
        return FeatureExplanations(
            feature_id=feature_id,
            candidates=candidates,
            chosen_index=None if flags else chosen,
            policy=self.config.policy,
            model_id=self.backend.model_id,
            settings_hash=self.settings_hash,
            sweep=sweep if len(sweep) > 1 else {},
            ranked_scales=ranked,
            flags=flags,
        )

    def _add_relevancy(
        self,
        records: list[FeatureExplanations],
        directions: torch.Tensor,
        tokens: dict[tuple[int, float, int], list[int]],
    ) -> None:
        """SelfIE's relevancy (mean over the explanation's tokens) for every candidate at a ranked scale."""
        todo = [
            (f, c)
            for f, r in enumerate(records)
            for c in r.candidates
            if c.scale in r.ranked_scales and tokens.get((f, c.scale, c.sample))
        ]
        backend = cast(ProbeModel, self.backend)
        for start in range(0, len(todo), 16):  # full-vocabulary logits per position: keep batches small
            chunk = todo[start : start + 16]
            generated = [tokens[(f, c.scale, c.sample)] for f, c in chunk]
            vectors = self.injected_vectors(
                directions[torch.tensor([f for f, _ in chunk])], torch.tensor([c.scale for _, c in chunk])
            )
            input_ids, mask, injection = self._prompt_batch(vectors, generated)
            injected = backend.token_logprobs(input_ids, mask, injection)
            not_injected = Injection(injection.layer, torch.zeros_like(injection.positions), injection.vectors)
            plain = backend.token_logprobs(input_ids, mask, not_injected)
            per_token = relevancy(injected, plain).cpu()
            for row, ((_, c), g) in enumerate(zip(chunk, generated)):
                end = input_ids.shape[1] - 1  # logprob index of the last token
                c.metrics["relevancy"] = round(float(per_token[row, end - len(g) + 1 : end + 1].mean()), 6)

    def _probe(self, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt passes with one injected vector per row: the residual entering every block [B, n_layers, d]
        and the logits, at the last position."""
        input_ids, mask, injection = self._prompt_batch(vectors)
        layers = range(self.backend.n_layers)
        resid, logits = cast(ProbeModel, self.backend).probe(input_ids, mask, injection, layers)
        return resid.float().cpu(), logits.float().cpu()

    def _prompt_batch(
        self, vectors: torch.Tensor, continuations: Sequence[Sequence[int]] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, Injection]:
        """The prompt once per vector (each followed by its continuation, if given), left-padded, with the
        injection of those vectors at the placeholder."""
        prompt = list(self.prompt.input_ids)
        tails = continuations if continuations is not None else [[]] * len(vectors)
        pad_id = getattr(self.backend.tokenizer, "pad_token_id", None) or 0
        input_ids, mask = left_pad([prompt + list(t) for t in tails], pad_id)
        positions = torch.zeros_like(input_ids, dtype=torch.bool)
        for row, offset in enumerate((mask == 0).sum(-1).tolist()):  # offset = the row's left padding
            positions[row, [offset + p for p in self.prompt.placeholder_positions]] = True
        device = self.backend.device
        injection = Injection(self.config.layer, positions.to(device), vectors.to(device), self.config.injection)
        return input_ids.to(device), mask.to(device), injection

    def _collect(
        self,
        chunk: list[tuple[int, float, int]],
        result: GenerationResult,
        ids: list[int],
        candidates: list[list[Explanation]],
    ) -> None:
        cfg = self.config
        for (f, scale, sample), text, reason in zip(chunk, result.texts, result.stop_reasons):
            candidates[f].append(
                Explanation(
                    feature_id=ids[f],
                    text=text.strip(),
                    scale=scale,
                    layer=cfg.layer,
                    template=self.prompt.template,
                    scale_mode=cfg.scale_mode,
                    sample=sample,
                    stop_reason=reason,
                    adapter=self.adapter_id,
                )
            )

    def _request(
        self,
        directions: torch.Tensor,
        chunk: list[tuple[int, float, int]],
        seed: int,
        probe_layers: tuple[int, ...] = (),
    ) -> GenerationRequest:
        feats = torch.tensor([f for f, _, _ in chunk])
        scales = torch.tensor([s for _, s, _ in chunk])
        input_ids, mask, injection = self._prompt_batch(self.injected_vectors(directions[feats], scales))
        return GenerationRequest(
            input_ids=input_ids,
            attention_mask=mask,
            injection=injection,
            max_new_tokens=self.config.max_new_tokens,
            stop_strings=self.prompt.stop_strings,
            temperature=self.config.temperature,
            seed=seed,
            no_repeats=self.config.bans_repeats,
            probe_layers=probe_layers,
        )


def render_name(config: SelfExplainConfig, backend: Backend) -> str:
    """The template name a configuration resolves to on this backend."""
    return config.template or default_template_name(backend.tokenizer)


def _load_adapter(adapter: DirectionAdapter | str | Path | None, d_model: int) -> DirectionAdapter | None:
    """The config's adapter (its type is checked there), loaded if it is a path (for a model of `d_model`)."""
    return DirectionAdapter.load(adapter, d_model) if isinstance(adapter, (str, Path)) else adapter


class _SweepTable:
    """Metric values filled in row by row: [feature, scale, block] self-similarity, [feature, scale] the rest."""

    def __init__(self, n_features: int, n_scales: int, n_layers: int) -> None:
        self.similarity = torch.zeros(n_features, n_scales, n_layers)
        self.entropy = torch.zeros(n_features, n_scales)
        self.cross_entropy = torch.zeros(n_features, n_scales)
        self.filled = torch.zeros(n_features, n_scales, dtype=torch.bool)

    def put(
        self, feats: torch.Tensor, cols: torch.Tensor, sim: torch.Tensor, ent: torch.Tensor, ce: torch.Tensor
    ) -> None:
        self.similarity[feats, cols], self.entropy[feats, cols], self.cross_entropy[feats, cols] = sim, ent, ce
        self.filled[feats, cols] = True

    @property
    def complete(self) -> bool:
        return bool(self.filled.all())

    def sweeps(self, scales: Sequence[float], probe_layer: int) -> list[Sweep]:
        out: list[Sweep] = []
        for f in range(len(self.filled)):
            layers = self.similarity[f].T  # [n_layers, n_scales]
            out.append(
                {
                    "scale": list(scales),
                    "self_similarity": _rounded(layers[probe_layer]),
                    "entropy": _rounded(self.entropy[f]),
                    "cross_entropy": _rounded(self.cross_entropy[f]),
                    # row = block whose input is read: lets reports change the probe layer after the fact
                    "self_similarity_by_layer": [_rounded(row) for row in layers],
                }
            )
        return out


def _rounded(values: torch.Tensor) -> list[float]:
    return [round(v, 5) for v in values.tolist()]
