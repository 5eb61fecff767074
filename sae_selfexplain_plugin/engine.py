"""The self-explanation engine: feature directions in, explanations at every scale out.

    explainer = SelfExplainer(backend, SelfExplainConfig(layer=2))
    records = explainer.explain(directions, feature_ids)   # list[FeatureExplanations]

It renders the template once, measures the typical residual norm at the injection layer once, then
runs every (feature, scale, sample) row through the backend in batches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cached_property

import torch

from .backend import Backend, GenerationRequest, GenerationResult, Injection, check_layer, left_pad
from .config import SelfExplainConfig
from .errors import InputError
from .results import Explanation, FeatureExplanations
from .templates import RenderedPrompt, default_template_name, render

ROWS_PER_CALL = 4096  # cap on the rows one generate_many call (one remote request) carries

ProgressCallback = Callable[[int], None]
"""Called with the number of rows just finished."""


class SelfExplainer:
    """Explains feature directions through one backend with one configuration."""

    def __init__(self, backend: Backend, config: SelfExplainConfig | None = None) -> None:
        self.backend = backend
        self.config = config or SelfExplainConfig()
        check_layer(self.config.layer, backend.n_layers)

    @property
    def template_name(self) -> str:
        return self.config.template or default_template_name(self.backend.tokenizer)

    @cached_property
    def settings_hash(self) -> str:
        """Hash of the configuration with the template resolved: keys results in stores and exports."""
        return self.config.replace(template=self.prompt.template).settings_hash()

    @cached_property
    def prompt(self) -> RenderedPrompt:
        """The rendered template with its placeholder positions."""
        return render(self.template_name, self.backend.tokenizer)

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
        """Rows of `directions` (normalised) times `scales`, in residual units."""
        unit = directions.float() / directions.float().norm(dim=-1, keepdim=True)
        factor = scales.float()
        if self.config.scale_mode == "relative":
            factor = factor * self.reference_norm
        vectors: torch.Tensor = unit * factor[:, None]
        return vectors

    def explain(
        self,
        directions: torch.Tensor,
        feature_ids: Sequence[int] | None = None,
        *,
        progress: ProgressCallback | None = None,
    ) -> list[FeatureExplanations]:
        """Explain each row of `directions` ([n_features, d_model], or one [d_model]) at every scale."""
        directions = self._check_directions(directions)
        ids = list(range(len(directions))) if feature_ids is None else [int(i) for i in feature_ids]
        if len(ids) != len(directions):
            raise InputError(f"got {len(directions)} directions but {len(ids)} feature ids; pass one id per row.")
        cfg = self.config
        rows = [(f, s, k) for f in range(len(ids)) for s in cfg.scales for k in range(cfg.n_samples)]
        candidates: list[list[Explanation]] = [[] for _ in ids]
        starts = list(range(0, len(rows), cfg.batch_size))
        # A backend with generate_many (remote nnsight) takes several batches as one request.
        many = getattr(self.backend, "generate_many", None)
        per_call = max(1, ROWS_PER_CALL // cfg.batch_size) if many is not None else 1
        for group in range(0, len(starts), per_call):
            group_starts = starts[group : group + per_call]
            chunks = [rows[s : s + cfg.batch_size] for s in group_starts]
            requests = [self._request(directions, c, seed=cfg.seed + s) for c, s in zip(chunks, group_starts)]
            results = many(requests) if many is not None else [self.backend.generate(requests[0])]
            for chunk, result in zip(chunks, results):
                self._collect(chunk, result, ids, candidates)
                if progress is not None:
                    progress(len(chunk))
        return [
            FeatureExplanations(
                feature_id=fid,
                candidates=cands,
                chosen_index=self._choose_fixed(cands),
                policy="fixed",
                model_id=self.backend.model_id,
                settings_hash=self.settings_hash,
            )
            for fid, cands in zip(ids, candidates)
        ]

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
                )
            )

    def _request(self, directions: torch.Tensor, chunk: list[tuple[int, float, int]], seed: int) -> GenerationRequest:
        prompt = self.prompt
        pad_id = getattr(self.backend.tokenizer, "pad_token_id", None) or 0
        input_ids, mask = left_pad([prompt.input_ids] * len(chunk), pad_id)
        positions = torch.zeros_like(input_ids, dtype=torch.bool)
        positions[:, list(prompt.placeholder_positions)] = True  # same prompt in every row: no padding
        feats = torch.tensor([f for f, _, _ in chunk])
        scales = torch.tensor([s for _, s, _ in chunk])
        vectors = self.injected_vectors(directions[feats], scales)
        device = self.backend.device
        return GenerationRequest(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            injection=Injection(self.config.layer, positions.to(device), vectors.to(device), self.config.injection),
            max_new_tokens=self.config.max_new_tokens,
            stop_strings=prompt.stop_strings,
            temperature=self.config.temperature,
            seed=seed,
        )

    def _choose_fixed(self, candidates: list[Explanation]) -> int | None:
        """The `fixed` policy: the first candidate at the sweep scale nearest to config.chosen_scale."""
        if not candidates:
            return None
        target = min(self.config.scales, key=lambda s: abs(s - self.config.chosen_scale))
        return next(i for i, c in enumerate(candidates) if c.scale == target)

    def _check_directions(self, directions: torch.Tensor) -> torch.Tensor:
        if not isinstance(directions, torch.Tensor):
            raise InputError(f"directions must be a torch.Tensor [n_features, d_model], got {type(directions)}.")
        if directions.ndim == 1:
            directions = directions[None]
        if directions.ndim != 2:
            raise InputError(f"directions must be [n_features, d_model], got shape {tuple(directions.shape)}.")
        if directions.shape[0] == 0:
            raise InputError("the feature list is empty: pass at least one direction.")
        if directions.shape[1] != self.backend.d_model:
            raise InputError(
                f"direction dimension {directions.shape[1]} != the model's d_model {self.backend.d_model}: "
                "the directions come from a different model or hook "
                "(an SAE's decoder rows, W_dec, are [d_sae, d_in])."
            )
        finite = torch.isfinite(directions).all(dim=-1)
        if not bool(finite.all()):
            bad = torch.nonzero(~finite).flatten().tolist()[:10]
            raise InputError(f"directions at rows {bad} contain NaN or inf; drop or repair those features.")
        zero = directions.float().norm(dim=-1) == 0
        if bool(zero.any()):
            bad = torch.nonzero(zero).flatten().tolist()[:10]
            raise InputError(f"directions at rows {bad} are all zeros and have no direction to explain.")
        return directions.detach().cpu()
