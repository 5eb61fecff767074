"""Files: atomic output (write a temporary file beside the target, then rename it into place: a crash or
a full disk mid-write leaves the previous file, or none, never a truncated one), outputs that never replace
an input, output paths that stay inside their folder, and strict JSON reading with a cap on line length.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import tempfile
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from .errors import InputError, SelfExplainError


class OutputError(SelfExplainError, OSError):
    """An output file could not be written; nothing partial was left behind."""


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` for the caller to write (by any means: a file, an SQLite database); on
    success it is synced and replaces `path`, on error it is removed. As a shell redirection would: a symlink
    at `path` is written through (the link stays, its target gets the new content), an existing file keeps
    its permission bits, and a new file gets the umask's."""
    path = Path(path)
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    try:
        mode_bits = stat.S_IMODE(path.stat().st_mode) if path.is_file() else 0o666 & ~_umask()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, mode_bits)  # mkstemp makes 0600
        os.close(fd)
    except OSError as e:
        raise OutputError(f"cannot write {path} ({e}); choose a writable output path.") from e
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as synced:
            os.fsync(synced.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"writing {path} failed ({e}); the previous file, if any, is unchanged.") from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_writer(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file for writing; on success it replaces `path`, on error it is removed (`atomic_path`:
    symlinks and permission bits as a shell redirection would treat them)."""
    with atomic_path(path) as tmp:
        f: IO[Any] = open(tmp, mode) if "b" in mode else open(tmp, mode, encoding="utf-8")  # noqa: SIM115
        with f:
            yield f
            f.flush()


_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process's umask (Python can only read it by setting it, so set it back at once, under a lock)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (only finite numbers are)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400: Python reads it as inf
        raise ValueError(f"{text[:40]} is outside the range of a float (only finite numbers are JSON)")
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > 20:  # past any count or index we write; Python's own limit says to call a setter
        raise ValueError(f"an integer of {len(text.lstrip('-'))} digits is no number we write")
    return int(text)


def parse_json(text: str, where: str) -> Any:
    """Strict JSON: NaN and Infinity (which Python writes and reads by default) are refused, and so are numbers
    out of a float's range (1e400), integers of more than 20 digits and nesting too deep to parse;
    InputError naming `where` otherwise."""
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite_float, parse_int=_bounded_int)
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
    """root/parts..., refusing a result outside `root` and a symbolic link at any component below `root`, the
    final file included (checked with lstat, never followed: a link planted inside the output folder would carry
    the write elsewhere). `root` itself may be a link the user chose. Call it for every final path."""
    base = Path(root).resolve()
    path = base
    for part in Path(*parts).parts if parts else ():
        path = path / part
        if path.is_symlink():
            raise InputError(
                f"refusing to write through the symbolic link {path} inside the output folder {base} (it could "
                "send the files elsewhere); remove the link or choose another --out."
            )
    resolved = path.resolve()  # with no link below `base`, only '..' can still move it
    if resolved != base and base not in resolved.parents:
        raise InputError(f"refusing to write {resolved}: it is outside the output folder {base}.")
    return resolved


def check_writable(path: str | Path, flag: str, inputs: dict[str, str | Path | None] | None = None) -> Path:
    """Fail now, before a long run, if `path` cannot be written (the run's results would be lost), or if it
    is one of the command's `inputs` ({what: path}; see `refuse_input`)."""
    path = Path(path)
    refuse_input(path, flag, inputs or {})
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


def refuse_input(out: str | Path, flag: str, inputs: dict[str, str | Path | None]) -> None:
    """InputError when the output `out` is the same file as an input ({what: path}; a folder input stands
    for the files directly in it): writing it would destroy what the command reads. Compares the files
    themselves (os.path.samefile: hard links and symlinks included), or the resolved paths of a file that does
    not exist yet."""
    target = Path(out)
    for what, given in inputs.items():
        if given is None:
            continue
        for candidate in _files_of(Path(given)):
            if _same_file(target, candidate):
                raise InputError(
                    f"{flag} {out} is the same file as {what} {candidate}: writing it would destroy that input; "
                    f"choose another {flag}."
                )


def _files_of(path: Path) -> Iterable[Path]:
    if path.is_dir():
        return [p for p in path.iterdir() if p.is_file()]
    return [path]


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
        return Path(os.path.realpath(a)) == Path(os.path.realpath(b))
    except OSError:
        return False


MAX_LINE_CHARS = 32 * 1024 * 1024  # a results record with activations is kilobytes; a line past this is not ours


def capped_lines(f: IO[str], where: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of a text file, refusing a line longer than MAX_LINE_CHARS before it is in memory
    whole (a file of one 3 GB line would otherwise exhaust memory)."""
    n = 0
    while text := f.readline(MAX_LINE_CHARS + 1):
        n += 1
        if len(text.rstrip("\r\n")) > MAX_LINE_CHARS:
            raise InputError(
                f"{where} line {n} is longer than {MAX_LINE_CHARS:,} characters, the most a line may hold; "
                "this is not a file we wrote (one JSON document a line)."
            )
        yield n, text
