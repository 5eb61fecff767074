"""Whether an SAE's decoder rows are residual directions of a model: width, depth, hook and model name
(model names compared through `backends.names.canonical_model_name`)."""

from __future__ import annotations

import warnings
from typing import Any

from sae_lens import SAE

from sae_selfexplain_plugin import Backend
from sae_selfexplain_plugin.errors import InputError

from ..backends.names import canonical_model_name
from .hooks import _decoder_position, decoder_hook, sae_layer

_warned_hooks: set[str] = set()  # non-residual hooks already warned about (check_hook=False), once each


def check_compatible(sae: SAE[Any], backend: Backend, *, check_model: bool = True, check_hook: bool = True) -> None:
    """Raise InputError unless the SAE's decoder rows are residual directions of this model.

    check_hook=False accepts a decoder that writes elsewhere (with a warning, once per hook name)."""
    d_out = int(sae.W_dec.shape[1])
    if _decoder_position(sae) is None:
        if check_hook:
            sae_layer(sae)  # raises, naming the hook
        elif decoder_hook(sae) not in _warned_hooks:
            _warned_hooks.add(decoder_hook(sae))
            warnings.warn(
                f"the SAE's decoder writes {decoder_hook(sae)!r}, not the residual stream; with check_hook=False "
                "self-explanation treats its decoder rows as residual directions, which they are not.",
                UserWarning,
                stacklevel=3,
            )
    if d_out != backend.d_model:
        raise InputError(
            f"the SAE's decoder width {d_out} != the model's d_model {backend.d_model}: "
            "this SAE belongs to another model."
        )
    position = _decoder_position(sae)
    if position is not None and position[0] > backend.n_layers:
        raise InputError(
            f"the SAE's hook {decoder_hook(sae)!r} is beyond this model's {backend.n_layers} blocks: the SAE belongs "
            "to another (deeper) model."
        )
    wanted = sae.cfg.metadata.model_name
    if check_model and wanted and canonical_model_name(wanted) != canonical_model_name(backend.model_id):
        raise InputError(
            f"the SAE was trained on {wanted!r} but the model is {backend.model_id!r} (compared through "
            "TransformerLens's model aliases); pass the matching model, or check_model=False to explain it "
            "through another model on purpose (e.g. the -it variant)."
        )
