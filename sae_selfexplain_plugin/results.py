"""Typed results with a JSON round trip."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ._version import __version__
from .errors import InputError
from .files import parse_json, to_json


@dataclass
class Explanation:
    """One generated explanation of one feature at one scale."""

    feature_id: int
    text: str
    scale: float
    layer: int
    template: str
    scale_mode: str = "relative"
    sample: int = 0
    stop_reason: str = "stop_string"
    metrics: dict[str, float] = field(default_factory=dict)
    adapter: str | None = None  # fingerprint of the direction adapter, with scale_mode "adapter"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Explanation:
        return cls(**_known_fields(cls, d))


@dataclass
class FeatureExplanations:
    """Every explanation tried for one feature, and which one was chosen."""

    feature_id: int
    candidates: list[Explanation]
    chosen_index: int | None = None
    policy: str = "fixed"
    model_id: str = ""
    settings_hash: str = ""
    sae: dict[str, Any] = field(default_factory=dict)  # identity of the SAE the directions came from
    package_version: str = __version__
    # Activation records ({"source", "tokens", "values"}): the feature's activations over a text.
    activations: list[dict[str, Any]] = field(default_factory=list)
    # The metric sweep over scales ({"scale": [...], "self_similarity": [...], ...}; empty if not measured),
    # the scales the policy kept (best first), flags such as "not_self_explainable", and scores (scoring.py).
    sweep: dict[str, Any] = field(default_factory=dict)
    ranked_scales: list[float] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)
    scores: dict[str, Any] = field(default_factory=dict)
    # The vocabulary probe ({"token", "activation"}, best first; vocabulary.py): not a self-explanation,
    # the model's own tokens that most evoke the feature. Empty when not probed or when no word evokes it.
    vocabulary: list[dict[str, Any]] = field(default_factory=list)

    @property
    def chosen(self) -> Explanation | None:
        """The chosen explanation (None when the policy declined to choose)."""
        return None if self.chosen_index is None else self.candidates[self.chosen_index]

    @property
    def text(self) -> str | None:
        """The chosen explanation's text (None when the policy declined to choose: see `flags`)."""
        chosen = self.chosen
        return None if chosen is None else chosen.text

    def at_scale(self, scale: float) -> list[Explanation]:
        """The candidates generated at `scale` (several when sampling)."""
        return [c for c in self.candidates if c.scale == scale]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["candidates"] = [c.to_dict() for c in self.candidates]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureExplanations:
        d = _known_fields(cls, d)
        d["candidates"] = [Explanation.from_dict(c) for c in d.get("candidates", [])]
        return cls(**d)

    def to_json(self) -> str:
        return to_json(self.to_dict())

    @classmethod
    def from_json(cls, s: str) -> FeatureExplanations:
        data = parse_json(s, "a FeatureExplanations record")
        if not isinstance(data, dict):
            raise InputError("a FeatureExplanations record must be a JSON object.")
        return cls.from_dict(data)


def short_model_name(name: str) -> str:
    """A model name without its organisation: "google/gemma-3-270m" -> "gemma-3-270m" (lower case)."""
    return name.rstrip("/").split("/")[-1].lower()


def public_model_name(model_id: str) -> str:
    """A model id fit to publish: a hub id ("org/name") as is; a local checkpoint path by its folder's name, so
    that no path of this machine leaves it in an export."""
    if model_id.startswith((".", "/", "~")) or model_id.count("/") > 1 or "\\" in model_id:
        return short_model_name(model_id)
    return model_id


def _known_fields(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in d and _required(f)]
    if missing:
        raise InputError(f"{cls.__name__} record lacks required keys {missing}.")
    return {k: v for k, v in d.items() if k in names}


def _required(f: dataclasses.Field[Any]) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
