"""The Neuronpedia API key: read from the environment, checked before any use, and kept out of every message
(`redact_api_key`), whatever form a server or a bug quotes it in."""

from __future__ import annotations

import contextlib
import json
import os
import re
import urllib.parse

from sae_selfexplain_plugin.errors import SelfExplainError

API_KEY_ENV = "NEURONPEDIA_API_KEY"


class UploadError(SelfExplainError, RuntimeError):
    """Neuronpedia refused or never accepted a batch; the ledger holds only the batches that succeeded."""


def api_key_from_env() -> str:
    key = os.environ.get(API_KEY_ENV, "").strip()
    if not key:
        raise UploadError(f"no API key: set {API_KEY_ENV} (Neuronpedia > account > API key).")
    return check_api_key(key)


MAX_KEY_CHARS = 256


def check_api_key(key: str) -> str:
    """The key, if it can travel in a header: printable ASCII, no spaces. Checked before any use, since
    http.client's own refusal of a line break quotes the whole value, and the error never shows the key."""
    if len(key) > MAX_KEY_CHARS:  # a server answers a header this long with a page of HTML, not a reason
        raise UploadError(
            f"the API key ({API_KEY_ENV}) is {len(key):,} characters long, more than any key ({MAX_KEY_CHARS}); "
            "copy it again from Neuronpedia > Settings, with nothing around it."
        )
    for position, char in enumerate(key, 1):
        if not "!" <= char <= "~":
            kind = (
                "a line break" if char in "\r\n"
                else "a space or control character" if char.isascii()
                else "a non-ASCII character"
            )  # fmt: skip
            raise UploadError(
                f"the API key ({API_KEY_ENV}) holds {kind} at position {position}; a key is printable ASCII with "
                "no spaces: copy it again from Neuronpedia > Settings, with nothing around it."
            )
    return key


def secret_forms(secret: str) -> list[str]:
    """Every way `secret` can show up in a message, longest first: as is, stripped, escaped as in a str,
    bytes or JSON repr (http.client quotes a header as bytes; JSON may escape "/" as "\\/"), URL-encoded,
    and each piece between its whitespace or control characters (a message may split the value there). Not
    forms under 4 characters: replacing every "k" of a message garbles it and hides nothing."""
    forms = {secret, secret.strip(), repr(secret)[1:-1], json.dumps(secret)[1:-1]}
    forms |= {f.replace("/", "\\/") for f in set(forms)}
    forms |= {urllib.parse.quote(secret, safe=""), urllib.parse.quote(secret), urllib.parse.quote_plus(secret)}
    for encoding in ("utf-8", "latin-1"):
        with contextlib.suppress(UnicodeEncodeError):  # a lone surrogate, or beyond latin-1
            forms.add(repr(secret.encode(encoding))[2:-1])
    forms.update(re.split(r"[\s\x00-\x1f\x7f]+", secret))
    return sorted((f for f in forms if len(f) >= 4), key=len, reverse=True)


PIECE = 6  # a run this long of any form of the key is redacted too: a server may quote a prefix or a cut key


def redact_api_key(text: str, key: str | None = None) -> str:
    """`text` with every form of the API key (`key`, else NEURONPEDIA_API_KEY's raw value) replaced by ***, and
    every run of PIECE or more characters taken from one of those forms (a prefix, a cut key). Redact before
    cutting a message short, or a cut key's prefix survives."""
    forms = secret_forms(os.environ.get(API_KEY_ENV, "") if key is None else key)
    for form in forms:
        text = text.replace(form, "***")
    pieces = {f[i : i + PIECE] for f in forms for i in range(len(f) - PIECE + 1)}
    hidden = [False] * len(text)
    for i in range(len(text) - PIECE + 1):
        if text[i : i + PIECE] in pieces:
            hidden[i : i + PIECE] = [True] * PIECE
    out, i = [], 0
    while i < len(text):
        j = i
        while j < len(text) and hidden[j] == hidden[i]:
            j += 1
        out.append("***" if hidden[i] else text[i:j])
        i = j
    return "".join(out)
