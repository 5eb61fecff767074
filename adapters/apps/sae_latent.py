"""The `bench sae-latent` benchmark: token latents of an SAE (whose right explanation is one word), explained from
their decoder rows; is the word named, literally and semantically?"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sae_lens import SAE

from sae_selfexplain_plugin import SelfExplainConfig, SelfExplainer
from sae_selfexplain_plugin.activation_examples import ActivationExamples
from sae_selfexplain_plugin.backend import Backend
from sae_selfexplain_plugin.errors import InputError
from sae_selfexplain_plugin.word_recovery import Embed, RecoveryRow, recovery_row

from ..sae_lens import check_compatible, decoder_rows, sae_layer


def token_latents(examples: ActivationExamples, latents: Sequence[int], min_peaks: int = 8) -> list[tuple[int, str]]:
    """(latent, word) for the latents whose top contexts peak on one alphabetic word of >= 3 letters at least
    `min_peaks` times: token features, whose right explanation is that word."""
    out = []
    for f in latents:
        token = examples[f].dominant_token(min_peaks)
        if token is not None and token.isalpha() and len(token) >= 3:
            out.append((f, token))
    return out


def latent_recovery(
    sae: SAE[Any],
    backend: Backend,
    latents: Sequence[tuple[int, str]],
    config: SelfExplainConfig,
    progress: Callable[[int], None] | None = None,
    embed: Embed | None = None,
) -> RecoveryRow:
    """The `sae-latent` benchmark: explain each token latent's decoder row; is its word named (literally, and
    with `embed` semantically, among the latents' words)?"""
    check_compatible(sae, backend)
    features, names = [f for f, _ in latents], [w for _, w in latents]
    if not features:
        raise InputError("no token-feature latents to test; lower min_peaks or pass other latents.")
    explainer = SelfExplainer(backend, config)
    records = explainer.explain(decoder_rows(sae, features), features, progress=progress)
    keys = [f"{f}:{w}" for f, w in latents]
    return recovery_row(explainer, records, names, "sae-latent", sae_layer(sae), "sae-latent", keys, embed)
