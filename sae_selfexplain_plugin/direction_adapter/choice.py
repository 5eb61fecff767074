"""Which direction adapter a run uses: the one decision behind the library's, `sae.self_explain`'s and the
CLI's `adapter=` ("auto", "none"/None, an adapter, or its file), so all three resolve it alike."""

from __future__ import annotations

from pathlib import Path

from ..backend import Backend
from ..config import SelfExplainConfig
from ..errors import InputError
from ..templates import default_template_name
from . import DirectionAdapter, shipped_adapter

AUTO = "auto"


def choose_adapter(
    config: SelfExplainConfig, adapter: DirectionAdapter | str | Path | None, source: str, backend: Backend
) -> SelfExplainConfig:
    """`config` with its adapter chosen for directions read at hook `source`: "auto" takes the adapter
    shipped for this model, source, injection layer and template, if there is one (else none); None or
    "none": none; else a DirectionAdapter or the path of its file, refused if it was trained on the
    directions of another hook (its vectors would not fit them)."""
    if adapter is None or adapter == "none":
        return config.replace(adapter=None)
    if adapter != AUTO:
        loaded = adapter if isinstance(adapter, DirectionAdapter) else DirectionAdapter.load(adapter, backend.d_model)
        if loaded.metadata.source != source:
            raise InputError(
                f"the adapter {adapter} was trained on directions of {loaded.metadata.source!r}, but this SAE's are "
                f"at {source!r}: its vectors would not fit them; train one for this SAE (sae-selfexplain train-adapter "
                "--sae ...), or pass --adapter none."
            )
        return config.replace(adapter=adapter)
    template = config.template or default_template_name(backend.tokenizer)
    path = shipped_adapter(backend.model_id, backend.d_model, source, config.layer, template)
    return config.replace(adapter=None if path is None else str(path))
