"""Where an SAE sits in the residual stream, read from its hook names (TransformerLens, TransformerBridge and
Hugging Face spellings): the block it encodes, the block its decoder writes, whether it saw BOS."""

from __future__ import annotations

import re
from typing import Any

from sae_lens import SAE

from sae_selfexplain_plugin import Backend
from sae_selfexplain_plugin.errors import InputError

# Hook names in the residual stream: (pattern, offset to the block whose input it is, equal to that input?).
# Sublayer outputs and resid_mid write into the residual stream but are not the residual entering a block.
# TransformerBridge names its hooks after the modules (hook_in, ln2.hook_in, mlp.hook_out, ...).
_RESIDUAL_HOOKS = [
    (re.compile(r"^blocks\.(\d+)\.hook_resid_pre$"), 0, True),
    (re.compile(r"^blocks\.(\d+)\.hook_in$"), 0, True),  # bridge: hook_resid_pre
    (re.compile(r"^blocks\.(\d+)\.hook_resid_mid$"), 0, False),
    (re.compile(r"^blocks\.(\d+)\.ln2\.hook_in$"), 0, False),  # bridge: hook_resid_mid
    (re.compile(r"^blocks\.(\d+)\.hook_(attn|mlp)_out$"), 0, False),
    (re.compile(r"^blocks\.(\d+)\.(attn|mlp)\.hook_out$"), 0, False),  # bridge: hook_attn_out, hook_mlp_out
    (re.compile(r"^blocks\.(\d+)\.hook_resid_post$"), 1, True),
    (re.compile(r"^blocks\.(\d+)\.hook_out$"), 1, True),  # bridge: hook_resid_post
    (re.compile(r"^model\.layers\.(\d+)\.output$"), 1, True),  # Hugging Face / nnsight names (hf_hook_name)
    (re.compile(r"^model\.layers\.(\d+)\.input$"), 0, True),
]


_RESIDUAL_HOOK_NAMES = (
    "hook_resid_pre/mid/post, hook_attn_out, hook_mlp_out, or TransformerBridge's hook_in, ln2.hook_in, "
    "attn.hook_out, mlp.hook_out, hook_out"
)


def _residual_position(*names: str | None) -> tuple[int, bool] | None:
    """(block, is that block's input?) of the first name that is a residual-stream hook."""
    for name in names:
        for pattern, offset, is_block_input in _RESIDUAL_HOOKS:
            m = pattern.match(name or "")
            if m:
                return int(m.group(1)) + offset, is_block_input
    return None


def decoder_hook(sae: SAE[Any]) -> str:
    """The hook the SAE's decoder writes: `hook_name_out` for transcoders, else the hook it reads."""
    meta = sae.cfg.metadata
    return str(meta.hook_name_out or meta.hook_name)


def _decoder_position(sae: SAE[Any]) -> tuple[int, bool] | None:
    meta = sae.cfg.metadata
    if meta.hook_name_out:  # a transcoder: where it writes, not what it reads
        return _residual_position(meta.hook_name_out)
    return _residual_position(meta.hook_name, meta.hf_hook_name)


def sae_layer(sae: SAE[Any]) -> int:
    """The residual layer the SAE's decoder rows live in (e.g. 7 for blocks.6.hook_resid_post; 1 for a
    transcoder writing blocks.1.hook_mlp_out)."""
    found = _decoder_position(sae)
    if found is not None:
        return found[0]
    raise InputError(
        f"the SAE's decoder writes {decoder_hook(sae)!r}, which is not in the residual stream: self-explanation "
        f"injects decoder rows into the residual stream ({_RESIDUAL_HOOK_NAMES}). "
        "Pass check_hook=False to inject its decoder rows anyway."
    )


def sae_input_layer(sae: SAE[Any]) -> int | None:
    """The block whose input residual is exactly what the SAE encodes; None if it reads something else."""
    meta = sae.cfg.metadata
    found = _residual_position(meta.hook_name, meta.hf_hook_name)
    return found[0] if found is not None and found[1] else None


def readable_input_layer(sae: SAE[Any], backend: Backend, use: str) -> int:
    """The block whose input residual the SAE encodes, when `backend` can read it there; otherwise an
    InputError saying that `use` (e.g. "the vocabulary probe") needs such an SAE."""
    layer = sae_input_layer(sae)
    if layer is None or layer >= backend.n_layers:
        raise InputError(
            f"{use} reads the residual the SAE encodes as it enters a block; hook "
            f"{sae.cfg.metadata.hook_name!r} is not one (use an SAE on hook_resid_pre, or on hook_resid_post "
            "of any block but the last)."
        )
    return layer


def sae_prepends_bos(sae: SAE[Any]) -> bool:
    """Whether the SAE saw text with BOS first: yes unless its metadata says prepend_bos=False."""
    return sae.cfg.metadata.prepend_bos is not False
