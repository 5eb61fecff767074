"""sae-selfexplain: make a language model explain its own SAE features.

The core engine (this package, no sae_lens or nnsight imports):

    from sae_selfexplain_plugin import SelfExplainer, SelfExplainConfig
    explainer = SelfExplainer(backend, SelfExplainConfig(layer=2))
    records = explainer.explain(decoder_rows, feature_ids)

Backends and loaders for transformers, SAELens, nnsight live in `sae_selfexplain_plugin.adapters`.
"""

from __future__ import annotations

from . import integrations
from ._version import __version__
from .backend import Backend, GenerationRequest, GenerationResult, Injection, StepModel
from .config import DEFAULT_LAYER, DEFAULT_SCALES, SelfExplainConfig
from .direction_adapter import AdapterMetadata, DirectionAdapter
from .engine import SelfExplainer
from .errors import InputError, ModelCacheError, SelfExplainError, TemplateError
from .results import Explanation, FeatureExplanations
from .templates import PromptTemplate, RenderedPrompt, get_template, register_template, render, template_names
from .vocabulary import direction_lens, probe_vocabulary


def install() -> None:
    """Add `self_explain` to the libraries this package integrates with (SAELens SAEs, ...).

    Runs on import; idempotent. A library not imported yet is extended on its first import."""
    integrations.activate()


def uninstall() -> None:
    """Remove everything `install` added; the libraries are left as they were."""
    integrations.deactivate()


install()

__all__ = [
    "DEFAULT_LAYER",
    "DEFAULT_SCALES",
    "AdapterMetadata",
    "Backend",
    "DirectionAdapter",
    "Explanation",
    "FeatureExplanations",
    "GenerationRequest",
    "GenerationResult",
    "Injection",
    "InputError",
    "ModelCacheError",
    "PromptTemplate",
    "RenderedPrompt",
    "SelfExplainConfig",
    "SelfExplainError",
    "SelfExplainer",
    "StepModel",
    "TemplateError",
    "__version__",
    "direction_lens",
    "get_template",
    "install",
    "probe_vocabulary",
    "register_template",
    "render",
    "template_names",
    "uninstall",
]
