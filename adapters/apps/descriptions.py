"""Descriptions of SAE latents written once by an explainer model (auto-interp: autointerp.py) and kept in a
JSONL file: the teacher labels of description adapters (`train-adapter --latent-labels descriptions`).

The file is a header line naming what its descriptions depend on (the SAE's identity, the explainer
model, a hash of the explainer's prompt and settings), then one {"feature", "description"} line per latent,
appended and flushed batch by batch: labelling thousands of latents with a 1.5B model takes hours on a
CPU, so a run resumes where it stopped, and a line cut short by a crash is dropped when read. A file
whose header names another SAE, explainer or prompt is refused, never mixed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sae_selfexplain_plugin.activation_examples import ActivationExamples
from sae_selfexplain_plugin.backend import Backend
from sae_selfexplain_plugin.errors import InputError
from sae_selfexplain_plugin.files import capped_lines, parse_json
from sae_selfexplain_plugin.identity import check_same_sae

from . import autointerp

FORMAT = "sae-selfexplain descriptions"


def descriptions_header(sae: dict[str, Any], explainer: str) -> dict[str, Any]:
    """The header of a descriptions file: the SAE (an identity, sae_lens.sae_identity), the explainer's model
    id, and a hash of what else decides its text (autointerp's prompt and settings)."""
    prompt = json.dumps(
        [autointerp.INSTRUCTION, autointerp.BASE_SUFFIX, autointerp.N_CONTEXTS, autointerp.MAX_NEW_TOKENS]
    )
    return {
        "format": FORMAT,
        "sae": sae,
        "explainer": explainer,
        "prompt_sha256": hashlib.sha256(prompt.encode()).hexdigest()[:16],
        "split": "explain",  # the explainer reads only what labellers may read
    }


def read_descriptions(
    path: str | Path, *, header: dict[str, Any] | None = None, sae: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[int, str]]:
    """(header, feature -> description) of the file at `path`, refused unless it was written with `header`
    (every field) or, given `sae` only, for that SAE; a last line cut short by a crash is dropped."""
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        lines = list(capped_lines(f, str(path)))
    fix = "pass a file `sae-selfexplain describe` wrote for this SAE, or describe again."
    found = parse_json(lines[0][1], f"{path} line 1") if lines else None
    if not isinstance(found, dict) or found.get("format") != FORMAT:
        raise InputError(f"{path} is not a descriptions file (its first line is not our header); {fix}")
    wanted_sae = header["sae"] if header is not None else sae
    if wanted_sae is not None:
        check_same_sae(wanted_sae, found.get("sae") or {}, f"the descriptions {path}", fix)
    for key in ("explainer", "prompt_sha256", "split"):
        if header is not None and found.get(key) != header[key]:
            raise InputError(f"{path} was written with {key} {found.get(key)!r}, not this run's {header[key]!r}; {fix}")
    out: dict[int, str] = {}
    for n, text in lines[1:]:
        if not text.endswith("\n"):
            break  # the run stopped mid-line: that latent is described again on resume
        row = parse_json(text, f"{path} line {n}")
        feature, description = (row.get("feature"), row.get("description")) if isinstance(row, dict) else (None, None)
        if not isinstance(feature, int) or not isinstance(description, str):
            raise InputError(f'{path} line {n}: expected {{"feature": int, "description": str}}; {fix}')
        out[feature] = description
    return found, out


def describe_latents(
    backend: Backend,
    examples: ActivationExamples,
    latents: Sequence[int],
    path: str | Path,
    header: dict[str, Any],
    *,
    resume: bool = False,
    batch_size: int = 4,
    progress: Callable[[int], None] | None = None,
) -> dict[int, str]:
    """Describe `latents` from their explain-split contexts (autointerp.autointerp_labels) into `path`, a batch
    at a time; with `resume`, the latents already in `path` are kept and skipped. Returns all of `path`'s."""
    path = Path(path)
    done = read_descriptions(path, header=header)[1] if resume and path.is_file() else {}
    if not resume and path.exists():
        raise InputError(f"{path} exists: pass --resume to continue it, or choose another --out.")
    todo = [f for f in latents if f not in done]
    if progress is not None and len(todo) < len(latents):
        progress(len(latents) - len(todo))
    if not done:
        path.parent.mkdir(parents=True, exist_ok=True)
        _truncate_to_header(path, header)
    else:
        _drop_cut_line(path)
    with path.open("a", encoding="utf-8") as f:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            texts = autointerp.autointerp_labels(backend, examples, chunk, batch_size=batch_size)
            for feature, text in zip(chunk, texts):
                f.write(json.dumps({"feature": feature, "description": text}) + "\n")
                done[feature] = text
            f.flush()
            os.fsync(f.fileno())  # a batch written is a batch kept
            if progress is not None:
                progress(len(chunk))
    return done


def _truncate_to_header(path: Path, header: dict[str, Any]) -> None:
    path.write_text(json.dumps(header) + "\n", encoding="utf-8")


def _drop_cut_line(path: Path) -> None:
    """Cut the file after its last complete line (a crash may have left half of one)."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


_LIST_ITEM = re.compile(r"^\W*\w+(?:[\s'-]\w+)?\W*$")


def is_token_list(text: str) -> bool:
    """A label that lists tokens rather than describing ("database, db, sqlite, SQL"; ",, ,, ,,"): three or
    more comma-separated items of at most two words each, or nothing but punctuation."""
    if not re.search(r"\w", text):
        return bool(text.strip())
    items = [item.strip() for item in text.split(",")]
    return len(items) >= 3 and all(not item or _LIST_ITEM.match(item) for item in items)


def usable_description(text: str) -> bool:
    """A teacher label worth training on: some words, not a token list."""
    return len(re.findall(r"\w+", text)) >= 2 and not is_token_list(text)
