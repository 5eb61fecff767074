"""Files: atomic output (write a temporary file beside the target, then rename it into place: a crash or
a full disk mid-write leaves the previous file, or none, never a truncated one), output paths that stay
inside their folder, and strict JSON reading.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from .errors import InputError, SelfExplainError


class OutputError(SelfExplainError, OSError):
    """An output file could not be written; nothing partial was left behind."""


@contextmanager
def atomic_writer(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file for writing; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise OutputError(f"cannot write {path} ({e}); choose a writable output path.") from e
    try:
        f: IO[Any] = os.fdopen(fd, mode) if "b" in mode else os.fdopen(fd, mode, encoding="utf-8")
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"writing {path} failed ({e}); the previous file, if any, is unchanged.") from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (only finite numbers are)")


def parse_json(text: str, where: str) -> Any:
    """Strict JSON: NaN and Infinity (which Python writes and reads by default) are refused, and so is
    nesting too deep to parse; InputError naming `where` otherwise."""
    try:
        return json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: malformed or truncated JSON at character {e.pos}: {e.msg}.") from e
    except ValueError as e:
        raise InputError(f"{where}: {e}; repair or regenerate the file.") from e
    except RecursionError:
        raise InputError(f"{where}: JSON nested too deeply to read; this is not a file we wrote.") from None


def to_json(doc: Any) -> str:
    """Strict JSON text: a NaN or an infinity is an error here, never a bare `NaN` in a file."""
    try:
        return json.dumps(doc, ensure_ascii=False, allow_nan=False)
    except ValueError as e:
        raise SelfExplainError(f"refusing to write a non-finite number ({e}); this is a bug, please report it.") from e


_SAFE_COMPONENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+=-]{0,199}$")


def safe_component(name: str, what: str) -> str:
    """`name` as one path component inside an output folder: letters, digits and ._@+=- (no separators,
    no leading dot, so no `..` and no absolute path); InputError naming `what` otherwise."""
    if not _SAFE_COMPONENT.match(name) or name.endswith("."):
        raise InputError(
            f"{what} {name!r} cannot be a folder name inside the output: use letters, digits and . _ - "
            "(no '/', no '..', no leading dot)."
        )
    return name


def inside(root: str | Path, *parts: str) -> Path:
    """root/parts..., refusing any result that is not inside `root` (a last check behind safe_component)."""
    base = Path(root).resolve()
    path = base.joinpath(*parts).resolve()
    if path != base and base not in path.parents:
        raise InputError(f"refusing to write {path}: it is outside the output folder {base}.")
    return path


def check_writable(path: str | Path, flag: str) -> Path:
    """Fail now, before a long run, if `path` cannot be written (the run's results would be lost)."""
    path = Path(path)
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if (
        path.is_dir()
        or not parent.is_dir()
        or not os.access(parent, os.W_OK)
        or (path.exists() and not os.access(path, os.W_OK))
    ):
        raise OutputError(f"{flag} {path} cannot be written; choose a writable file path before the run starts.")
    return path
