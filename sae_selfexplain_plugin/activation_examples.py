"""Activation examples of SAE features: each feature's top-activating contexts and random non-activating ones.

Self-explanation never needs them; evaluation and reports do (a person, or a scorer, compares an explanation with
what the feature fires on). Built in one streaming pass over held-apart text (`ExampleCollector`), stored in one
safetensors file (token windows as ids + a table of their strings and of the text of split characters,
activations in fp16, the SAE's identity).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import InputError
from .files import atomic_writer, parse_json

EXAMPLES_FILE = "activation_examples.safetensors"
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
        return FeatureExamples(feature, float(t["frequency"][feature]), top, rand)

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

        meta = {"format": _FORMAT, "vocab": json.dumps({str(k): v for k, v in sorted(self._vocab.items())})}
        if self._sae is not None:
            meta["sae"] = json.dumps(self._sae)
        if self._pieces:
            meta["pieces"] = json.dumps(self._pieces)
        data = save({k: v.contiguous() for k, v in self._t.items()}, metadata=meta)
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
        except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
            raise InputError(f"{path} is not a readable activation-examples file ({e}); rebuild it.") from e
        if meta.get("format") not in _FORMATS:
            raise InputError(
                f"{path}: field 'format' is {meta.get('format')!r}, not one of {', '.join(_FORMATS)}: not an "
                f"activation-examples file of this version; {_FIX}"
            )
        vocab = _read_vocab(path, meta.get("vocab"))
        sae = _meta_json(path, meta, "sae", dict)
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
    for split in ("top", "pool"):
        pieces = t.get(f"{split}_pieces")
        if pieces is None:
            continue
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


def _complete(text: str) -> str:
    """`text` without a trailing partial character (decoders show it as U+FFFD until its last byte)."""
    return text.rstrip("\ufffd")


def window_pieces(
    ids: list[int], before: list[int], plain: list[str], decode_text: Callable[[list[int]], str]
) -> list[str] | None:
    """Each token's text inside its window, or None where that is `plain` (the tokens decoded one by one).

    A character split over several tokens is given whole to the token that completes it (the others get "");
    `before` (the tokens preceding the window) completes a character that starts before the window; bytes of
    a character cut off before all that was kept are dropped rather than shown as U+FFFD."""
    if "\ufffd" not in "".join(plain) and decode_text(ids) == "".join(plain):
        return None

    def shown(n: int) -> str:
        # leading U+FFFD: bytes of a character cut off at the start of what was kept, never shown
        return _complete(decode_text(before + ids[:n])).lstrip("\ufffd") if before or n else ""

    pieces: list[str] = []
    done = shown(0)
    for n in range(1, len(ids) + 1):
        text = shown(n)
        # a decoder that rewrites earlier text as more follows: keep the token's own text
        piece = text[len(done) :] if text.startswith(done) else plain[n - 1]
        invalid = len(piece) - len(piece.lstrip("\ufffd"))
        if invalid and pieces and not pieces[-1]:  # bytes that never became a character: shown at their token
            pieces[-1], piece = piece[:invalid], piece[invalid:]
        pieces.append(piece)
        done = text
    return pieces


class ExampleCollector:
    """Streams (token ids, feature activations) batches and keeps, per feature, the `top_k` contexts with the
    highest peak activation (a `window` of tokens around the peak) and `n_random` contexts from a fixed pool of
    random windows in which the feature never fires. Each window keeps the `left` tokens before it, so that
    its text can be decoded whole (`finish`)."""

    def __init__(
        self,
        d_sae: int,
        top_k: int = 10,
        window: int = 24,
        n_random: int = 10,
        pool_size: int = 256,
        seed: int = 0,
        left: int = LEFT_CONTEXT,
    ) -> None:
        self.d_sae, self.top_k, self.window, self.n_random, self.pool_size = d_sae, top_k, window, n_random, pool_size
        self.left = left
        self._g = torch.Generator().manual_seed(seed)
        self.best = torch.zeros(d_sae, top_k)  # peak activation of each kept context
        self.top_tokens = torch.zeros(d_sae, top_k, window, dtype=torch.int32)
        self.top_left = torch.full((d_sae, top_k, left), -1, dtype=torch.int32)  # -1: no token there
        self.top_values = torch.zeros(d_sae, top_k, window)
        self.fires = torch.zeros(d_sae)
        self.n_tokens = 0
        self.pool_tokens: list[torch.Tensor] = []
        self.pool_left: list[torch.Tensor] = []
        self.pool_fires: list[torch.Tensor] = []  # [d_sae] bool per pool window

    def settings(self) -> dict[str, int]:
        return {
            "d_sae": self.d_sae, "top_k": self.top_k, "window": self.window, "n_random": self.n_random,
            "pool_size": self.pool_size, "left": self.left,
        }  # fmt: skip

    @torch.no_grad()
    def add(self, token_ids: torch.Tensor, acts: torch.Tensor, before: torch.Tensor | None = None) -> None:
        """token_ids [B, T]; acts [B, T, d_sae] (T >= window); before [B, n]: the tokens preceding each row
        in the text (-1: none), for the text of windows that start inside a character."""
        b, t, _f = acts.shape
        if t < self.window:
            raise InputError(f"rows of {t} tokens are shorter than the example window ({self.window}).")
        acts = acts.float()
        pad = torch.full((b, self.left), -1, dtype=torch.long)
        if before is not None and before.shape[1]:
            kept = before[:, -self.left :].long() if self.left else before[:, :0].long()
            pad[:, self.left - kept.shape[1] :] = kept
        extended = torch.cat([pad, token_ids.long()], dim=1)  # window start s: its left context starts at s
        self.fires += (acts > 0).sum((0, 1)).float()
        self.n_tokens += b * t
        self._add_pool(extended, acts)

        peak, where = acts.max(dim=1)  # [B, F]: each row's peak per feature and its position
        values = torch.cat([self.best, peak.T], dim=1)  # [F, K + B]
        keep = values.topk(self.top_k, dim=1).indices  # [F, K]
        is_new = keep >= self.top_k
        if not bool(is_new.any()):
            return
        feat, slot = torch.nonzero(is_new, as_tuple=True)
        row = keep[feat, slot] - self.top_k
        start = (where[row, feat] - self.window * 3 // 4).clamp(0, t - self.window)
        grabbed = extended[row[:, None], start[:, None] + torch.arange(self.left + self.window)].to(torch.int32)
        pos = start[:, None] + torch.arange(self.window)
        new_values = acts[row[:, None], pos, feat[:, None]]
        old_slot = keep.clamp(max=self.top_k - 1)[..., None]
        tokens = torch.gather(self.top_tokens, 1, old_slot.expand(-1, -1, self.window))
        left = torch.gather(self.top_left, 1, old_slot.expand(-1, -1, self.left))
        vals = torch.gather(self.top_values, 1, old_slot.expand(-1, -1, self.window))
        tokens[feat, slot], left[feat, slot] = grabbed[:, self.left :], grabbed[:, : self.left]
        vals[feat, slot] = new_values
        self.top_tokens, self.top_left, self.top_values = tokens, left, vals
        self.best = torch.gather(values, 1, keep)

    def _add_pool(self, extended: torch.Tensor, acts: torch.Tensor) -> None:
        t = acts.shape[1]
        for i in range(min(len(acts), self.pool_size - len(self.pool_tokens))):
            s = int(torch.randint(0, t - self.window + 1, (1,), generator=self._g))
            grabbed = extended[i, s : s + self.left + self.window].to(torch.int32)
            self.pool_left.append(grabbed[: self.left])
            self.pool_tokens.append(grabbed[self.left :])
            self.pool_fires.append((acts[i, s : s + self.window] > 0).any(0))

    def dead_fraction(self) -> float:
        """Fraction of features that never fired on the text seen so far."""
        return float((self.fires == 0).float().mean())

    def state(self) -> dict[str, torch.Tensor]:
        """Everything collected so far, as tensors (a resume checkpoint; `restore`). With `settings()` and
        `n_tokens`, nothing else is needed to continue."""

        def rows(kept: list[torch.Tensor], width: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.stack(kept) if kept else torch.zeros(0, width, dtype=dtype)

        return {
            "best": self.best,
            "top_tokens": self.top_tokens,
            "top_left": self.top_left,
            "top_values": self.top_values,
            "fires": self.fires,
            "pool_tokens": rows(self.pool_tokens, self.window, torch.int32),
            "pool_left": rows(self.pool_left, self.left, torch.int32),
            "pool_fires": rows(self.pool_fires, self.d_sae, torch.bool),
            "generator": self._g.get_state(),
        }

    def restore(self, tensors: dict[str, torch.Tensor], n_tokens: int, path: Path, fix: str) -> None:
        """Continue from `state()` tensors read from checkpoint `path` (settings already checked equal):
        InputError naming the tensor for a missing one or one of the wrong shape or dtype."""
        from .checkpoint import restore_generator, take

        f, k, w, left = self.d_sae, self.top_k, self.window, self.left
        i32 = torch.int32
        self.best = take(path, tensors, "best", (f, k), torch.float32, fix)
        self.top_tokens = take(path, tensors, "top_tokens", (f, k, w), i32, fix)
        self.top_left = take(path, tensors, "top_left", (f, k, left), i32, fix)
        self.top_values = take(path, tensors, "top_values", (f, k, w), torch.float32, fix)
        self.fires = take(path, tensors, "fires", (f,), torch.float32, fix)
        pool = take(path, tensors, "pool_tokens", (-1, w), i32, fix)
        if len(pool) > self.pool_size:
            raise InputError(f"{path}: tensor 'pool_tokens' has {len(pool)} rows, more than {self.pool_size}; {fix}")
        pool_left = take(path, tensors, "pool_left", (len(pool), left), i32, fix)
        pool_fires = take(path, tensors, "pool_fires", (len(pool), f), torch.bool, fix)
        self.pool_tokens, self.pool_left, self.pool_fires = list(pool), list(pool_left), list(pool_fires)
        restore_generator(path, self._g, take(path, tensors, "generator", (-1,), torch.uint8, fix), fix)
        self.n_tokens = n_tokens

    def finish(
        self,
        decode: Callable[[int], str],
        decode_text: Callable[[list[int]], str] | None = None,
    ) -> ActivationExamples:
        """The collected examples; `decode(token_id)` gives a token's text; `decode_text(ids)` (where given)
        the text of a sequence, so that characters split over several tokens are stored whole
        (`window_pieces`)."""
        if not self.pool_tokens:
            raise InputError("no text was added: the examples need at least one batch.")
        fires = torch.stack(self.pool_fires, dim=1)  # [F, pool]
        score = torch.rand(fires.shape, generator=self._g) + fires.float() * 2  # random order, firing windows last
        order = score.argsort(dim=1)[:, : self.n_random]
        random_index = torch.where(torch.gather(fires, 1, order), -1, order).to(torch.int32)
        pool = torch.stack(self.pool_tokens)
        tensors = {
            "frequency": self.fires / max(self.n_tokens, 1),
            "top_tokens": self.top_tokens,
            "top_values": self.top_values.half(),
            "pool_tokens": pool,
            "random_index": random_index,
        }
        ids = torch.unique(torch.cat([self.top_tokens.flatten(), pool.flatten()])).tolist()
        vocab = {int(i): decode(int(i)) for i in ids}
        pieces: list[str] = []
        if decode_text is not None:
            shown = self.best.flatten() > 0  # the top contexts a reader shows
            windows = {
                "top": (self.top_tokens.reshape(-1, self.window), self.top_left.reshape(-1, self.left), shown),
                "pool": (pool, torch.stack(self.pool_left), torch.ones(len(pool), dtype=torch.bool)),
            }
            table: dict[str, int] = {}
            for split, (tokens, left, used) in windows.items():
                fixes = []
                for r in torch.nonzero(used).flatten().tolist():
                    row = tokens[r].tolist()
                    before = [i for i in left[r].tolist() if i >= 0]
                    text = window_pieces(row, before, [vocab[i] for i in row], decode_text)
                    for n, piece in enumerate(text or []):
                        if piece != vocab[row[n]]:
                            fixes.append((r * self.window + n, table.setdefault(piece, len(table))))
                if fixes:
                    tensors[f"{split}_pieces"] = torch.tensor(fixes, dtype=torch.int64)
            pieces = list(table)
        return ActivationExamples(tensors, vocab, pieces=pieces)
