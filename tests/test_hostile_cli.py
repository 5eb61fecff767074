"""Hostile input through the real CLI (a subprocess each): every case gets exit code 2 and a one-line
error naming the problem, no traceback, nothing written outside --out, and input files left byte-identical.

The cases are the ones a hostile run found (issue 17); each is one row of CASES."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
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
from loopback import LoopbackServer, send_json
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata
from sae_selfexplain_plugin.adapters.cli import main
from test_dashboard import page  # noqa: F401 (the Chromium page fixture)

KEY = "hostile-test-key-0123"
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


@dataclass
class Case:
    name: str
    argv: list[str]  # {a} = the shared assets folder, {c} = this case's folder; --out is {c}/out...
    error: str  # a regex the one error line must match
    setup: Callable[[Path, Path], None] | None = None
    code: int = 2
    env: dict[str, str] = field(default_factory=dict)


def explain(*extra: str, sae: str = "{a}/sae") -> list[str]:
    return ["explain", "--sae", sae, "--model", "{a}/tiny-gemma3", "--out", "{c}/out/r.jsonl", *FAST, *extra]


NP_FLAGS = ["--author-id", "u1", "--model-layers", "4"]


def export_neuronpedia(*extra: str, results: str = "{a}/results.jsonl") -> list[str]:
    return ["export", "--results", results, "--format", "neuronpedia", "--out", "{c}/out", *NP_FLAGS, *extra]


CASES = [
    Case("sae-unknown-release", ["explain", "--sae", "foo:bar", "--out", "{c}/out/r.jsonl"], r"'foo' is not a release"),
    Case(
        "sae-registry-offline",
        ["explain", "--sae", "gemma-scope-2-270m-pt-res:layer_12_width_16k_l0_medium", "--out", "{c}/out/r.jsonl"],
        r"cannot download .* hub .*--sae FOLDER",
        env={"HF_HUB_OFFLINE": "1"},
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
]


def _sae_with_cfg(case: Path, assets: Path, **changes: Any) -> None:
    shutil.copytree(assets / "sae", case / "sae")
    cfg = json.loads((case / "sae" / "cfg.json").read_text())
    (case / "sae" / "cfg.json").write_text(json.dumps({**cfg, **changes}))


def snapshot(*roots: Path, skip: Path | None = None) -> dict[str, str]:
    """sha256 of every file under `roots` (except under `skip`)."""
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.is_file() and not (skip and (p == skip or skip in p.parents)):
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run_cli(argv: list[str], cwd: Path, env: dict[str, str] | None = None, **kw: Any) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "COLUMNS": "400", NEURONPEDIA_KEY_ENV: KEY, **(env or {})}
    command = [sys.executable, "-m", "sae_selfexplain_plugin.adapters.cli", *argv]
    return subprocess.run(command, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=300, **kw)


NEURONPEDIA_KEY_ENV = "NEURONPEDIA_API_KEY"


def error_lines(done: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_input_is_one_clear_line(case: Case, assets: Path, tmp_path: Path) -> None:
    if case.setup:
        case.setup(tmp_path, assets)
    out = tmp_path / "out"
    before = snapshot(assets, tmp_path)
    argv = [a.format(a=assets, c=tmp_path) for a in case.argv]
    done = run_cli(argv, tmp_path, case.env)
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


def test_read_only_commands_leave_a_store_byte_identical(assets: Path, tmp_path: Path) -> None:
    copy_store()(tmp_path, assets)
    store = tmp_path / "in.db"
    before = store.read_bytes()
    os.chmod(store, 0o444)
    for argv in (["dashboard", str(store), "--out", str(tmp_path / "d.html")],
                 ["export", "--store", str(store), "--format", "jsonl", "--out", str(tmp_path / "x.jsonl")],
                 ["upload", "--store", str(store), "--dry-run", "--source", "2-test"]):  # fmt: skip
        done = run_cli(argv, tmp_path)
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


def test_upload_never_follows_a_redirect_with_the_key(assets: Path, tmp_path: Path) -> None:
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
            done = run_cli(argv, tmp_path)
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
def test_upload_marks_nothing_on_a_bad_answer(assets: Path, tmp_path: Path, answer: Any) -> None:
    with _Server(answer) as server:
        ledger = tmp_path / "ledger.db"
        argv = ["upload", "--results", str(assets / "results.jsonl"), "--host", server.url, "--allow-http",
                "--source", "2-test", "--ledger", str(ledger)]  # fmt: skip
        done = run_cli(argv, tmp_path)
    assert done.returncode == 2 and "unexpected answer" in error_lines(done)[-1], error_lines(done)
    assert _uploads(ledger) == 0


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
