"""Which SAE a piece of data belongs to, decided by its weights, not its name.

Two SAEs can share a name (a re-trained SAE saved over the cfg of another, a copied folder): results,
resume checkpoints and activation examples are tied to the decoder's weights by `decoder_fingerprint`, and
every reader that combines them checks they agree (`check_one_sae`, `check_same_sae`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import torch

from .errors import InputError

FINGERPRINT_CHARS = 16  # 64 bits of sha256: collisions are not a concern between one user's SAEs


def decoder_fingerprint(w_dec: torch.Tensor) -> str:
    """sha256 (first 16 hex digits) of the decoder matrix as fp32 C-contiguous bytes, with its shape: the
    same weights give the same fingerprint on any device and in any dtype that holds them exactly."""
    w = w_dec.detach().to("cpu", torch.float32).contiguous()
    digest = hashlib.sha256(f"{tuple(w.shape)}".encode())
    digest.update(w.numpy().tobytes())
    return digest.hexdigest()[:FINGERPRINT_CHARS]


def sae_name(identity: dict[str, Any]) -> str:
    """A readable name for an SAE identity (records' `sae` field): its Neuronpedia id, else its model and hook,
    with its fingerprint when known."""
    name = identity.get("neuronpedia_id") or "/".join(
        str(identity[k]) for k in ("model_name", "hook_name") if identity.get(k)
    )
    fingerprint = identity.get("fingerprint")
    return f"{name or 'an unnamed SAE'} (weights {fingerprint})" if fingerprint else str(name or "an unnamed SAE")


def same_sae(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two identities name the same SAE: by fingerprint where both have one, else (records written
    before fingerprints) by every identity key both carry."""
    if a.get("fingerprint") and b.get("fingerprint"):
        return bool(a["fingerprint"] == b["fingerprint"])
    shared = (set(a) & set(b)) - {"fingerprint", "sae_lens_version"}
    return all(a[k] == b[k] for k in shared)


def check_same_sae(expected: dict[str, Any], found: dict[str, Any], what: str, fix: str) -> None:
    """InputError naming both SAEs when `found` (e.g. activation examples) is not the SAE of `expected`."""
    if not same_sae(expected, found):
        raise InputError(f"{what} belong to {sae_name(found)}, not to {sae_name(expected)}; {fix}")


def selector(identity: dict[str, Any]) -> str:
    """How `--sae-id` picks this SAE in a results store: `neuronpedia_id@fingerprint` (the store key), or what
    is known of it."""
    name, fingerprint = identity.get("neuronpedia_id"), identity.get("fingerprint")
    return f"--sae-id {name}@{fingerprint}" if name and fingerprint else sae_name(identity)


def check_one_sae(identities: Iterable[tuple[dict[str, Any], str, str]], what: str) -> None:
    """Refuse results mixing SAEs or settings: `identities` yields (sae identity, model_id, settings_hash) per
    record. Every distinct fingerprint counts (not only the first record's), and records without one (written
    before fingerprints) may not stand beside records with one. InputError naming two that differ, and how to
    pick one."""
    first: tuple[dict[str, Any], str, str] | None = None
    by_fingerprint: dict[str, dict[str, Any]] = {}
    unmarked: dict[str, Any] | None = None
    for sae, model_id, settings in identities:
        if sae.get("fingerprint"):
            by_fingerprint.setdefault(str(sae["fingerprint"]), sae)
        elif unmarked is None:
            unmarked = sae
        if first is None:
            first = (sae, model_id, settings)
            continue
        saes = list(by_fingerprint.values())
        other = saes[1] if len(saes) > 1 else None if same_sae(first[0], sae) else sae
        if other is not None:
            one = saes[0] if len(saes) > 1 else first[0]
            raise InputError(
                f"{what} mixes SAEs: {sae_name(one)} and {sae_name(other)}; pass the results of one SAE (with a "
                f"store: {selector(one)} or {selector(other)})."
            )
        if model_id != first[1] or settings != first[2]:
            raise InputError(
                f"{what} mixes runs with different settings (model {first[1]!r}, settings {first[2]!r} and model "
                f"{model_id!r}, settings {settings!r}); pass the results of one run (with a store, --settings "
                "picks one)."
            )
    if by_fingerprint and unmarked is not None:
        raise InputError(
            f"{what} mixes records that carry their SAE's weights fingerprint with records that do not "
            f"({sae_name(unmarked)}, written by an older sae-selfexplain), so they cannot be told to be one SAE; "
            "re-run `explain` for the old records, or pass them on their own."
        )
