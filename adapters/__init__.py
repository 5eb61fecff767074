"""Ecosystem glue, one sub-package per role; each imports the core, the core never imports them.

- `backends/`: from a model to a `Backend` (the resolver in `backends/__init__.py`): transformers,
  TransformerLens, nnsight (local and NDIF), the embedded models.
- `sae_lens/`: SAELens SAEs: hooks and checks, loading, the labels read through an SAE, `sae.self_explain`.
- `neuronpedia.py`: the Neuronpedia web client (upload).
- `apps/`: applications built on the above: whole-SAE runs, contexts, direction-adapter training,
  evaluation, the demo SAE.
- `cli/`: the `sae-selfexplain` command, the only module that imports the applications' user interface.

Installed as `sae_selfexplain_plugin.adapters`.
"""

from __future__ import annotations

import importlib
import sys
import warnings


def _moved(old: str, new: str) -> None:
    """Make the module `old` (an import path of an earlier release) the module `new`, with a warning."""
    warnings.warn(
        f"{old} moved to {new}; the old path works until sae-selfexplain 0.3.", DeprecationWarning, stacklevel=3
    )
    sys.modules[old] = importlib.import_module(new)
