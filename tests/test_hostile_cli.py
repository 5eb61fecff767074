"""Hostile input through the real CLI (a subprocess each): every case gets exit code 2 and a one-line
error naming the problem, no traceback, nothing written outside --out, and input files left byte-identical.

The cases are the ones a hostile run found (issue 17); each is one row of CASES."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import build_tokenizer, tiny_gemma
from fake_neuronpedia import FakeNeuronpedia
from loopback import LoopbackServer, send_json
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata
from sae_selfexplain_plugin.adapters.apps.demo_sae import DEMO_SAE_DIR
from sae_selfexplain_plugin.adapters.cli import main
from test_dashboard import page  # noqa: F401 (the Chromium page fixture)
from test_direction_adapter import rewrite_metadata
from test_upload import Flaky, Silent, leaks

from sae_selfexplain_plugin import AdapterMetadata, DirectionAdapter
from sae_selfexplain_plugin.activation_examples import EXAMPLES_FILE

KEY = "hostile-test-key-0123"
DEMO_EXAMPLES = DEMO_SAE_DIR / EXAMPLES_FILE
FAST = ["--template", "test-open", "--scales", "1,4", "--max-new-tokens", "3", "--batch-size", "4"]


def save_sae(
    folder: Path, hook: str = "blocks.2.hook_resid_pre", nan_rows: tuple[int, ...] = (), d_sae: int = 12
) -> Path:
    torch.manual_seed(0)
    meta = SAEMetadata(model_name="tiny-gemma3", hook_name=hook, neuronpedia_id="tiny-gemma3/2-test")
    sae = StandardSAE(StandardSAEConfig(d_in=64, d_sae=d_sae, metadata=meta))
    with torch.no_grad():
        sae.W_dec.copy_(torch.randn_like(sae.W_dec))
        for r in nan_rows:
            sae.W_dec[r] = float("nan")
    sae.save_model(folder)
    return folder


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny checkpoint, an SAE for it, and one run's results (JSONL and store)."""
    root = tmp_path_factory.mktemp("hostile")
    tok = build_tokenizer()
    tiny_gemma(len(tok)).save_pretrained(root / "tiny-gemma3")
    tok.save_pretrained(root / "tiny-gemma3")
    save_sae(root / "sae")
    args = ["explain", "--sae", str(root / "sae"), "--model", str(root / "tiny-gemma3"), "--features", "0-3"]
    assert main([*args, "--out", str(root / "results.jsonl"), *FAST]) == 0
    return root


def record_lines(assets: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (assets / "results.jsonl").read_text().splitlines()]


def write_records(path: Path, docs: list[Any]) -> None:
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))


def with_record_change(change: Callable[[dict[str, Any]], None]) -> Callable[[Path, Path], None]:
    def setup(case: Path, assets: Path) -> None:
        docs = record_lines(assets)
        change(docs[0])
        write_records(case / "in.jsonl", docs)

    return setup


def copy_store(change: str | None = None) -> Callable[[Path, Path], None]:
    def setup(case: Path, assets: Path) -> None:
        shutil.copy(assets / "results.db", case / "in.db")
        if change:
            with sqlite3.connect(case / "in.db") as db:
                db.execute(change)
            sqlite3.connect(case / "in.db").execute("PRAGMA wal_checkpoint(TRUNCATE)").close()

    return setup


def _sqlite(path: Path, *statements: str) -> None:
    with sqlite3.connect(path) as db:
        for statement in statements:
            db.execute(statement)
    sqlite3.connect(path).close()


def foreign_db(case: Path, assets: Path) -> None:
    _sqlite(case / "in.db", "CREATE TABLE users (name TEXT)", "INSERT INTO users VALUES ('alice')")


def plant_link(at: str, folder: bool = True) -> Callable[[Path, Path], None]:
    """A real symbolic link at {c}/out/v1/tiny-gemma3/2-test/`at`, to a folder or a file outside --out."""

    def setup(case: Path, assets: Path) -> None:
        link = case / "out" / "v1" / "tiny-gemma3" / "2-test" / at
        link.parent.mkdir(parents=True)
        target = case / "elsewhere"
        if folder:
            target.mkdir()
        else:
            target.write_bytes(b"not yours")
        link.symlink_to(target, target_is_directory=folder)

    return setup


def with_model(name: str) -> Callable[[Path, Path], None]:
    """Every record's model (the SAE's and the explaining one) renamed to `name`."""

    def setup(case: Path, assets: Path) -> None:
        docs = record_lines(assets)
        for d in docs:
            d["model_id"] = name
            d["sae"]["model_name"] = name
        write_records(case / "in.jsonl", docs)

    return setup


@dataclass
class Case:
    name: str
    argv: list[str]  # {a} = the shared assets folder, {c} = this case's folder; --out is {c}/out...
    error: str  # a regex the one error line must match
    setup: Callable[[Path, Path], None] | None = None
    code: int = 2
    env: dict[str, str] = field(default_factory=dict)
    # a subprocess where the process matters: variables read at import (HF_HUB_OFFLINE); else main() in-process,
    # which runs the same code as the console script without paying torch's import per row
    subprocess: bool = False


def explain(*extra: str, sae: str = "{a}/sae") -> list[str]:
    return ["explain", "--sae", sae, "--model", "{a}/tiny-gemma3", "--out", "{c}/out/r.jsonl", *FAST, *extra]


NP_FLAGS = ["--author-id", "u1", "--model-layers", "4"]
# an upload refused before it connects: a closed loopback port, the ledger under --out (outside the snapshot)
UPLOAD_NOWHERE = ["--host", "http://127.0.0.1:9", "--allow-http", "--source", "2-test", "--ledger", "{c}/out/l.db"]


def export_neuronpedia(*extra: str, results: str = "{a}/results.jsonl", out: str = "{c}/out") -> list[str]:
    return ["export", "--results", results, "--format", "neuronpedia", "--out", out, *NP_FLAGS, *extra]


CASES = [
    Case("sae-unknown-release", ["explain", "--sae", "foo:bar", "--out", "{c}/out/r.jsonl"], r"'foo' is not a release"),
    Case(
        "sae-registry-offline",
        ["explain", "--sae", "gemma-scope-2-270m-pt-res:layer_12_width_16k_l0_medium", "--out", "{c}/out/r.jsonl"],
        r"cannot download .* hub .*--sae FOLDER",
        env={"HF_HUB_OFFLINE": "1"},
        subprocess=True,
    ),
    Case(
        "features-binary-file",
        explain("--features", "{c}/f.bin"),
        r"features file .* is not text",
        setup=lambda c, a: (c / "f.bin").write_bytes(bytes(range(256))),
    ),
    Case("features-huge-range", explain("--features", "0-99999999999"), r"outside the SAE"),
    Case("features-full-width", explain("--features", "１２"), r"cannot read feature"),
    Case(
        "model-not-a-checkpoint",
        ["explain", "--sae", "{a}/sae", "--model", "{c}", "--out", "{c}/out/r.jsonl"],
        r"not a transformers checkpoint",
    ),
    Case("device-cuda-on-cpu", explain("--device", "cuda"), r"CUDA is not available"),
    Case(
        "unknown-architecture",
        explain(sae="{c}/sae"),
        r"architecture 'mystery' is not one",
        setup=lambda c, a: _sae_with_cfg(c, a, architecture="mystery"),
    ),
    Case(
        "hook-beyond-the-model",
        explain(sae="{c}/sae"),
        r"beyond this model's 4 blocks",
        setup=lambda c, a: save_sae(c / "sae", hook="blocks.99.hook_resid_post"),
    ),
    Case(
        "overflowing-scale",
        ["explain", "--sae", "{a}/sae", "--model", "{a}/tiny-gemma3", "--out", "{c}/out/r.jsonl", "--scales", "1,1e38"],
        r"above 1e\+06",
    ),
    Case("full-width-scale", explain("--scales", "１"), r"--scales takes comma-separated numbers"),
    Case(
        "contexts-missing-corpus",
        [
            "contexts",
            "--sae",
            "{a}/sae",
            "--model",
            "{a}/tiny-gemma3",
            "--corpus",
            "{c}/nope.txt",
            "--out",
            "{c}/out/e",
        ],
        r"--corpus .*nope\.txt does not exist",
    ),
    Case("eval-negative-limit", ["eval", "--limit", "-1"], r"--limit: expected a whole number >= 1"),
    Case("bench-sources", ["bench", "word-recovery", "--sources", "abc"], r"--sources 'abc' must be"),
    Case("bench-json-unwritable", ["bench", "sae-latent", "--json", "{a}/results.jsonl/x.json"], r"--json .* cannot"),
    Case("eval-out-unwritable", ["eval", "--out", "{a}/results.jsonl/x.json"], r"--out .* cannot be written"),
    Case(
        "validate-deep-json",
        ["validate", "{c}/in.json"],
        r"nested too deeply",
        setup=lambda c, a: (c / "in.json").write_text("[" * 100000 + "]" * 100000),
    ),
    Case(
        "dashboard-deep-json",
        ["dashboard", "{c}/in.jsonl", "--out", "{c}/out/d.html"],
        r"nested too deeply",
        setup=lambda c, a: (c / "in.jsonl").write_text("[" * 100000 + "]" * 100000 + "\n"),
    ),
    Case(
        "export-deep-json",
        ["export", "--results", "{c}/in.jsonl", "--format", "jsonl", "--out", "{c}/out/x.jsonl"],
        r"nested too deeply",
        setup=lambda c, a: (c / "in.jsonl").write_text("[" * 100000 + "]" * 100000 + "\n"),
    ),
    Case(
        "validate-nan",
        ["validate", "{c}/in.jsonl"],
        r"NaN is not JSON",
        setup=with_record_change(lambda d: d["candidates"][0].update(scale=float("nan"))),
    ),
    Case(
        "dashboard-string-feature-id",
        ["dashboard", "{c}/in.jsonl", "--out", "{c}/out/d.html"],
        r"line 1 is not a valid explanation record \(\$\.feature_id",
        setup=with_record_change(lambda d: d.update(feature_id="3")),
    ),
    Case(
        "dashboard-string-sae",
        ["dashboard", "{c}/in.jsonl", "--out", "{c}/out/d.html"],
        r"\(\$\.sae: 'x' is not",
        setup=with_record_change(lambda d: d.update(sae="x")),
    ),
    Case(
        "export-chosen-out-of-range",
        export_neuronpedia(results="{c}/in.jsonl"),
        r"chosen_index: 99 is out of range",
        setup=with_record_change(lambda d: d.update(chosen_index=99)),
    ),
    Case(
        "upload-chosen-out-of-range",
        ["upload", "--results", "{c}/in.jsonl", "--dry-run"],
        r"chosen_index: 99",
        setup=with_record_change(lambda d: d.update(chosen_index=99)),
    ),
    Case(
        "store-record-not-json",
        ["dashboard", "{c}/in.db", "--out", "{c}/out/d.html"],
        r"a stored record .* JSON",
        setup=copy_store("UPDATE explanations SET record = 'not json' WHERE feature = 1"),
    ),
    Case(
        "store-of-another-layout",
        ["export", "--store", "{c}/in.db", "--format", "jsonl", "--out", "{c}/out/x.jsonl"],
        r"not a results store \(its tables: \['users'\]\)",
        setup=foreign_db,
    ),
    Case(
        "store-table-of-another-layout",
        ["dashboard", "{c}/in.db", "--out", "{c}/out/d.html"],
        r"explanations table of another layout",
        setup=lambda c, a: _sqlite(c / "in.db", "CREATE TABLE meta (k TEXT)", "CREATE TABLE explanations (x TEXT)"),
    ),
    Case(
        "store-empty-file",
        ["dashboard", "{c}/in.db", "--out", "{c}/out/d.html"],
        r"is empty: it is not a results",
        setup=lambda c, a: (c / "in.db").write_bytes(b""),
    ),
    Case(
        "export-model-id-escapes",
        export_neuronpedia("--model-id", "../../x"),
        r"model id '\.\./\.\./x' cannot",
    ),
    Case(
        "export-absolute-model-id",
        export_neuronpedia("--model-id", "/tmp/x"),
        r"model id '/tmp/x' cannot",
    ),
    Case(
        "export-neuronpedia-id-escapes",
        export_neuronpedia(results="{c}/in.jsonl"),
        r"neuronpedia_id: .* does not match",
        setup=with_record_change(lambda d: d["sae"].update(neuronpedia_id="../../../elsewhere/x")),
    ),
    Case(
        "export-dotdot-model",
        export_neuronpedia(results="{c}/in.jsonl"),
        r"model id '\.\.' cannot",
        setup=with_record_change(lambda d: d["sae"].update(neuronpedia_id="../x")),
    ),
    Case(
        "export-through-a-planted-folder-link",
        export_neuronpedia(),
        r"refusing to write through the symbolic link .*2-test/features inside the output folder",
        setup=plant_link("features"),
    ),
    Case(
        "export-through-a-planted-file-link",
        export_neuronpedia(),
        r"symbolic link .*2-test/explanations/batch-0\.jsonl\.gz inside the output folder",
        setup=plant_link("explanations/batch-0.jsonl.gz", folder=False),
    ),
    Case(
        "export-mixes-two-saes",
        export_neuronpedia(results="{c}/in.jsonl"),
        r"mixes SAEs: other/2-test \(weights 0{16}\) and tiny-gemma3/2-test",
        setup=with_record_change(lambda d: d["sae"].update(neuronpedia_id="other/2-test", fingerprint="0" * 16)),
    ),
    Case(
        "export-model-of-unknown-size",
        ["export", "--results", "{c}/in.jsonl", "--format", "neuronpedia", "--out", "{c}/out", "--author-id", "u1"],
        r"number of blocks of tiny-gemma3.*pass --model-layers",
        setup=with_model("nobody/unknown-model"),
    ),
    Case(
        "export-author-id-with-sql",
        export_neuronpedia("--author-id", "u1'); DROP TABLE x; --"),
        r"needs --author-id \(got .*letters, digits and \. _ -",
    ),
    Case(
        "export-duplicates",
        [
            "export",
            "--results",
            "{c}/in.jsonl",
            "--format",
            "neuron-explainer",
            "--layer-index",
            "2",
            "--out",
            "{c}/out",
        ],
        r"feature 0 of tiny-gemma3/2-test appears twice",
        setup=lambda c, a: write_records(c / "in.jsonl", record_lines(a) + record_lines(a)[:1]),
    ),
    Case(
        "upload-host-not-a-url",
        ["upload", "--results", "{a}/results.jsonl", "--host", "not a url"],
        r"--host 'not a url' is not an https:// URL",
    ),
    Case(
        "upload-host-file",
        ["upload", "--results", "{a}/results.jsonl", "--host", "file:///etc/passwd#"],
        r"is not an https:// URL",
    ),
    Case(
        "upload-host-plain-http",
        ["upload", "--results", "{a}/results.jsonl", "--host", "http://example.com"],
        r"plain http: the API key would travel unencrypted",
    ),
    # issue 37: outputs never eat inputs; results and examples of one SAE, one run
    Case(
        "explain-out-is-its-store",
        ["explain", "--sae", "{a}/sae", "--model", "{a}/tiny-gemma3", "--out", "{c}/out/r.db", *FAST],
        r"--out .*r\.db is the same file as the results store",
    ),
    Case(
        "dashboard-out-is-its-results",
        ["dashboard", "{c}/in.jsonl", "--out", "{c}/in.jsonl"],
        r"--out .*in\.jsonl is the same file as --results .*choose another --out",
        setup=lambda c, a: shutil.copy(a / "results.jsonl", c / "in.jsonl"),
    ),
    Case(
        "dashboard-out-is-a-hard-link-to-its-results",
        ["dashboard", "{c}/in.jsonl", "--out", "{c}/link.html"],
        r"--out .*link\.html is the same file as --results",
        setup=lambda c, a: (shutil.copy(a / "results.jsonl", c / "in.jsonl"), os.link(c / "in.jsonl", c / "link.html")),
    ),
    Case(
        "export-jsonl-out-is-its-store",
        ["export", "--store", "{c}/in.db", "--format", "jsonl", "--out", "{c}/in.db"],
        r"--out .*in\.db is the same file as --store",
        setup=copy_store(),
    ),
    Case(
        "train-adapter-out-is-its-examples",
        ["train-adapter", "--sae", "{a}/sae", "--examples", "{c}/e.safetensors", "--out", "{c}/e.safetensors"],
        r"--out .*e\.safetensors is the same file as --examples",
        setup=lambda c, a: (c / "e.safetensors").write_bytes(b"examples"),
    ),
    Case(
        "dashboard-mixes-two-saes",
        ["dashboard", "{c}/in.jsonl", "--out", "{c}/out/d.html"],
        r"mixes SAEs: other/2-test \(weights 0{16}\) and tiny-gemma3/2-test \(weights [0-9a-f]{16}\)",
        setup=with_record_change(lambda d: d["sae"].update(neuronpedia_id="other/2-test", fingerprint="0" * 16)),
    ),
    Case(
        "dashboard-mixes-two-runs",
        ["dashboard", "{c}/in.jsonl", "--out", "{c}/out/d.html"],
        r"mixes runs with different settings .*'f{16}'.*--settings picks one",
        setup=with_record_change(lambda d: d.update(settings_hash="f" * 16)),
    ),
    Case(
        "eval-examples-of-another-sae",
        ["eval", "--sae", "{a}/sae", "--examples", str(DEMO_EXAMPLES), "--out", "{c}/out/e.json"],
        r"activation examples .* (belong to .*, not to tiny-gemma3/2-test|cover 4096 features, but the SAE has 12)",
    ),
    Case(
        "dashboard-examples-of-another-sae",
        ["dashboard", "{a}/results.jsonl", "--out", "{c}/out/d.html", "--examples", str(DEMO_EXAMPLES)],
        r"activation examples .* (belong to .*, not to tiny-gemma3/2-test|cover 4096 features, but the SAE has 12)",
    ),
    Case(
        "validate-a-line-past-the-cap",
        ["validate", "{c}/in.jsonl"],
        r"line 1 is longer than 33,554,432 characters",
        setup=lambda c, a: (c / "in.jsonl").write_text('"' + "x" * (32 * 1024 * 1024) + '"\n'),
    ),
    Case(
        "dashboard-a-json-past-the-cap",
        ["dashboard", "{c}/in.json", "--out", "{c}/out/d.html"],
        r"longer than 33,554,432 characters, the most one JSON document",
        setup=lambda c, a: (c / "in.json").write_text('"' + "x" * (32 * 1024 * 1024) + '"'),
    ),
    Case(
        "contexts-corpus-line-past-the-cap",
        [
            "contexts",
            "--sae",
            "{a}/sae",
            "--model",
            "{a}/tiny-gemma3",
            "--corpus",
            "{c}/in.jsonl",
            "--out",
            "{c}/out/e",
        ],
        r"--corpus .*in\.jsonl line 2 is longer than 33,554,432 characters",
        setup=lambda c, a: (c / "in.jsonl").write_text('"short"\n"' + "x" * (32 * 1024 * 1024) + '"\n'),
    ),
    # issue 37: adapters, SAE folders, prompts
    Case(
        "adapter-metadata-not-json",
        explain("--adapter", "{c}/a.safetensors"),
        r"a\.safetensors: adapter metadata: malformed or truncated JSON",
        setup=lambda c, a: _adapter_file(c, text="{"),
    ),
    Case(
        "adapter-d_model-a-string",
        explain("--adapter", "{c}/a.safetensors"),
        r"a\.safetensors: adapter metadata: field 'd_model' must be an integer >= 1, got '576'",
        setup=lambda c, a: _adapter_file(c, d_model="576"),
    ),
    Case(
        "adapter-rank-a-string",
        explain("--adapter", "{c}/a.safetensors"),
        r"a\.safetensors: adapter metadata: field 'rank' must be an integer >= 0, got '64'",
        setup=lambda c, a: _adapter_file(c, rank="64"),
    ),
    Case(
        "adapter-d_model-huge",  # once tried to allocate 800 GB
        explain("--adapter", "{c}/a.safetensors"),
        r"field 'd_model' is 100000000000, but the model's d_model is 64",
        setup=lambda c, a: _adapter_file(c, d_model=10**11),
    ),
    Case(
        "adapter-nan-bias",  # once gave empty texts and exit 0
        explain("--adapter", "{c}/a.safetensors"),
        r"a\.safetensors: tensor 'bias' holds 1 NaN or infinite values of 64",
        setup=lambda c, a: _adapter_file(c, nan=True),
    ),
    Case(
        "sae-weights-missing",  # once reported as "corrupt or truncated"
        explain(sae="{c}/sae"),
        r"has cfg\.json but no weights file sae_weights\.safetensors",
        setup=lambda c, a: (_sae_with_cfg(c, a), (c / "sae" / "sae_weights.safetensors").unlink()),
    ),
    Case(
        "sae-d_in-not-whole",  # once reported as "corrupt or truncated"
        explain(sae="{c}/sae"),
        r"cfg\.json: field 'd_in' must be a whole number >= 1 \(a width\), got 576\.9 \(float\)",
        setup=lambda c, a: _sae_with_cfg(c, a, d_in=576.9),
    ),
    Case(
        "model-pickle-weights",  # unpickled, the planted .bin would create {c}/pwned: the snapshot check sees it
        ["explain", "--sae", "{a}/sae", "--model", "{c}/model", "--out", "{c}/out/r.jsonl", *FAST],
        r"no safetensors weights; its weights are pickle files \['pytorch_model\.bin'\], refused .*save_pretrained",
        setup=lambda c, a: _pickle_checkpoint(c, a),
    ),
    Case(
        "prompt-past-the-context",  # the tiny model's context is 512 tokens
        explain("--template", "identity", "--max-new-tokens", "600"),
        r"template 'identity' renders to \d+ tokens, which with max_new_tokens=600 makes \d+, past the 512-token",
    ),
    Case(
        "upload-timeout-nan",
        ["upload", "--results", "{a}/results.jsonl", "--source", "2-test", "--timeout", "nan"],
        r"--timeout: expected seconds above 0 and at most 600, got 'nan'",
    ),
    Case(
        "upload-key-crlf",  # once "internal error: ValueError: Invalid header value b'<the key>...'"
        ["upload", "--results", "{a}/results.jsonl", *UPLOAD_NOWHERE],
        r"API key \(NEURONPEDIA_API_KEY\) holds a line break at position 11; .*copy it again",
        env={"NEURONPEDIA_API_KEY": "SECRET-k3y\r\nX-Injected: 1"},
    ),
    Case(
        "upload-key-not-latin-1",  # once UnicodeEncodeError
        ["upload", "--results", "{a}/results.jsonl", *UPLOAD_NOWHERE],
        r"API key \(NEURONPEDIA_API_KEY\) holds a non-ASCII character at position 8",
        env={"NEURONPEDIA_API_KEY": "SECRET-ключ"},
    ),
    Case(
        "upload-mixed-saes",  # once all sent to the first record's source, and recorded in the ledger
        ["upload", "--results", "{c}/in.jsonl", *UPLOAD_NOWHERE],
        r"mixes SAEs: .*2-other.* and .*2-test",
        setup=with_record_change(lambda d: d["sae"].update(neuronpedia_id="tiny-gemma3/2-other", fingerprint="0" * 16)),
    ),
    # issue 37: resume checkpoints are never unpickled; examples files are checked field by field
    Case(
        "contexts-resume-planted-pickle",  # once torch.load(weights_only=False): the pickle ran
        [
            "contexts",
            "--sae",
            "{a}/sae",
            "--model",
            "{a}/tiny-gemma3",
            "--corpus",
            "{c}/corpus.txt",
            "--out",
            "{c}/e.safetensors",
            "--resume",
        ],
        r"e\.safetensors\.partial is not a readable resume checkpoint .*rerun without --resume",
        setup=lambda c, a: _planted_resume(c, "e.safetensors.partial"),
    ),
    Case(
        "train-adapter-resume-planted-pickle",  # once torch.load(weights_only=False): the pickle ran
        [
            "train-adapter",
            "--sae",
            "{a}/sae",
            "--model",
            "{a}/tiny-gemma3",
            "--examples",
            "{c}/none.safetensors",
            "--out",
            "{c}/a.safetensors",
            "--template",
            "identity",
            "--steps",
            "2",
            "--words",
            "4",
            "--resume",
        ],
        r"a\.safetensors\.ckpt is not a readable resume checkpoint .*delete .* to start over",
        setup=lambda c, a: _planted_resume(c, "a.safetensors.ckpt", corpus=False),
    ),
    Case(
        "train-adapter-words-zero",  # once the whole vocabulary: more than 600 s
        ["train-adapter", "--sae", "{a}/sae", "--out", "{c}/out/a.safetensors", "--words", "0"],
        r"--words: expected a whole number >= 1, got '0'",
    ),
    Case(
        "examples-vocabulary-empty",
        ["eval", "--sae", "{a}/sae", "--examples", "{c}/e.safetensors"],
        r"e\.safetensors: field 'vocab' must be a non-empty JSON object .*rebuild the file",
        setup=lambda c, a: _examples_file(c, "{}"),
    ),
    Case(
        "examples-tensor-missing",
        ["eval", "--sae", "{a}/sae", "--examples", "{c}/e.safetensors"],
        r"e\.safetensors: tensor 'top_tokens' is missing; rebuild the file",
        setup=lambda c, a: _examples_file(c, '{"0": "a"}'),
    ),
    # issue 37, second sweep: every input a command names, exports' own paths, strict numbers, filters
    Case(
        "explain-out-is-the-models-config",
        ["explain", "--sae", "{a}/sae", "--model", "{c}/tiny-gemma3", "--out", "{c}/tiny-gemma3/config.json", *FAST],
        r"--out .*config\.json is the same file as --model .*config\.json",
        setup=lambda c, a: shutil.copytree(a / "tiny-gemma3", c / "tiny-gemma3"),
    ),
    Case(
        "explain-out-is-its-features-file",
        explain("--features", "{c}/f.txt", "--out", "{c}/f.txt"),
        r"--out .*f\.txt is the same file as --features",
        setup=lambda c, a: (c / "f.txt").write_text("0-3\n"),
    ),
    Case(
        "dashboard-out-is-the-examples-found-beside-the-results",
        ["dashboard", "{c}/r.jsonl", "--out", "{c}/r.examples.safetensors"],
        r"same file as the examples beside the results",
        setup=lambda c, a: (
            shutil.copy(a / "results.jsonl", c / "r.jsonl"),
            _examples_file(c, '{"0": "a"}'),
            (c / "e.safetensors").rename(c / "r.examples.safetensors"),
        ),
    ),
    Case(
        "export-writes-over-its-own-results",
        [
            "export",
            "--results",
            "{c}/x/explanations/2/0.jsonl",
            "--format",
            "neuron-explainer",
            "--layer-index",
            "2",
            "--out",
            "{c}/x",
        ],
        r"--out .*0\.jsonl is the same file as --results",
        setup=lambda c, a: _results_at(c / "x/explanations/2/0.jsonl", a),
    ),
    Case(
        "export-neuronpedia-writes-over-its-own-results",
        export_neuronpedia(results="{c}/np/v1/config/eval_type.jsonl", out="{c}/np"),
        r"--out .*eval_type\.jsonl is the same file as --results",
        setup=lambda c, a: _results_at(c / "np/v1/config/eval_type.jsonl", a),
    ),
    Case(
        "export-neuronpedia-writes-over-its-examples",
        export_neuronpedia("--examples", "{c}/np/v1/config/eval_type.jsonl", out="{c}/np"),
        r"--out .*eval_type\.jsonl is the same file as --examples",
        setup=lambda c, a: _tiny_examples(a, c / "np/v1/config/eval_type.jsonl"),
    ),
    Case(
        "dashboard-mix-behind-a-record-without-fingerprint",
        ["dashboard", "{c}/in.jsonl", "--out", "{c}/out/d.html"],
        r"mixes SAEs: tiny-gemma3/2-test \(weights [0-9a-f]{16}\) and tiny-gemma3/2-test \(weights 0{16}\)"
        r".*--sae-id tiny-gemma3/2-test@",
        setup=lambda c, a: write_records(
            c / "in.jsonl",
            [
                {
                    **record_lines(a)[0],
                    "sae": {k: v for k, v in record_lines(a)[0]["sae"].items() if k != "fingerprint"},
                },
                *record_lines(a)[1:2],
                {**record_lines(a)[2], "sae": {**record_lines(a)[2]["sae"], "fingerprint": "0" * 16}},
            ],
        ),
    ),
    Case(
        "dashboard-old-and-new-records-mixed",
        ["dashboard", "{c}/in.jsonl", "--out", "{c}/out/d.html"],
        r"mixes records that carry their SAE's weights fingerprint with records that do not",
        setup=with_record_change(lambda d: d["sae"].pop("fingerprint")),
    ),
    Case(
        "validate-a-float-out-of-range",
        ["validate", "{c}/in.jsonl"],
        r"1e400 is outside the range of a float",
        setup=lambda c, a: (c / "in.jsonl").write_text(
            re.sub(r'"scale": [0-9.]+', '"scale": 1e400', (a / "results.jsonl").read_text(), count=1)
        ),
    ),
    Case(
        "validate-an-integer-of-5001-digits",
        ["validate", "{c}/in.jsonl"],
        r"an integer of 5001 digits is no number we write",
        setup=lambda c, a: (c / "in.jsonl").write_text('{"feature_id": ' + "9" * 5001 + "}\n"),
    ),
    Case(
        "export-a-store-filter-matching-nothing",
        ["export", "--store", "{c}/in.db", "--sae-id", "nobody/0-x", "--format", "jsonl", "--out", "{c}/out/x.jsonl"],
        r"no results in .*in\.db match --sae-id nobody/0-x",
        setup=copy_store(),
    ),
    Case(
        "dashboard-a-jsonl-filter-matching-nothing",
        ["dashboard", "{a}/results.jsonl", "--settings", "f" * 16, "--out", "{c}/out/d.html"],
        r"no results in .*results\.jsonl match --settings f{16}",
    ),
    Case(
        "export-beside-an-earlier-exports-files",
        export_neuronpedia(out="{c}/np"),
        r"holds 1 files of an earlier export that this one would not replace \(activations/batch-7\.jsonl\.gz\)",
        setup=lambda c, a: (
            Path(c / "np/v1/tiny-gemma3/2-test/activations").mkdir(parents=True),
            (c / "np/v1/tiny-gemma3/2-test/activations/batch-7.jsonl.gz").write_bytes(b"old"),
        ),
    ),
    Case(
        "export-model-layers-against-the-model",
        [
            "export",
            "--results",
            "{a}/results.jsonl",
            "--format",
            "neuronpedia",
            "--out",
            "{c}/out",
            "--author-id",
            "u1",
            "--model-layers",
            "10000000000",
        ],
        r"--model-layers 10000000000, but the SAE's model has 4 blocks",
    ),
    Case(
        "upload-a-key-of-100000-characters",
        ["upload", "--results", "{a}/results.jsonl", "--source", "2-test"],
        r"the API key \(NEURONPEDIA_API_KEY\) is 100,000 characters long",
        env={"NEURONPEDIA_API_KEY": "k" * 100_000},
    ),
]


def _sae_with_cfg(case: Path, assets: Path, **changes: Any) -> None:
    shutil.copytree(assets / "sae", case / "sae")
    cfg = json.loads((case / "sae" / "cfg.json").read_text())
    (case / "sae" / "cfg.json").write_text(json.dumps({**cfg, **changes}))


def _adapter_file(case: Path, text: str | None = None, nan: bool = False, **changes: Any) -> None:
    """{c}/a.safetensors: an adapter for the tiny model, with a NaN in its bias, or its metadata replaced by
    `text` or changed by `changes`."""
    adapter = DirectionAdapter(AdapterMetadata("tiny-gemma3", 64, "blocks.2.hook_resid_pre", 2, "test-open"))
    if nan:
        with torch.no_grad():
            adapter.bias[0] = float("nan")
    rewrite_metadata(adapter.save(case / "a.safetensors"), text, **changes)


class _Planted:
    """Unpickled, it opens (creates) the file at `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def _pickle_checkpoint(case: Path, assets: Path) -> None:
    """{c}/model: the tiny checkpoint with its safetensors weights replaced by a planted pickle .bin."""
    shutil.copytree(assets / "tiny-gemma3", case / "model")
    (case / "model" / "model.safetensors").unlink()
    (case / "model" / "pytorch_model.bin").write_bytes(pickle.dumps(_Planted(case / "pwned")))


def _planted_resume(case: Path, checkpoint: str, corpus: bool = True) -> None:
    """{c}/`checkpoint`: a torch.save pickle that would create {c}/pwned if loaded (the snapshot check sees
    it); with a small corpus at {c}/corpus.txt."""
    (case / checkpoint).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"collector": _Planted(case / "pwned"), "rows": 1}, case / checkpoint)
    if corpus:
        (case / "corpus.txt").write_text(" ".join(["the cat sat on the mat"] * 200))


def _results_at(path: Path, assets: Path) -> None:
    """A copy of the shared results at `path` (inside a folder an export will write)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(assets / "results.jsonl", path)


def _tiny_examples(assets: Path, path: Path) -> None:
    """Real activation examples of the tiny SAE (random activations), saved at `path`."""
    from sae_lens import SAE
    from sae_selfexplain_plugin.adapters.sae_lens import sae_identity

    from sae_selfexplain_plugin.example_collector import ExampleCollector

    collector = ExampleCollector(12, top_k=2, window=4, n_random=1, pool_size=4)
    collector.add(torch.arange(8).reshape(1, 8), torch.rand(1, 8, 12, generator=torch.Generator().manual_seed(0)))
    path.parent.mkdir(parents=True, exist_ok=True)
    examples = collector.finish(lambda i: f" t{i}").with_sae(sae_identity(SAE.load_from_disk(str(assets / "sae"))))
    examples.save(path)


def _examples_file(case: Path, vocab: str, **tensors: torch.Tensor) -> None:
    """{c}/e.safetensors: an activation-examples file with this vocabulary JSON and these tensors."""
    from safetensors.torch import save_file

    sae = json.dumps({"d_sae": 12, "fingerprint": "0" * 16})
    meta = {"format": "sae-selfexplain-activation-examples/2", "vocab": vocab, "sae": sae}
    save_file(tensors or {"frequency": torch.zeros(12)}, case / "e.safetensors", metadata=meta)


def snapshot(*roots: Path, skip: Path | None = None) -> dict[str, str]:
    """sha256 of every file under `roots` (except under `skip`); a symbolic link is not a file of its own (its
    target, when under `roots`, is hashed where it lies)."""
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.is_file() and not p.is_symlink() and not (skip and (p == skip or skip in p.parents)):
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run_cli(argv: list[str], cwd: Path, env: dict[str, str] | None = None, **kw: Any) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "COLUMNS": "400", NEURONPEDIA_KEY_ENV: KEY, **(env or {})}
    command = [sys.executable, "-m", "sae_selfexplain_plugin.adapters.cli", *argv]
    return subprocess.run(command, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=300, **kw)


NEURONPEDIA_KEY_ENV = "NEURONPEDIA_API_KEY"


def run_main(
    argv: list[str], cwd: Path, env: dict[str, str], monkeypatch: Any, capsys: Any
) -> subprocess.CompletedProcess:
    """`main(argv)` in this process, as run_cli would run it: same cwd, environment and exit code."""
    monkeypatch.chdir(cwd)
    for name, value in {"COLUMNS": "400", NEURONPEDIA_KEY_ENV: KEY, **env}.items():
        monkeypatch.setenv(name, value)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's errors and --help
        code = e.code if isinstance(e.code, int) else 2
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, out, err)


@pytest.fixture
def cli(monkeypatch: Any, capsys: Any) -> Callable[..., subprocess.CompletedProcess]:
    """run_main for tests that run several commands."""
    return lambda argv, cwd, env=None: run_main(argv, cwd, env or {}, monkeypatch, capsys)


def error_lines(done: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_input_is_one_clear_line(
    case: Case, assets: Path, tmp_path: Path, monkeypatch: Any, capsys: Any
) -> None:
    if case.setup:
        case.setup(tmp_path, assets)
    out = tmp_path / "out"
    before = snapshot(assets, tmp_path)
    argv = [a.format(a=assets, c=tmp_path) for a in case.argv]
    if case.subprocess:
        done = run_cli(argv, tmp_path, case.env)
    else:
        done = run_main(argv, tmp_path, case.env, monkeypatch, capsys)
    lines = error_lines(done)
    assert done.returncode == case.code, lines
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines  # one line, the last (after any status lines)
    assert re.search(case.error, errors[0]), errors[0]
    after = snapshot(assets, tmp_path, skip=out)
    changed = {p for p in set(before) | set(after) if before.get(p) != after.get(p)}
    # sqlite may add -wal/-shm files beside a store it reads; the store itself and every other file are unchanged
    assert {p for p in changed if not p.endswith(("-wal", "-shm"))} == set(), changed


def test_read_only_commands_leave_a_store_byte_identical(assets: Path, tmp_path: Path, cli: Any) -> None:
    copy_store()(tmp_path, assets)
    store = tmp_path / "in.db"
    before = store.read_bytes()
    os.chmod(store, 0o444)
    for argv in (["dashboard", str(store), "--out", str(tmp_path / "d.html")],
                 ["export", "--store", str(store), "--format", "jsonl", "--out", str(tmp_path / "x.jsonl")],
                 ["upload", "--store", str(store), "--dry-run", "--source", "2-test"]):  # fmt: skip
        done = cli(argv, tmp_path)
        assert done.returncode == 0, error_lines(done)
    assert store.read_bytes() == before
    with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as db:
        assert db.execute("SELECT count(*) FROM uploads").fetchone() == (0,)  # the dry run kept no ledger


class _Server(LoopbackServer):
    """A loopback server answering every POST with `answer(handler)`; it keeps the headers it was sent."""

    def __init__(self, answer: Callable[[BaseHTTPRequestHandler], None]) -> None:
        self.seen: list[dict[str, str]] = []
        seen = self.seen

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                seen.append({k.lower(): v for k, v in self.headers.items()})
                answer(self)

        super().__init__(Handler)


def _uploads(ledger: Path) -> int:
    with sqlite3.connect(ledger) as db:
        return int(db.execute("SELECT count(*) FROM uploads").fetchone()[0])


def test_upload_never_follows_a_redirect_with_the_key(assets: Path, tmp_path: Path, cli: Any) -> None:
    with _Server(lambda h: send_json(h, 200, {"message": "1 features created."})) as other:

        def redirect(h: BaseHTTPRequestHandler) -> None:
            h.send_response(307)
            h.send_header("Location", other.url + "/api/feature/upload-batch")
            h.send_header("Content-Length", "0")
            h.end_headers()

        with _Server(redirect) as first:
            ledger = tmp_path / "ledger.db"
            argv = ["upload", "--results", str(assets / "results.jsonl"), "--host", first.url, "--allow-http",
                    "--source", "2-test", "--ledger", str(ledger)]  # fmt: skip
            done = cli(argv, tmp_path)
    assert done.returncode == 2 and "redirected the upload" in error_lines(done)[-1]
    assert len(first.seen) == 1 and first.seen[0].get("x-api-key") == KEY
    assert other.seen == []  # the key never reached the second origin
    assert _uploads(ledger) == 0


@pytest.mark.parametrize(
    "answer",
    [lambda h: send_json(h, 200, ["garbage"]), lambda h: send_json(h, 201, {"message": "1 features created."}),
     lambda h: (h.send_response(200), h.send_header("Content-Length", "2"), h.end_headers(), h.wfile.write(b"ok"))],
    ids=["json-not-neuronpedia", "wrong-status", "not-json"],
)  # fmt: skip
def test_upload_marks_nothing_on_a_bad_answer(assets: Path, tmp_path: Path, cli: Any, answer: Any) -> None:
    with _Server(answer) as server:
        ledger = tmp_path / "ledger.db"
        argv = ["upload", "--results", str(assets / "results.jsonl"), "--host", server.url, "--allow-http",
                "--source", "2-test", "--ledger", str(ledger)]  # fmt: skip
        done = cli(argv, tmp_path)
    assert done.returncode == 2 and "unexpected answer" in error_lines(done)[-1], error_lines(done)
    assert _uploads(ledger) == 0


def _upload_to(url: str, tmp_path: Path, *extra: str) -> list[str]:
    return ["upload", "--results", "{a}/results.jsonl", "--host", url, "--allow-http", "--source", "2-test",
            "--ledger", str(tmp_path / "ledger.db"), *extra]  # fmt: skip


def test_upload_gives_up_on_a_silent_server_promptly(assets: Path, tmp_path: Path, cli: Any) -> None:
    # once about 6.5 minutes (six tries of 60 s and 31 s of backoff), and no --timeout
    with Silent() as silent:
        argv = [a.format(a=assets) for a in _upload_to(silent.url, tmp_path, "--timeout", "0.5")]
        done = cli(argv, tmp_path)
    lines = error_lines(done)
    assert done.returncode == 2 and "Traceback" not in done.stderr, lines
    said = r"^error: http://127\.0\.0\.1:\d+ did not answer within 0\.5 s \(--timeout\) \(2 tries\).*raise --timeout"
    assert re.search(said, lines[-1]) and len(silent.held) == 2, lines
    assert _uploads(tmp_path / "ledger.db") == 0


def test_upload_retries_dropped_connections(assets: Path, tmp_path: Path, cli: Any) -> None:
    # a reset, then a close before any answer (once RemoteDisconnected, not retried), then the server
    with FakeNeuronpedia(KEY, "tiny-gemma3", ("2-test",)) as server, Flaky(server, ["reset", "close"]) as front:
        done = cli([a.format(a=assets) for a in _upload_to(front.url, tmp_path)], tmp_path)
    assert done.returncode == 0, error_lines(done)
    assert front.seen == 3 and len(server.received) == 1
    assert _uploads(tmp_path / "ledger.db") == len(server.received[0]["features"]) > 0


def test_upload_never_prints_the_key(assets: Path, tmp_path: Path) -> None:
    """The key planted where it leaked or could: a header it breaks (with --debug's traceback), and a server
    quoting it in its error. All output is searched for any 6-character piece of it."""
    crlf = "SECRET-k3y-9d8e\r\nSECRET-more-7c6b"
    argv = ["--debug", *(a.format(a=assets) for a in _upload_to("http://127.0.0.1:9", tmp_path))]
    done = run_cli(argv, tmp_path, {NEURONPEDIA_KEY_ENV: crlf})
    assert done.returncode == 2 and leaks(crlf, done.stdout + done.stderr) == [], done.stdout + done.stderr
    assert "holds a line break" in error_lines(done)[-1]
    echoed = "SECRET-echoed-5a4b3c"
    quoting = _Server(lambda h: send_json(h, 400, {"error": f"bad key {h.headers['x-api-key']} " + "x" * 300}))
    with quoting:
        done = run_cli([a.format(a=assets) for a in _upload_to(quoting.url, tmp_path)], tmp_path,
                       {NEURONPEDIA_KEY_ENV: echoed})  # fmt: skip
    assert quoting.seen[0]["x-api-key"] == echoed  # it was sent, and quoted back
    assert done.returncode == 2 and leaks(echoed, done.stdout + done.stderr) == [], done.stdout + done.stderr
    assert "HTTP 400" in error_lines(done)[-1] and "bad key ***" in error_lines(done)[-1]


def test_bad_decoder_rows_are_skipped_and_recorded(assets: Path, tmp_path: Path, capsys: Any) -> None:
    sae = save_sae(tmp_path / "sae", nan_rows=(1,))
    out = tmp_path / "r.jsonl"
    args = ["explain", "--sae", str(sae), "--model", str(assets / "tiny-gemma3"), "--features", "0-3",
            "--out", str(out), *FAST]  # fmt: skip
    assert main(args) == 0
    assert "1 features could not be explained" in " ".join(capsys.readouterr().out.split())
    assert [json.loads(line)["feature_id"] for line in out.read_text().splitlines()] == [0, 2, 3]
    assert main([*args, "--resume"]) == 0  # not retried...
    assert "0 features explained" in " ".join(capsys.readouterr().out.split())
    assert main([*args, "--resume", "--retry-failed"]) == 0  # ...unless asked
    assert "1 features could not be explained" in " ".join(capsys.readouterr().out.split())


def test_resume_after_changing_only_the_batch_size_recomputes_nothing(assets: Path, tmp_path: Path, capsys: Any):
    args = ["explain", "--sae", str(assets / "sae"), "--model", str(assets / "tiny-gemma3"), "--features", "0-3",
            "--out", str(tmp_path / "r.jsonl"), *FAST]  # fmt: skip
    assert main(args) == 0
    first = (tmp_path / "r.jsonl").read_text()
    assert main([*args, "--resume", "--batch-size", "2"]) == 0
    assert "0 features explained" in " ".join(capsys.readouterr().out.split())
    assert (tmp_path / "r.jsonl").read_text() == first


def _default_sigint() -> None:
    """In the child before exec: Ctrl-C handled by default and not blocked, whatever this process inherited
    (a suite started in the background by a non-interactive shell, `make test &`, has SIGINT ignored, and
    its children would ignore the test's Ctrl-C)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])


def test_ctrl_c_keeps_the_store_and_says_how_to_resume(assets: Path, tmp_path: Path) -> None:
    store = tmp_path / "r.db"
    # 2,048 features: far more work than the wait below, so the signal always lands mid-run (with the
    # 12-feature SAE a fast machine finished before the first poll saw a batch, and the run exited 0)
    sae = save_sae(tmp_path / "big-sae", d_sae=2048)
    argv = ["explain", "--sae", str(sae), "--model", str(assets / "tiny-gemma3"), "--out",
            str(tmp_path / "r.jsonl"), "--template", "identity", "--scales", "1", "--max-new-tokens", "40",
            "--batch-size", "1"]  # fmt: skip
    env = {**os.environ, "COLUMNS": "400"}
    child = subprocess.Popen([sys.executable, "-m", "sae_selfexplain_plugin.adapters.cli", *argv], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=_default_sigint)  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait for the first committed batch
        if store.exists():
            with sqlite3.connect(store) as db:
                if (
                    db.execute("SELECT count(*) FROM sqlite_master WHERE name = 'explanations'").fetchone()[0]
                    and (db.execute("SELECT count(*) FROM explanations").fetchone()[0])
                ):
                    break
        time.sleep(0.2)
    child.send_signal(signal.SIGINT)
    _, stderr = child.communicate(timeout=60)
    assert child.returncode == 130, stderr
    message = " ".join(stderr.split())
    assert re.search(r"interrupted; [1-9]\d* features stored in .*r\.db, rerun with --resume", message), message
    assert "Traceback" not in stderr


def test_a_run_at_the_largest_scale_exports_no_nan_and_renders(assets: Path, tmp_path: Path, page: Any) -> None:  # noqa: F811
    # the largest scale accepted (1e6 times the residual norm), every scale generated and measured
    out = tmp_path / "r.jsonl"
    args = ["explain", "--sae", str(assets / "sae"), "--model", str(assets / "tiny-gemma3"), "--features", "0-3",
            "--out", str(out), "--template", "test-open", "--scales", "1,1000000", "--max-new-tokens", "3",
            "--generate", "all", "--metrics"]  # fmt: skip
    assert main(args) == 0
    assert (
        main(["export", "--results", str(out), "--format", "neuronpedia", "--out", str(tmp_path / "np"), *NP_FLAGS])
        == 0
    )
    texts = [out.read_text()] + [gzip.decompress(p.read_bytes()).decode() for p in (tmp_path / "np").rglob("*.gz")]
    assert len(texts) == 3 and not any("NaN" in t or "Infinity" in t for t in texts)
    assert main(["dashboard", str(out), "--out", str(tmp_path / "d.html")]) == 0
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto((tmp_path / "d.html").as_uri())
    page.wait_for_selector("tr.row")
    assert page.locator("tr.row").count() == 4 and errors == []
