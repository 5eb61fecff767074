"""Top-activating contexts for any SAE: stream a corpus through the model, encode the residual with the SAE,
keep each feature's strongest contexts, random non-activating ones and its firing density
(`activation_examples.ExampleCollector`), and save them as an activation-examples file.

The corpus is a text file (documents separated by blank lines), a folder of such files, or a JSONL file
of texts (`"text"` fields, or bare strings). The run is resumable: every `checkpoint_rows` rows the
collector's state and the number of rows done are saved beside the output (`OUT.partial`); `resume=True`
continues from there, skipping the rows already seen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sae_selfexplain_plugin.activation_examples import ActivationExamples, ExampleCollector
from sae_selfexplain_plugin.backend import Backend
from sae_selfexplain_plugin.errors import InputError
from sae_selfexplain_plugin.files import atomic_writer, parse_json

if TYPE_CHECKING:  # sae_lens is slow to import: only the collecting itself needs it
    from sae_lens import SAE

DEFAULT_CONTEXT = 64  # tokens per row (the example window is 24)
DEFAULT_TOKENS = 200_000


def corpus_texts(spec: str | Path) -> Iterator[str]:
    """The documents of a corpus: a text file (blank-line separated), a folder of .txt files, or a JSONL file."""
    path = Path(spec)
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise InputError(f"--corpus {path} holds no .txt files.")
        for file in files:
            yield from corpus_texts(file)
        return
    if not path.is_file():
        raise InputError(f"--corpus {path} does not exist; pass a text file, a folder of .txt files or a JSONL file.")
    try:
        with path.open(encoding="utf-8") as f:
            if path.suffix == ".jsonl":
                for n, line in enumerate(f, start=1):
                    if line.strip():
                        doc = parse_json(line, f"{path} line {n}")
                        text = doc.get("text") if isinstance(doc, dict) else doc
                        if not isinstance(text, str):
                            raise InputError(f"{path} line {n}: expected a string or an object with a 'text' string.")
                        yield text
            else:
                yield from (d for d in f.read().split("\n\n") if d.strip())
    except UnicodeDecodeError as e:
        raise InputError(f"--corpus {path} is not UTF-8 text ({e}).") from None


def token_rows(texts: Iterator[str], tokenizer: Any, context: int, bos: int | None) -> Iterator[torch.Tensor]:
    """Rows of `context` token ids packed from consecutive documents, each row starting with BOS (when the
    SAE saw text that way) so that no row starts mid-attention-sink."""
    body = context - (bos is not None)
    buffer: list[int] = []
    for text in texts:
        buffer += tokenizer(text, add_special_tokens=False)["input_ids"]
        while len(buffer) >= body:
            row, buffer = buffer[:body], buffer[body:]
            yield torch.tensor(([bos] if bos is not None else []) + row)


def collect_contexts(
    sae: SAE[Any],
    backend: Backend,
    texts: Iterator[str],
    out: str | Path,
    *,
    max_tokens: int = DEFAULT_TOKENS,
    context: int = DEFAULT_CONTEXT,
    batch_size: int = 8,
    checkpoint_rows: int = 256,
    resume: bool = False,
    progress: Callable[[int], None] | None = None,
) -> ActivationExamples:
    """Stream `texts` (up to `max_tokens` tokens) and save each feature's activation examples to `out`."""
    from .sae_lens import readable_input_layer, sae_prepends_bos

    layer = readable_input_layer(sae, backend, "collecting activation examples")
    tok = backend.tokenizer
    bos = tok.bos_token_id if sae_prepends_bos(sae) else None
    skip = 1 if bos is not None else 0
    partial = Path(f"{out}.partial")
    collector = ExampleCollector(sae.cfg.d_sae)
    done = 0
    if resume and partial.exists():
        state = torch.load(partial, weights_only=False)
        collector.__dict__.update(state["collector"])
        collector._g.set_state(state["generator"])
        done = int(state["rows"])
    rows = token_rows(texts, tok, context, bos)
    wanted = max(1, max_tokens // context)
    seen, batch = 0, []
    for row in rows:
        if seen >= wanted:
            break
        seen += 1
        if seen <= done:  # resuming: these rows are in the checkpoint
            continue
        batch.append(row)
        if len(batch) == batch_size or seen == wanted:
            _add(collector, sae, backend, torch.stack(batch), layer, skip)
            if progress is not None:
                progress(len(batch) * context)
            batch = []
            if seen // checkpoint_rows > (seen - batch_size) // checkpoint_rows:
                _checkpoint(partial, collector, seen)
    if batch:
        _add(collector, sae, backend, torch.stack(batch), layer, skip)
        if progress is not None:
            progress(len(batch) * context)
    if seen == 0 or not collector.pool_tokens:
        raise InputError(f"the corpus has fewer than {context} tokens: too short for one row of context.")
    examples = collector.finish(lambda i: tok.decode([i]))
    examples.save(out)
    partial.unlink(missing_ok=True)
    return examples


@torch.no_grad()
def _add(
    collector: ExampleCollector, sae: SAE[Any], backend: Backend, ids: torch.Tensor, layer: int, skip: int
) -> None:
    from .sae_lens import encode_residual

    resid = backend.residual(ids, torch.ones_like(ids), layer)[:, skip:]
    acts = encode_residual(sae, resid).float().cpu()
    collector.add(ids[:, skip:], acts)


def _checkpoint(partial: Path, collector: ExampleCollector, rows: int) -> None:
    state = {k: v for k, v in collector.__dict__.items() if k != "_g"}
    with atomic_writer(partial, "wb") as f:
        torch.save({"collector": state, "generator": collector._g.get_state(), "rows": rows}, f)


def examples_beside(results: str | Path) -> Path:
    """Where `explain` stores the activation examples of a run: beside its results file."""
    return Path(results).with_suffix(".examples.safetensors")
