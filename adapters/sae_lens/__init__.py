"""SAELens integration: `sae.self_explain(feature)` on every SAELens SAE, and what the rest of the package
needs to know about an SAE.

`import sae_selfexplain_plugin` calls `install()` (through the integrations entry point), which adds
`self_explain` to SAELens's base class `SAE`, so every architecture and every already-loaded instance
has it. SAELens's registry is never touched. `sae_selfexplain_plugin.uninstall()` removes the method.
The functional form is `self_explain(sae, features, model=...)`.

- `hooks`: where the SAE sits in the residual stream (its hook names);
- `checks`: whether its decoder rows are residual directions of a model;
- `loading`: SAEs from a folder or SAELens's registry, their identity and decoder rows;
- `reading`: activations over a text, and the vocabulary probe and direction lens read through it;
- `method`: `self_explain`, the adapter and model it resolves, and `install` / `uninstall`.
"""

from __future__ import annotations

from .checks import check_compatible
from .hooks import decoder_hook, readable_input_layer, sae_input_layer, sae_layer, sae_prepends_bos
from .loading import (
    SAE_WEIGHTS_FILE,
    decoder_rows,
    load_sae,
    load_sae_folder,
    sae_identity,
    sae_lens_version,
    store_key,
)
from .method import AUTO, install, resolve_backend, self_explain, uninstall, with_adapter
from .reading import (
    activation_records,
    encode_residual,
    lens_labels,
    probe_and_lens_labels,
    sae_input_ids,
    vocabulary_labels,
)

__all__ = [
    "AUTO",
    "SAE_WEIGHTS_FILE",
    "activation_records",
    "check_compatible",
    "decoder_hook",
    "decoder_rows",
    "encode_residual",
    "install",
    "lens_labels",
    "load_sae",
    "load_sae_folder",
    "probe_and_lens_labels",
    "readable_input_layer",
    "resolve_backend",
    "sae_identity",
    "sae_input_ids",
    "sae_input_layer",
    "sae_layer",
    "sae_lens_version",
    "sae_prepends_bos",
    "self_explain",
    "store_key",
    "uninstall",
    "vocabulary_labels",
    "with_adapter",
]
