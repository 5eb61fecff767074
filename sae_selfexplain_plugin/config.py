"""Settings of one self-explanation run, as a validated dataclass (in the style of SAELens's configs)."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .direction_adapter import DirectionAdapter
from .errors import InputError

ScaleMode = Literal["relative", "absolute", "adapter"]
InjectionMode = Literal["replace", "add"]
GenerateMode = Literal["all", "chosen"]
POLICIES = ("fixed", "max-self-similarity", "composite", "knee")

# Relative scales: multiples of the typical residual norm at the injection layer (see engine.reference_norm).
# The grid brackets the useful range measured on Gemma 3 270M by the word-recovery benchmark
# (docs/benchmarks.md).
DEFAULT_SCALES: tuple[float, ...] = (0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0)
MAX_SCALE = 1e6  # far above any useful scale, far below float32 overflow after the reference norm
NOT_IN_HASH = ("batch_size",)  # settings that do not change outputs
DEFAULT_LAYER = 2  # input of block 2, as the original work did on an 18-layer Gemma
DEFAULT_SCALE = 4.0  # the `fixed` policy's choice when no metric-based policy is asked for


@dataclass(frozen=True)
class SelfExplainConfig:
    """How features are explained.

    Attributes:
        layer: inject at the input of this block (0 = the embeddings' output).
        template: name of a registered prompt template; None picks one from the tokenizer
            (a chat template if it has one, else the base-model identity prompt).
        scales: the sweep. Relative scales multiply the typical residual norm at `layer`;
            absolute scales multiply the unit-norm direction directly.
        scale_mode: "relative" (default) or "absolute".
        injection: "replace" the residual at the placeholder (default) or "add" to it.
        max_new_tokens: generation budget per explanation.
        temperature: 0 means greedy decoding (default, reproducible); > 0 samples.
        n_samples: explanations per (feature, scale); > 1 needs temperature > 0.
        seed: random seed for sampling.
        batch_size: (feature, scale, sample) rows per batched generate call.
        chosen_scale: the scale the default `fixed` policy picks (nearest in `scales`).
        policy: how the scale is chosen (policies.py): "fixed", "max-self-similarity", "composite"
            (the original work's), or "knee" (ours).
        generate: "all" generates at every scale; "chosen" measures every scale with prompt passes only,
            then generates at the `keep_top` best scales (much cheaper).
        keep_top: how many ranked scales a policy keeps (the original work showed 3).
        probe_layer: block whose input residual the self-similarity reads (None: 16/18 of the depth, as in
            the original work).
        composite_weight: the composite policy's weight on self-similarity (1 - weight on cross-entropy).
        min_scale: metric policies ignore scales below this.
        explainable_threshold: a feature whose best self-similarity stays below this is flagged
            "not_self_explainable" and gets no chosen explanation.
        metrics: measure the metric sweep (one prompt pass per feature and scale) even for the fixed
            policy, so records and dashboards show it; metric policies always measure.
        relevancy: also compute SelfIE's relevancy of the kept explanations (two teacher-forced passes with
            full-vocabulary logits per explanation: costly on large vocabularies).
        adapter: a trained DirectionAdapter, or the path of its file (direction_adapter.py): each unit
            direction is mapped through it before injection, and the sweep is `adapter_scales`. None injects
            the bare direction times `scales`.
        adapter_scales: with an adapter, the sweep: multiples of the adapter's vector (1.0 = as trained, one
            generation per feature). Records then carry scale_mode "adapter".
        no_repeats: never generate a word token twice in one explanation (list labels otherwise repeat
            their first item under greedy decoding). None (default): on with an adapter, where it was
            measured to help (docs/adapters.md), off without one.
    """

    layer: int = DEFAULT_LAYER
    template: str | None = None
    scales: tuple[float, ...] = DEFAULT_SCALES
    scale_mode: ScaleMode = "relative"
    injection: InjectionMode = "replace"
    max_new_tokens: int = 24
    temperature: float = 0.0
    n_samples: int = 1
    seed: int = 0
    batch_size: int = 64
    chosen_scale: float = DEFAULT_SCALE
    policy: str = "fixed"
    generate: GenerateMode = "all"
    keep_top: int = 3
    probe_layer: int | None = None
    composite_weight: float = 0.4
    min_scale: float = 1.0
    explainable_threshold: float = 0.01
    metrics: bool = True
    relevancy: bool = False
    adapter: Any = None
    adapter_scales: tuple[float, ...] = (1.0,)
    no_repeats: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("scales", "adapter_scales"):
            values = tuple(float(s) for s in getattr(self, name))
            object.__setattr__(self, name, values)
            if not values:
                raise InputError(f"{name} is empty: pass at least one scale, e.g. {name}=(1.0, 2.0, 4.0).")
            bad = [s for s in values if not math.isfinite(s) or s < 0]
            if bad:
                raise InputError(
                    f"{name} must be finite and >= 0, got {bad}: a negative scale flips the direction; "
                    "negate the direction itself if that is what you mean."
                )
            huge = [s for s in values if s > MAX_SCALE]
            if huge:
                raise InputError(
                    f"{name} {huge} are above {MAX_SCALE:g}: such a vector swamps (or overflows) every residual; "
                    "useful scales are around 1 to 100."
                )
        if self.scale_mode not in ("relative", "absolute", "adapter"):
            raise InputError(
                f"scale_mode must be 'relative' or 'absolute' ('adapter' with an adapter), got {self.scale_mode!r}."
            )
        if self.scale_mode == "adapter" and self.adapter is None:
            raise InputError("scale_mode 'adapter' needs an adapter; pass adapter=PATH or use 'relative'.")
        if self.adapter is not None and not isinstance(self.adapter, (str, Path, DirectionAdapter)):
            raise InputError(
                f"adapter must be a DirectionAdapter or the path of its file, got {type(self.adapter).__name__}."
            )
        if self.no_repeats not in (None, True, False):
            raise InputError(f"no_repeats must be True, False or None (on with an adapter), got {self.no_repeats!r}.")
        if self.injection not in ("replace", "add"):
            raise InputError(f"injection must be 'replace' or 'add', got {self.injection!r}.")
        if self.max_new_tokens <= 0:
            raise InputError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}.")
        if self.layer < 0:
            raise InputError(f"layer must be >= 0, got {self.layer}.")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InputError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}.")
        if self.n_samples < 1:
            raise InputError(f"n_samples must be >= 1, got {self.n_samples}.")
        if self.n_samples > 1 and self.temperature == 0:
            raise InputError(
                f"n_samples={self.n_samples} with greedy decoding gives identical samples: "
                "set temperature > 0 (the original work sampled at temperature 1) or n_samples=1."
            )
        if self.batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {self.batch_size}.")
        if self.policy not in POLICIES:
            raise InputError(f"unknown policy {self.policy!r}; choose one of {list(POLICIES)}.")
        if self.generate not in ("all", "chosen"):
            raise InputError(f"generate must be 'all' or 'chosen', got {self.generate!r}.")
        if self.keep_top < 1:
            raise InputError(f"keep_top must be >= 1, got {self.keep_top}.")
        if not 0 <= self.composite_weight <= 1:
            raise InputError(f"composite_weight must be in [0, 1], got {self.composite_weight}.")
        if self.probe_layer is not None and self.probe_layer < 0:
            raise InputError(f"probe_layer must be >= 0, got {self.probe_layer}.")
        if not math.isfinite(self.chosen_scale) or self.chosen_scale < 0:
            raise InputError(f"chosen_scale must be finite and >= 0, got {self.chosen_scale}.")

    @property
    def bans_repeats(self) -> bool:
        """Whether generation bans repeated word tokens (`no_repeats`, resolved)."""
        return self.adapter is not None if self.no_repeats is None else self.no_repeats

    def replace(self, **changes: Any) -> SelfExplainConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form. An adapter stands as its fingerprint (or path); the adapter keys (and
        `no_repeats` when not set) are left out when there is none, so settings hashes without one are those
        of earlier versions."""
        d = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "adapter"}
        d["scales"] = list(self.scales)
        if self.adapter is None:
            del d["adapter_scales"]
            if self.no_repeats is None:
                del d["no_repeats"]
        else:
            d["no_repeats"] = self.bans_repeats  # resolved: stores of runs before the option do not mix
            fingerprint = getattr(self.adapter, "fingerprint", None)
            d["adapter"] = str(self.adapter) if fingerprint is None else f"adapter:{fingerprint}"
            d["adapter_scales"] = list(self.adapter_scales)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SelfExplainConfig:
        """Inverse of to_dict; unknown keys are an error (a typo must not pass silently)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise InputError(f"unknown SelfExplainConfig keys {unknown}; known keys are {sorted(names)}.")
        d = dict(d)
        for name in ("scales", "adapter_scales"):
            if name in d:
                d[name] = tuple(d[name])
        return cls(**d)

    def settings_hash(self) -> str:
        """Short stable hash of every setting that changes the output; keys results stores and exports.
        `batch_size` is left out: it changes how rows are grouped, not what is generated."""
        settings = {k: v for k, v in self.to_dict().items() if k not in NOT_IN_HASH}
        blob = json.dumps(settings, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# `explain`'s settings for whole SAEs: one generation per feature, at the policy's first scale. The metric
# sweep (a prompt pass per feature and scale: most of the cost) runs only where the policy needs it to
# choose, or when asked (`--metrics`). Under the default fixed policy the chosen labels are those of
# generating every scale (docs/performance.md).
WHOLE_SAE_CONFIG = SelfExplainConfig(generate="chosen", keep_top=1, metrics=False)
