"""Model identity: one spelling per model name, so that an SAE's `model_name`, a backend's `model_id`, an
embedded model and a Neuronpedia id can be compared.
"""

from __future__ import annotations

import functools

from sae_selfexplain_plugin.results import short_model_name


@functools.cache
def _official_names() -> tuple[dict[str, str], dict[str, str]]:
    """TransformerLens's alias table: every official name and alias (lower case) -> the official name; and
    the same keyed by names without their organisation, where that is unambiguous."""
    from transformer_lens.loading_from_pretrained import make_model_alias_map

    full: dict[str, str] = make_model_alias_map()
    by_short: dict[str, set[str]] = {}
    for name, official in full.items():
        by_short.setdefault(short_model_name(name), set()).add(official)
    return full, {short: next(iter(o)) for short, o in by_short.items() if len(o) == 1}


def canonical_model_name(name: str) -> str:
    """One spelling per model: TransformerLens's official name for an alias ("gpt2-small" -> "gpt2",
    "tiny-stories-1M" -> "roneneldan/TinyStories-1M"), a Hugging Face id or a name without its organisation
    mapped the same way; a model TransformerLens does not know keeps its name without the organisation."""
    full, by_short = _official_names()
    official = full.get(name.lower()) or by_short.get(short_model_name(name))
    return short_model_name(official or name)
