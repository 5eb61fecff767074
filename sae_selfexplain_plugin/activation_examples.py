"""Activation examples of SAE features: each feature's top-activating contexts and random non-activating ones.

Self-explanation never needs them; evaluation and reports do (a person, or a scorer, compares an explanation with
what the feature fires on). Built in one streaming pass over held-apart text (`example_collector`), stored in one
safetensors file (token windows as ids + a table of their strings and of the text of split characters,
activations in fp16, the SAE's identity).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import InputError, SelfExplainError
from .files import atomic_writer, parse_json

EXAMPLES_FILE = "activation_examples.safetensors"
SCORE_SHARE = 0.5  # of a corpus's documents that go to the score split (a document's hash decides)


def score_split_path(path: str | Path) -> Path:
    """The score split beside an examples file: `X.safetensors` -> `X.score.safetensors`. The file itself is the
    explain split: what any labeller may read (the top-tokens baseline, auto-interp, adapter training). The score
    split comes from other documents of the corpus and is never shown to a labeller; scorers read it."""
    path = Path(path)
    return path.with_name(f"{path.stem}.score{path.suffix}")


def score_split_of(document: str) -> bool:
    """Whether `document` belongs to the score split: decided by its text alone, so the two splits share no
    document whatever the corpus order, and a duplicate document always lands on the same side."""
    digest = hashlib.sha256(document.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") < SCORE_SHARE * 2**64


_FORMAT = "sae-selfexplain-activation-examples/2"  # /2: the SAE's identity, whole characters (pieces)
LEFT_CONTEXT = 4  # tokens kept before each window: a character is at most 4 bytes, so 4 byte-level tokens


@dataclass(frozen=True)
class Context:
    """A window of text (one string per token) and the feature's activation at each token."""

    tokens: list[str]
    values: list[float]

    @property
    def text(self) -> str:
        return "".join(self.tokens)

    @property
    def max_value(self) -> float:
        return max(self.values, default=0.0)


@dataclass(frozen=True)
class FeatureExamples:
    feature: int
    frequency: float  # fraction of held-apart tokens on which the feature fires
    top: list[Context]  # strongest first
    random: list[Context]  # contexts where the feature does not fire at all
    sampled: list[Context] = field(default_factory=list)  # firing contexts drawn uniformly (score split)

    def peak_tokens(self) -> list[str]:
        """The token (stripped) at which each top context peaks, strongest context first."""
        return [ctx.tokens[max(range(len(ctx.values)), key=ctx.values.__getitem__)].strip() for ctx in self.top]

    def top_tokens(self, n: int = 5) -> list[str]:
        """The distinct tokens at which the top contexts peak, strongest first (the cheap auto-interp baseline)."""
        return list(dict.fromkeys(t for t in self.peak_tokens() if t))[:n]

    def dominant_token(self, min_count: int) -> str | None:
        """The peak token of at least `min_count` top contexts, compared case-insensitively (a token
        feature), or None."""
        counts = Counter(t.lower() for t in self.peak_tokens() if t)
        token, count = max(counts.items(), key=lambda kv: kv[1], default=("", 0))
        return token if count >= min_count else None


class ActivationExamples:
    """Examples for every feature of one SAE; `examples[i]` is feature i's `FeatureExamples`.

    A token's text is `vocab[id]`, except where a window's text differs from its tokens decoded one by one
    (a character split over several byte-level tokens): those positions are listed per split in a tensor
    `<split>_pieces` [n, 2] (flat position in `<split>_tokens`, index into the `pieces` strings). A later
    split (e.g. "explain", "score") adds its own `<split>_tokens` / `<split>_pieces` the same way."""

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        vocab: dict[int, str],
        sae: dict[str, Any] | None = None,
        pieces: list[str] | None = None,
    ) -> None:
        self._t = tensors
        self._vocab = vocab
        self._sae = sae
        self._pieces = pieces or []
        self._fixes: dict[str, dict[int, str]] = {}

    @property
    def sae(self) -> dict[str, Any] | None:
        """The identity of the SAE these examples were collected with (`adapters.sae_lens.sae_identity`: its
        decoder fingerprint, d_sae, hook...), or None for files written before identities were stored."""
        return dict(self._sae) if self._sae is not None else None

    def with_sae(self, sae: dict[str, Any]) -> ActivationExamples:
        """These examples stamped with the identity of the SAE they were collected with."""
        return ActivationExamples(self._t, self._vocab, dict(sae), self._pieces)

    @property
    def d_sae(self) -> int:
        return int(self._t["frequency"].shape[0])

    def live_features(self) -> list[int]:
        return [int(i) for i in torch.nonzero(self._t["frequency"] > 0).flatten()]

    def __getitem__(self, feature: int) -> FeatureExamples:
        if not 0 <= feature < self.d_sae:
            raise InputError(f"feature {feature} is out of range: these examples cover features 0..{self.d_sae - 1}.")
        t = self._t
        k, w = t["top_tokens"].shape[1:]
        top = [
            self._context("top", (feature * k + j) * w, t["top_tokens"][feature, j], t["top_values"][feature, j])
            for j in range(k)
            if t["top_values"][feature, j].max() > 0
        ]
        pool = t["pool_tokens"]
        rand = [
            self._context("pool", int(j) * w, pool[int(j)], torch.zeros(w))
            for j in t["random_index"][feature]
            if j >= 0
        ]
        sampled = []
        if "sample_tokens" in t:
            n, tokens, values = t["sample_tokens"].shape[1], t["sample_tokens"][feature], t["sample_values"][feature]
            sampled = [
                self._context("sample", (feature * n + j) * w, tokens[j], values[j])
                for j in range(n)
                if values[j].max() > 0
            ]
        return FeatureExamples(feature, float(t["frequency"][feature]), top, rand, sampled)

    def _context(self, split: str, offset: int, ids: torch.Tensor, values: torch.Tensor) -> Context:
        fixes = self._split_fixes(split)
        tokens = [fixes.get(offset + n, self._vocab[int(i)]) for n, i in enumerate(ids)]
        return Context(tokens, [round(float(v), 4) for v in values])

    def _split_fixes(self, split: str) -> dict[int, str]:
        if split not in self._fixes:
            rows = self._t.get(f"{split}_pieces")
            pairs = rows.tolist() if rows is not None else []
            self._fixes[split] = {int(at): self._pieces[int(piece)] for at, piece in pairs}
        return self._fixes[split]

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save

        if self._sae is None:  # a file without it could be attached to any SAE of the same size
            raise SelfExplainError(
                f"refusing to save activation examples to {path} without the identity of their SAE: call "
                "with_sae(sae_lens.sae_identity(sae)) first; this is a bug in the caller."
            )
        meta = {"format": _FORMAT, "vocab": json.dumps({str(k): v for k, v in sorted(self._vocab.items())})}
        meta["sae"] = json.dumps(self._sae)
        if self._pieces:
            meta["pieces"] = json.dumps(self._pieces)
        data = save({k: _compact(k, v).contiguous() for k, v in self._t.items()}, metadata=meta)
        with atomic_writer(path, "wb") as f:
            f.write(data)

    @classmethod
    def load(cls, path: str | Path) -> ActivationExamples:
        """Read a file written by `save` (any format version); InputError naming the file and the field for
        anything that is not what `save` writes."""
        from safetensors import safe_open

        path = Path(path)
        if not path.exists():
            raise InputError(f"no activation examples at {path}; build them with `sae-selfexplain contexts`.")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
            tensors = {k: v.to(torch.int32) if v.dtype == torch.uint16 else v for k, v in tensors.items()}
        except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
            raise InputError(f"{path} is not a readable activation-examples file ({e}); rebuild it.") from e
        if meta.get("format") not in _FORMATS:
            raise InputError(
                f"{path}: field 'format' is {meta.get('format')!r}, not one of {', '.join(_FORMATS)}: not an "
                f"activation-examples file of this version; {_FIX}"
            )
        vocab = _read_vocab(path, meta.get("vocab"))
        sae = _meta_json(path, meta, "sae", dict)
        if sae is None and meta["format"] == _FORMAT:
            raise InputError(f"{path}: field 'sae' (the identity of the examples' SAE) is missing; {_FIX}")
        pieces = _meta_json(path, meta, "pieces", list) or []
        if not all(isinstance(p, str) for p in pieces):
            raise InputError(f"{path}: field 'pieces' must be a JSON list of strings; {_FIX}")
        _check_tensors(path, tensors, vocab, len(pieces), sae)
        return cls(tensors, vocab, sae, pieces)


_FORMATS = ("sae-selfexplain-activation-examples/1", _FORMAT)  # /1: no SAE identity, no pieces
_FIX = "rebuild the file with `sae-selfexplain contexts`, or pass the right file."
_TENSORS = {  # name: (dimensions, floating point)
    "frequency": (1, True),
    "top_tokens": (3, False),
    "top_values": (3, True),
    "pool_tokens": (2, False),
    "random_index": (2, False),
}


def _compact(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Token ids as uint16 where every id fits (vocabularies up to 65,536): half the file."""
    if name.endswith("_tokens") and tensor.numel() and int(tensor.min()) >= 0 and int(tensor.max()) < 2**16:
        return tensor.to(torch.uint16)
    return tensor


def _parse(path: Path, text: str, field: str) -> Any:
    try:
        return parse_json(text, f"{path}: field {field!r}")
    except InputError as e:
        raise InputError(f"{str(e).rstrip('.')}; {_FIX}") from None


def _meta_json(path: Path, meta: dict[str, str], field: str, kind: type) -> Any:
    if field not in meta:
        return None
    value = _parse(path, meta[field], field)
    if not isinstance(value, kind):
        raise InputError(f"{path}: field {field!r} must be a JSON {kind.__name__}, got {type(value).__name__}; {_FIX}")
    return value


def _read_vocab(path: Path, text: str | None) -> dict[int, str]:
    if text is None:
        raise InputError(f"{path}: field 'vocab' (the text of each token id) is missing; {_FIX}")
    raw = _parse(path, text, "vocab")
    if not isinstance(raw, dict) or not raw:
        raise InputError(f"{path}: field 'vocab' must be a non-empty JSON object of token id: text; {_FIX}")
    vocab = {}
    for key, value in raw.items():
        if not (key.isascii() and key.isdigit()) or not isinstance(value, str):
            raise InputError(f"{path}: field 'vocab' has entry {key!r}: {value!r}, expected a token id: text; {_FIX}")
        vocab[int(key)] = value
    return vocab


def _check_tensors(
    path: Path, t: dict[str, torch.Tensor], vocab: dict[int, str], n_pieces: int, sae: dict[str, Any] | None
) -> None:
    """Every tensor `save` writes, of its dtype kind and of shapes that fit together, and ids that `vocab` knows."""
    for name, (ndim, floating) in _TENSORS.items():
        if name not in t:
            raise InputError(f"{path}: tensor {name!r} is missing; {_FIX}")
        x = t[name]
        if x.ndim != ndim or x.is_floating_point() != floating or x.dtype == torch.bool:
            kind = "floating-point" if floating else "integer"
            raise InputError(
                f"{path}: tensor {name!r} is {tuple(x.shape)} {x.dtype}, expected {ndim} dimensions of {kind}; {_FIX}"
            )
    d_sae, w, (pool, pool_w) = len(t["frequency"]), t["top_tokens"].shape[2], t["pool_tokens"].shape
    fits = (
        t["top_tokens"].shape[0] == d_sae
        and t["top_values"].shape == t["top_tokens"].shape
        and t["random_index"].shape[0] == d_sae
        and pool_w == w
        and pool >= 1
    )
    if not fits:
        shapes = ", ".join(f"{n} {tuple(t[n].shape)}" for n in _TENSORS)
        raise InputError(f"{path}: tensor shapes do not fit together ({shapes}); {_FIX}")
    freq = t["frequency"]
    if not bool(torch.isfinite(freq).all()) or bool((freq < 0).any()) or bool((freq > 1).any()):
        raise InputError(f"{path}: tensor 'frequency' must hold fractions in [0, 1]; {_FIX}")
    if not bool(torch.isfinite(t["top_values"]).all()):
        raise InputError(f"{path}: tensor 'top_values' holds NaN or infinite values; {_FIX}")
    index = t["random_index"]
    if index.numel() and (int(index.min()) < -1 or int(index.max()) >= pool):
        raise InputError(f"{path}: tensor 'random_index' must hold -1 or a row of 'pool_tokens' (< {pool}); {_FIX}")
    ids = torch.unique(torch.cat([t["top_tokens"].flatten(), t["pool_tokens"].flatten()])).tolist()
    unknown = [i for i in ids if i not in vocab]
    if unknown:
        raise InputError(f"{path}: field 'vocab' lacks token ids {unknown[:5]} used by the contexts; {_FIX}")
    if ("sample_tokens" in t) != ("sample_values" in t):
        raise InputError(f"{path}: tensors 'sample_tokens' and 'sample_values' come together; {_FIX}")
    if "sample_tokens" in t:
        st, sv = t["sample_tokens"], t["sample_values"]
        if st.ndim != 3 or st.shape[0] != d_sae or st.shape[2] != w or sv.shape != st.shape or st.is_floating_point():
            raise InputError(
                f"{path}: tensors 'sample_tokens' {tuple(st.shape)} and 'sample_values' {tuple(sv.shape)} do not fit "
                f"[d_sae {d_sae}, n, window {w}]; {_FIX}"
            )
        if not sv.is_floating_point() or not bool(torch.isfinite(sv).all()):
            raise InputError(f"{path}: tensor 'sample_values' must hold finite floating-point values; {_FIX}")
        missing = [i for i in torch.unique(st).tolist() if i not in vocab]
        if missing:
            raise InputError(f"{path}: field 'vocab' lacks token ids {missing[:5]} used by the contexts; {_FIX}")
    for split in ("top", "pool", "sample"):
        pieces = t.get(f"{split}_pieces")
        if pieces is None:
            continue
        if f"{split}_tokens" not in t:
            raise InputError(f"{path}: tensor '{split}_pieces' without '{split}_tokens'; {_FIX}")
        size = t[f"{split}_tokens"].numel()
        if pieces.ndim != 2 or pieces.shape[1] != 2 or pieces.is_floating_point() or pieces.dtype == torch.bool:
            raise InputError(
                f"{path}: tensor '{split}_pieces' is {tuple(pieces.shape)}, expected [n, 2] integers; {_FIX}"
            )
        if not len(pieces):
            continue
        lo, hi = pieces.min(0).values.tolist(), pieces.max(0).values.tolist()
        if lo[0] < 0 or lo[1] < 0 or hi[0] >= size or hi[1] >= n_pieces:
            raise InputError(
                f"{path}: tensor '{split}_pieces' points outside '{split}_tokens' or field 'pieces'; {_FIX}"
            )
    if sae is not None and sae.get("d_sae", d_sae) != d_sae:
        raise InputError(f"{path}: field 'sae' has d_sae {sae.get('d_sae')!r} but the tensors cover {d_sae}; {_FIX}")
