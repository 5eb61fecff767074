"""Collecting activation examples in one streaming pass: each feature's strongest windows, a pool of random
windows where it never fires, its firing density, and each window's text decoded whole (`window_pieces`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from .activation_examples import LEFT_CONTEXT, ActivationExamples
from .errors import InputError


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


_PARTS = ("tokens", "left", "values")


class _Slots:
    """Per feature, `k` kept windows ranked by a key (their peak activation, or a random priority), with the
    tokens before each window and the feature's activation at each token."""

    def __init__(self, d_sae: int, k: int, window: int, left: int) -> None:
        self.key = torch.zeros(d_sae, k)  # 0: an empty slot
        self.tokens = torch.zeros(d_sae, k, window, dtype=torch.int32)
        self.left = torch.full((d_sae, k, left), -1, dtype=torch.int32)  # -1: no token there
        self.values = torch.zeros(d_sae, k, window)

    def keep(self, keys: torch.Tensor, where: torch.Tensor, extended: torch.Tensor, acts: torch.Tensor) -> None:
        """Offer each row's window around its peak (`where` [B, F]) under `keys` [B, F]; the `k` highest keys
        stay. A window whose feature does not fire has all-zero values, and readers skip it."""
        k, window, n_left = self.key.shape[1], self.tokens.shape[2], self.left.shape[2]
        t = acts.shape[1]
        values = torch.cat([self.key, keys.T], dim=1)  # [F, K + B]
        top = values.topk(k, dim=1).indices  # [F, K]
        is_new = top >= k
        if not bool(is_new.any()):
            return
        feat, slot = torch.nonzero(is_new, as_tuple=True)
        row = top[feat, slot] - k
        start = (where[row, feat] - window * 3 // 4).clamp(0, t - window)
        grabbed = extended[row[:, None], start[:, None] + torch.arange(n_left + window)].to(torch.int32)
        new_values = acts[row[:, None], start[:, None] + torch.arange(window), feat[:, None]]
        old = top.clamp(max=k - 1)[..., None]  # a kept window moves to its new rank; new ones are written below
        tokens = torch.gather(self.tokens, 1, old.expand(-1, -1, window))
        left = torch.gather(self.left, 1, old.expand(-1, -1, n_left))
        vals = torch.gather(self.values, 1, old.expand(-1, -1, window))
        tokens[feat, slot], left[feat, slot], vals[feat, slot] = grabbed[:, n_left:], grabbed[:, :n_left], new_values
        self.tokens, self.left, self.values = tokens, left, vals
        self.key = torch.gather(values, 1, top)


class ExampleCollector:
    """Streams (token ids, feature activations) batches and keeps, per feature, the `top_k` contexts with the
    highest peak activation (a `window` of tokens around the peak), `sampled` contexts drawn uniformly from all
    those where it fires (activations across its whole range, for scorers; delphi samples them by quantile),
    and `n_random` contexts from a fixed pool of random windows in which the feature never fires. Each window
    keeps the `left` tokens before it, so that its text can be decoded whole (`finish`)."""

    def __init__(
        self,
        d_sae: int,
        top_k: int = 10,
        window: int = 24,
        n_random: int = 10,
        pool_size: int = 256,
        seed: int = 0,
        left: int = LEFT_CONTEXT,
        sampled: int = 0,
    ) -> None:
        self.d_sae, self.top_k, self.window, self.n_random, self.pool_size = d_sae, top_k, window, n_random, pool_size
        self.left, self.sampled = left, sampled
        self._g = torch.Generator().manual_seed(seed)
        self.top = _Slots(d_sae, top_k, window, left)  # keyed by peak activation
        self.sample = _Slots(d_sae, sampled, window, left)  # keyed by a random priority: a uniform sample
        self.fires = torch.zeros(d_sae)
        self.n_tokens = 0
        self.pool_tokens: list[torch.Tensor] = []
        self.pool_left: list[torch.Tensor] = []
        self.pool_fires: list[torch.Tensor] = []  # [d_sae] bool per pool window

    def settings(self) -> dict[str, int]:
        return {
            "d_sae": self.d_sae, "top_k": self.top_k, "window": self.window, "n_random": self.n_random,
            "pool_size": self.pool_size, "left": self.left, **({"sampled": self.sampled} if self.sampled else {}),
        }  # fmt: skip

    @property
    def best(self) -> torch.Tensor:
        """[d_sae, top_k] the peak activation of each kept top context (0: none yet)."""
        return self.top.key

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
        self.top.keep(peak, where, extended, acts)
        if self.sampled:  # a random priority in (0, 1] for each row where the feature fires
            priority = 1 - torch.rand(peak.shape, generator=self._g)
            self.sample.keep(priority * (peak > 0), where, extended, acts)

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

        slots = {"top": self.top, "sample": self.sample} if self.sampled else {"top": self.top}
        return {
            "best": self.top.key,
            **{f"{name}_{part}": getattr(kept, part) for name, kept in slots.items() for part in _PARTS},
            **({"sample_key": self.sample.key} if self.sampled else {}),
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
        for name, kept, n in (("top", self.top, k), ("sample", self.sample, self.sampled)):
            if name == "sample" and not n:
                continue
            kept.key = take(path, tensors, "best" if name == "top" else "sample_key", (f, n), torch.float32, fix)
            kept.tokens = take(path, tensors, f"{name}_tokens", (f, n, w), i32, fix)
            kept.left = take(path, tensors, f"{name}_left", (f, n, left), i32, fix)
            kept.values = take(path, tensors, f"{name}_values", (f, n, w), torch.float32, fix)
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
            "top_tokens": self.top.tokens,
            "top_values": self.top.values.half(),
            "pool_tokens": pool,
            "random_index": random_index,
        }
        if self.sampled:
            tensors["sample_tokens"], tensors["sample_values"] = self.sample.tokens, self.sample.values.half()
        ids = torch.unique(torch.cat([self.top.tokens.flatten(), self.sample.tokens.flatten(), pool.flatten()]))
        ids = ids.tolist()
        vocab = {int(i): decode(int(i)) for i in ids}
        pieces: list[str] = []
        if decode_text is not None:
            windows = {
                name: (kept.tokens.reshape(-1, self.window), kept.left.reshape(-1, self.left), kept.key.flatten() > 0)
                for name, kept in (("top", self.top), ("sample", self.sample))
                if kept.key.numel()
            }  # the kept contexts a reader shows, and the pool
            windows["pool"] = (pool, torch.stack(self.pool_left), torch.ones(len(pool), dtype=torch.bool))
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
