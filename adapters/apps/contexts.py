"""Top-activating contexts for any SAE: stream a corpus through the model, encode the residual with the SAE,
keep each feature's strongest contexts, random non-activating ones and its firing density
(`example_collector.ExampleCollector`), and save them as an activation-examples file.

The corpus is a text file (documents separated by blank lines), a folder of such files, or a JSONL file
of texts (`"text"` fields, or bare strings). The run is resumable: every `checkpoint_rows` rows the
collector's state and the number of rows done are saved beside the output (`OUT.partial`, safetensors with
JSON: the SAE, settings and a hash of the rows read, all checked); `resume=True` continues from there,
skipping the rows already seen.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sae_selfexplain_plugin.activation_examples import ActivationExamples, score_split_of, score_split_path
from sae_selfexplain_plugin.backend import Backend
from sae_selfexplain_plugin.checkpoint import check_fields, load_checkpoint, save_checkpoint
from sae_selfexplain_plugin.errors import InputError
from sae_selfexplain_plugin.example_collector import ExampleCollector
from sae_selfexplain_plugin.files import capped_lines, parse_json
from sae_selfexplain_plugin.identity import sae_name

if TYPE_CHECKING:  # sae_lens is slow to import: only the collecting itself needs it
    from sae_lens import SAE

DEFAULT_CONTEXT = 64  # tokens per row (the example window is 24)
DEFAULT_TOKENS = 200_000  # per split
# The score split keeps enough per feature for stable scores: 20 firing contexts, the 10 strongest and 10 sampled
# (activations across the feature's range, as delphi samples by quantile), against 20 where it never fires.
SCORE_COLLECTOR = {"top_k": 10, "sampled": 10, "n_random": 20, "pool_size": 512}


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
                for n, line in capped_lines(f, f"--corpus {path}"):
                    if line.strip():
                        doc = parse_json(line, f"{path} line {n}")
                        text = doc.get("text") if isinstance(doc, dict) else doc
                        if not isinstance(text, str):
                            raise InputError(f"{path} line {n}: expected a string or an object with a 'text' string.")
                        yield text
            else:  # streamed: a corpus may be far larger than memory, and no line may pass the cap
                document: list[str] = []
                for _, line in capped_lines(f, f"--corpus {path}"):
                    if line.strip():
                        document.append(line)
                    elif document:
                        yield "".join(document).rstrip("\n")
                        document = []
                if document:
                    yield "".join(document).rstrip("\n")
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
    score: bool = False,
) -> ActivationExamples:
    """Stream `texts` (up to `max_tokens` tokens) and save each feature's activation examples to `out`; with
    `score`, as a score split: more contexts per feature (SCORE_COLLECTOR), sampled ones among them."""
    from ..sae_lens import readable_input_layer, sae_identity, sae_prepends_bos

    layer = readable_input_layer(sae, backend, "collecting activation examples")
    tok = backend.tokenizer
    bos = tok.bos_token_id if sae_prepends_bos(sae) else None
    skip = 1 if bos is not None else 0
    partial = Path(f"{out}.partial")
    collector = ExampleCollector(sae.cfg.d_sae, **(SCORE_COLLECTOR if score else {}))
    wanted = max(1, max_tokens // context)
    # what a checkpoint must have been made from to be continued (the corpus is checked by its rows, below)
    run = {
        "sae": sae_identity(sae),
        "settings": {"model": backend.model_id, "context": context, "bos": bos, "collector": collector.settings()},
    }
    done, corpus_hash = _resume(partial, collector, run, wanted, context) if resume and partial.exists() else (0, "")
    corpus = hashlib.sha256()  # of every row read, so that a resume can check it reads the same corpus
    seen, batch, before, previous = 0, [], [], torch.zeros(0, dtype=torch.long)
    for row in token_rows(texts, tok, context, bos):
        if seen >= wanted:
            break
        seen += 1
        corpus.update(row.to(torch.int64).numpy().tobytes())
        body_before, previous = previous[-collector.left :], row[skip:]
        if seen <= done:  # resuming: these rows are in the checkpoint
            if seen == done and corpus.hexdigest() != corpus_hash:
                raise InputError(
                    f"{partial}: field 'corpus_rows_sha256' does not match the first {done} rows of this corpus: "
                    f"the checkpoint was made from other text; {_fix(partial)}"
                )
            continue
        batch.append(row)
        before.append(body_before)
        if len(batch) == batch_size or seen == wanted:
            _add(collector, sae, backend, torch.stack(batch), _left_padded(before, collector.left), layer, skip)
            if progress is not None:
                progress(len(batch) * context)
            batch, before = [], []
            if seen // checkpoint_rows > (seen - batch_size) // checkpoint_rows:
                _checkpoint(partial, collector, {**run, "rows": seen, "corpus_rows_sha256": corpus.hexdigest()})
    if batch:
        _add(collector, sae, backend, torch.stack(batch), _left_padded(before, collector.left), layer, skip)
        if progress is not None:
            progress(len(batch) * context)
    if seen < done:
        raise InputError(
            f"{partial}: field 'rows' is {done} (rows of {context} tokens already read), but this corpus gives only "
            f"{seen}: the checkpoint was made from other text; {_fix(partial)}"
        )
    if seen == 0 or not collector.pool_tokens:
        raise InputError(f"the corpus has fewer than {context} tokens: too short for one row of context.")
    examples = finished_examples(collector, tok, run["sae"])
    examples.save(out)
    partial.unlink(missing_ok=True)
    return examples


def collect_split_contexts(
    sae: SAE[Any],
    backend: Backend,
    corpus: Callable[[], Iterator[str]],
    out: str | Path,
    **options: Any,
) -> tuple[ActivationExamples, ActivationExamples]:
    """The explain split at `out` and the score split beside it (`score_split_path`), each from its own
    documents of `corpus()` (`score_split_of`: by each document's text) and up to `max_tokens` tokens each:
    (explain, score). `options` are collect_contexts's; each split resumes on its own."""
    explain = collect_contexts(sae, backend, (d for d in corpus() if not score_split_of(d)), out, **options)
    score_out = score_split_path(out)
    score = collect_contexts(sae, backend, (d for d in corpus() if score_split_of(d)), score_out, score=True, **options)
    return explain, score


def finished_examples(collector: ExampleCollector, tokenizer: Any, sae: dict[str, Any]) -> ActivationExamples:
    """The collected examples of the SAE `sae` (an identity, `sae_lens.sae_identity`), with each window's
    tokens decoded as the text they cover (multi-byte characters whole)."""
    return collector.finish(
        lambda i: tokenizer.decode([i], clean_up_tokenization_spaces=False),
        lambda ids: tokenizer.decode(ids, clean_up_tokenization_spaces=False),
    ).with_sae(sae)


def _fix(partial: Path) -> str:
    return f"delete {partial} or rerun without --resume to start over."


def _resume(
    partial: Path, collector: ExampleCollector, run: dict[str, Any], wanted: int, context: int
) -> tuple[int, str]:
    """Load checkpoint `partial` into `collector` after checking it was made by this run: (rows done, hash of
    their tokens)."""
    fix = _fix(partial)
    tensors, info = load_checkpoint(partial, "contexts", fix)
    saved_sae = info.get("sae")
    if not isinstance(saved_sae, dict) or saved_sae.get("fingerprint") != run["sae"]["fingerprint"]:
        name = sae_name(saved_sae) if isinstance(saved_sae, dict) else repr(saved_sae)
        raise InputError(f"{partial}: field 'sae' is {name}, not this run's {sae_name(run['sae'])}; {fix}")
    check_fields(partial, "sae.d_sae", saved_sae.get("d_sae"), run["sae"]["d_sae"], fix)
    check_fields(partial, "settings", info.get("settings"), run["settings"], fix)
    rows, n_tokens, corpus_hash = info.get("rows"), info.get("n_tokens"), info.get("corpus_rows_sha256")
    for field, value in (("rows", rows), ("n_tokens", n_tokens)):
        if type(value) is not int or value < 0:
            raise InputError(f"{partial}: field {field!r} must be a whole number, got {value!r}; {fix}")
    if not isinstance(corpus_hash, str):
        raise InputError(f"{partial}: field 'corpus_rows_sha256' is missing; {fix}")
    assert isinstance(rows, int) and isinstance(n_tokens, int)
    if rows > wanted:
        raise InputError(
            f"{partial}: field 'rows' is {rows}: the checkpoint has read {rows * context:,} tokens, more than this "
            f"run's {wanted * context:,} (--tokens); pass --tokens {rows * context} or more to continue it, or "
            f"{fix}"
        )
    collector.restore(tensors, n_tokens, partial, fix)
    return rows, corpus_hash


def _left_padded(before: list[torch.Tensor], n: int) -> torch.Tensor:
    """[B, n] ids of the tokens before each row, -1 where the text has none."""
    out = torch.full((len(before), n), -1, dtype=torch.long)
    for r, ids in enumerate(before):
        if len(ids):
            out[r, n - len(ids) :] = ids
    return out


@torch.no_grad()
def _add(
    collector: ExampleCollector,
    sae: SAE[Any],
    backend: Backend,
    ids: torch.Tensor,
    before: torch.Tensor,
    layer: int,
    skip: int,
) -> None:
    from ..sae_lens import encode_residual

    resid = backend.residual(ids, torch.ones_like(ids), layer)[:, skip:]
    acts = encode_residual(sae, resid).float().cpu()
    collector.add(ids[:, skip:], acts, before)


def _checkpoint(partial: Path, collector: ExampleCollector, info: dict[str, Any]) -> None:
    save_checkpoint(partial, "contexts", collector.state(), {**info, "n_tokens": collector.n_tokens})


def examples_beside(results: str | Path) -> Path:
    """Where `explain` stores the activation examples of a run: beside its results file."""
    return Path(results).with_suffix(".examples.safetensors")
