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


def install() -> None:
    """Give every SAELens SAE a `self_explain` method (idempotent; `method.install`)."""
    from .method import install as install_method

    install_method()


def uninstall() -> None:
    """Remove the method `install` added (`method.uninstall`)."""
    from .method import uninstall as uninstall_method

    uninstall_method()


# SAELens first, with install and uninstall already defined: its first import installs this integration
# (sae_selfexplain_plugin.integrations), which must find them here even while the rest of this package loads.
import sae_lens  # noqa: E402, F401

from sae_selfexplain_plugin.direction_adapter.choice import AUTO  # noqa: E402

from .checks import check_compatible  # noqa: E402 (after SAELens: see above)
from .hooks import decoder_hook, readable_input_layer, sae_input_layer, sae_layer, sae_prepends_bos  # noqa: E402
from .loading import (  # noqa: E402
    SAE_WEIGHTS_FILE,
    decoder_rows,
    load_sae,
    load_sae_folder,
    sae_identity,
    sae_lens_version,
    store_key,
)
from .method import resolve_backend, self_explain, with_adapter  # noqa: E402
from .reading import (  # noqa: E402
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
