"""What the model's residuals say through an SAE: its activations over a text (activation records), and the
corpus-free labels read through it (vocabulary probe, direction lens)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from sae_lens import SAE

from sae_selfexplain_plugin import Backend
from sae_selfexplain_plugin.vocabulary import (
    centred_vocabulary,
    direction_lens,
    nearest_tokens,
    probe_batches,
    probe_vocabulary,
    vocabulary_residuals,
)

from .hooks import readable_input_layer, sae_input_layer, sae_prepends_bos
from .loading import _feature_indices, decoder_rows


def encode_residual(sae: SAE[Any], resid: torch.Tensor) -> torch.Tensor:
    """The SAE's activations of residuals [..., d_in] read on any device and dtype (moved to the SAE's)."""
    acts: torch.Tensor = sae.encode(resid.to(sae.W_dec.device, sae.W_dec.dtype))
    return acts


def sae_input_ids(sae: SAE[Any], tokenizer: Any, text: str) -> tuple[torch.Tensor, int]:
    """Token ids [1, T] of `text` as the SAE saw text in training: BOS first unless its metadata says
    prepend_bos=False (the first position is an attention sink with outsized norms otherwise); and how many
    leading positions (the BOS) to skip when reading activations."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if sae_prepends_bos(sae) and bos is not None:
        return torch.tensor([[bos, *ids]]), 1
    return torch.tensor([ids]), 0


@torch.no_grad()
def activation_records(
    sae: SAE[Any], backend: Backend, features: list[int], texts: list[str], source: str
) -> list[dict[str, Any] | None]:
    """Per feature, its SAE activations over a text: {"source", "tokens", "values"} (None if not computable:
    an empty text, or an SAE that does not encode a block's input residual)."""
    layer = sae_input_layer(sae)
    tok = backend.tokenizer
    if layer is None or layer >= backend.n_layers:
        return [None] * len(features)
    out: list[dict[str, Any] | None] = []
    for feature, text in zip(features, texts):
        if not text.strip():
            out.append(None)
            continue
        ids, skip = sae_input_ids(sae, tok, text)
        resid = backend.residual(ids, torch.ones_like(ids), layer)[0, skip:]
        acts = encode_residual(sae, resid)[:, feature].float().cpu()
        tokens = [tok.decode([int(t)]) for t in ids[0, skip:]]
        out.append({"source": source, "tokens": tokens, "values": [round(float(v), 6) for v in acts]})
    return out


def vocabulary_labels(
    sae: SAE[Any],
    backend: Backend,
    features: Sequence[int],
    *,
    k: int = 3,
    progress: Callable[[int], None] | None = None,
) -> list[list[tuple[str, float]]]:
    """Per feature, the k word tokens of the model's vocabulary that make it fire most, read through
    this SAE's encoder (vocabulary.probe_vocabulary: no corpus, one pass over the vocabulary for all
    `features`). An empty list: no single word evokes the feature."""
    layer = readable_input_layer(sae, backend, "the vocabulary probe")
    idx = torch.tensor(_feature_indices(list(features), sae.cfg.d_sae), device=sae.W_dec.device)
    return probe_vocabulary(
        backend, layer, lambda resid: encode_residual(sae, resid)[:, idx], len(idx), k=k,
        prepend_bos=sae_prepends_bos(sae), progress=progress,
    )  # fmt: skip


def lens_labels(
    sae: SAE[Any],
    backend: Backend,
    features: Sequence[int],
    *,
    k: int = 3,
    progress: Callable[[int], None] | None = None,
) -> list[list[tuple[str, float]]]:
    """Per feature, the k word tokens whose centred residual at the SAE's hook points most along its decoder
    row (vocabulary.direction_lens: the direction and the model only, no encoder, no examples)."""
    layer = readable_input_layer(sae, backend, "the direction lens")
    rows = decoder_rows(sae, _feature_indices(list(features), sae.cfg.d_sae))
    return direction_lens(backend, layer, rows, k=k, prepend_bos=sae_prepends_bos(sae), progress=progress)


def probe_and_lens_labels(
    sae: SAE[Any],
    backend: Backend,
    features: Sequence[int],
    *,
    k: int = 3,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[list[tuple[str, float]]], list[list[tuple[str, float]]]]:
    """`vocabulary_labels` and `lens_labels` from one read of the vocabulary (held in memory for both)."""
    layer = readable_input_layer(sae, backend, "the vocabulary probe with the direction lens")
    indices = _feature_indices(list(features), sae.cfg.d_sae)
    idx = torch.tensor(indices, device=sae.W_dec.device)
    read = list(vocabulary_residuals(backend, layer, prepend_bos=sae_prepends_bos(sae), progress=progress))
    probed = probe_batches(backend.tokenizer, read, lambda resid: encode_residual(sae, resid)[:, idx], len(idx), k)
    ids, table = centred_vocabulary(read)
    return probed, nearest_tokens(backend.tokenizer, ids, table, decoder_rows(sae, indices), k)
