"""Errors raised by sae-selfexplain. Each message names the problem and the fix."""

from __future__ import annotations


class SelfExplainError(Exception):
    """Base class for every error this package raises on purpose."""


class InputError(SelfExplainError, ValueError):
    """Bad input from the caller: a direction, layer, scale, template or option that cannot work."""


class TemplateError(InputError):
    """A prompt template that is unknown, lacks its placeholder, or tokenizes it into several tokens."""


class ModelCacheError(SelfExplainError, RuntimeError):
    """The embedded-model cache could not be built or read."""
