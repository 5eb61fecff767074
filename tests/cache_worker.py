"""A fake embedded model for cache tests: converts in ~0.5 s to a tiny GPT-2 and counts its builds.

Lives in its own module so that processes started with `spawn` can import it.
"""

from __future__ import annotations

import time
from pathlib import Path

from sae_selfexplain_plugin.adapters.backends.embedded import EmbeddedModel, ensure_cached


class CountingModel(EmbeddedModel):
    def convert(self, workdir: Path, out: Path) -> None:
        from conftest import build_tokenizer, tiny_gpt2

        log = Path(self.install_hint)  # the test passes a log file path here
        with log.open("a") as f:
            f.write("build\n")
        tok = build_tokenizer()
        time.sleep(0.5)  # widen the race window
        tiny_gpt2(len(tok)).save_pretrained(out)
        tok.save_pretrained(out)


def fake_spec(log: Path) -> CountingModel:
    return CountingModel(
        name="fake", hf_id="fake/tiny", package="none", install_hint=str(log), chat=False,
        locate_gguf=lambda d: d, cache_key="fake-tiny", n_layers=2,
    )  # fmt: skip


def build_in_child(root: str, log: str, results: str) -> None:
    folder = ensure_cached(fake_spec(Path(log)), Path(root))
    with open(results, "a") as f:
        f.write(str(folder) + "\n")
