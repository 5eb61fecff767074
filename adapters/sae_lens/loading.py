"""SAEs from disk with errors that name the cause, and what identifies an SAE and its features: its identity
(with the fingerprint of its weights), its decoder rows, checked feature indices."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE
from safetensors import safe_open

from sae_selfexplain_plugin.errors import InputError
from sae_selfexplain_plugin.files import parse_json
from sae_selfexplain_plugin.identity import decoder_fingerprint

from ..backends import check_device


def sae_lens_version() -> str:
    from importlib.metadata import version

    return version("sae-lens")


def load_sae_folder(path: str | Path, device: str = "cpu") -> SAE[Any]:
    """`SAE.load_from_disk`, with errors that say what is wrong with the folder: no cfg.json, an unreadable
    cfg or a field of the wrong type, no weights file, a corrupt or truncated one, or weights whose shapes
    disagree with the cfg (checked before anything is allocated)."""
    path = Path(path)
    cfg_path = path / "cfg.json"
    if not cfg_path.is_file():
        raise InputError(f"{path} is not a SAELens SAE folder (no cfg.json); save one with sae.save_model().")
    cfg = _read_sae_cfg(cfg_path)
    d_in, d_sae = _size_field(cfg, "d_in", cfg_path), _size_field(cfg, "d_sae", cfg_path)
    from sae_lens.registry import SAE_CLASS_REGISTRY

    architecture = cfg.get("architecture", "standard")
    if architecture not in SAE_CLASS_REGISTRY:
        raise InputError(
            f"{cfg_path}: architecture {architecture!r} is not one this SAELens ({sae_lens_version()}) knows "
            f"({', '.join(sorted(SAE_CLASS_REGISTRY))}); upgrade sae-lens, or check the cfg."
        )
    weights = path / SAE_WEIGHTS_FILE
    if not weights.is_file():
        others = sorted(p.name for p in path.iterdir() if p.suffix in (".safetensors", ".pt", ".pth", ".bin", ".npz"))
        raise InputError(
            f"{path} has cfg.json but no weights file {SAE_WEIGHTS_FILE}, where SAELens expects the SAE's weights"
            + (f" (the folder holds {others[:5]} instead)" if others else "")
            + "; copy the SAE's weights there, or re-save the SAE with sae.save_model()."
        )
    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in ("W_enc", "W_dec") if name in f.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises assorted types for damaged files
        raise InputError(
            f"cannot read the SAE weights in {weights} ({type(e).__name__}: {e}); the file is corrupt or truncated. "
            "Re-save or re-download it."
        ) from e
    if shapes != {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in)}:
        raise InputError(
            f"the weights in {weights} have shapes {shapes}, but cfg.json says d_in={d_in}, d_sae={d_sae} "
            f"(W_enc ({d_in}, {d_sae}), W_dec ({d_sae}, {d_in})); the cfg and the weights belong to different SAEs."
        )
    try:
        return SAE.load_from_disk(path, device=device)
    except Exception as e:  # the weights file read above; what is left is the cfg's other fields
        raise InputError(
            f"SAELens ({sae_lens_version()}) cannot build an SAE from {cfg_path} ({type(e).__name__}: "
            f"{str(e)[:300]}); check the cfg's fields against one written by sae.save_model()."
        ) from e


SAE_WEIGHTS_FILE = "sae_weights.safetensors"  # the name SAE.save_model writes and load_from_disk reads


def _read_sae_cfg(cfg_path: Path) -> dict[str, Any]:
    try:
        text = cfg_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{cfg_path}: cannot read it as UTF-8 text ({e}); it is not a valid SAE config.") from e
    cfg = parse_json(text, f"{cfg_path} (not a valid SAE config)")
    if not isinstance(cfg, dict):
        raise InputError(f"{cfg_path} is not a valid SAE config: a JSON object is expected, got {type(cfg).__name__}.")
    return cfg


def _size_field(cfg: dict[str, Any], name: str, cfg_path: Path) -> int:
    """A width from the cfg: a whole number >= 1 (576.9, "576" or true are refused, not truncated)."""
    if name not in cfg:
        raise InputError(f"{cfg_path} is not a valid SAE config: it lacks the field {name!r} (an integer width).")
    value = cfg[name]
    if type(value) is not int or value < 1:
        raise InputError(
            f"{cfg_path}: field {name!r} must be a whole number >= 1 (a width), got {repr(value)[:80]} "
            f"({type(value).__name__}); correct it to the SAE's {name}."
        )
    return value


def decoder_rows(sae: SAE[Any], features: list[int]) -> torch.Tensor:
    """The SAE's decoder rows (W_dec) of `features`, as float32 on the CPU: the directions to explain."""
    if sae.W_dec.is_meta:
        raise InputError("the SAE's weights are on the meta device (not loaded); load them, e.g. SAE.load_from_disk.")
    if sae.W_dec.is_complex():
        raise InputError(f"the SAE's decoder is complex ({sae.W_dec.dtype}); its rows are not residual directions.")
    rows: torch.Tensor = sae.W_dec.detach()[features].float().cpu()
    return rows


def sae_identity(sae: SAE[Any]) -> dict[str, Any]:
    """What identifies the SAE in results and exports."""
    meta = sae.cfg.metadata
    keys = ("model_name", "hook_name", "hf_hook_name", "neuronpedia_id", "prepend_bos", "sae_lens_version")
    ident = {k: meta[k] for k in keys if meta[k] is not None}
    ident.update(architecture=sae.cfg.architecture(), d_in=sae.cfg.d_in, d_sae=sae.cfg.d_sae)
    ident["fingerprint"] = decoder_fingerprint(sae.W_dec)
    return ident


def _feature_indices(features: int | Sequence[int] | torch.Tensor, d_sae: int) -> list[int]:
    if isinstance(features, torch.Tensor):
        if features.is_floating_point() or features.dtype == torch.bool or features.ndim > 1:
            raise InputError("a tensor of features must be a 0-d or 1-d tensor of integer indices.")
        indices = [int(i) for i in features.flatten().tolist()]
    elif isinstance(features, int) and not isinstance(features, bool):
        indices = [features]
    elif isinstance(features, Sequence):
        indices = list(features)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
            raise InputError(f"feature indices must be integers, got {indices[:5]}...")
    else:
        raise InputError(f"features must be an int, a sequence of ints or an integer tensor, got {type(features)}.")
    bad = [i for i in indices if not 0 <= i < d_sae]
    if bad:
        raise InputError(f"feature indices {bad[:10]} are out of range: this SAE has features 0..{d_sae - 1}.")
    if not indices:
        raise InputError("the feature list is empty: pass at least one feature index.")
    return indices


def load_sae(spec: str, device: str = "cpu") -> tuple[SAE[Any], str]:
    """A local SAELens folder, or `RELEASE:SAE_ID` from SAELens's registry; returns (sae, store key)."""
    check_device(device)
    path = Path(spec)
    if path.exists():
        sae = load_sae_folder(path, device=device)
    elif ":" in spec:
        release, sae_id = spec.split(":", 1)
        sae = _load_from_registry(release, sae_id, device)
    else:
        raise InputError(f"--sae {spec!r} is neither an existing folder nor RELEASE:SAE_ID.")
    return sae, store_key(sae, str(path.resolve() if path.exists() else spec))


def store_key(sae: SAE[Any], where: str) -> str:
    """The SAE's key in a results store: its name (neuronpedia_id, else `where` it was loaded from) and the
    fingerprint of its weights, so that another SAE saved under the same name never resumes this one's work."""
    return f"{sae.cfg.metadata.neuronpedia_id or where}@{decoder_fingerprint(sae.W_dec)}"


def _load_from_registry(release: str, sae_id: str, device: str) -> SAE[Any]:
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    known = get_pretrained_saes_directory()
    if release not in known:
        raise InputError(
            f"--sae {release}:{sae_id}: {release!r} is not a release in SAELens's registry, and no folder of that "
            "name exists; pass a SAELens SAE folder or RELEASE:SAE_ID (see SAELens's pretrained_saes.yaml)."
        )
    if sae_id not in known[release].saes_map:
        some = ", ".join(list(known[release].saes_map)[:3])
        raise InputError(f"--sae {release}:{sae_id}: release {release!r} has no SAE {sae_id!r} (it has {some}, ...).")
    try:
        return SAE.from_pretrained(release, sae_id, device=device)
    except OSError as e:  # huggingface_hub's offline and connection errors are OSErrors
        raise InputError(
            f"cannot download {release}:{sae_id} from the Hugging Face hub ({type(e).__name__}); without network, "
            "save the SAE once with sae.save_model(FOLDER) where you have it and pass --sae FOLDER."
        ) from None
