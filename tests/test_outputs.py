"""Outputs keep what users expect of a file they name (mode, symlinks), never replace an input, and results
are tied to the SAE's weights, not its name (issue 37)."""

from __future__ import annotations

import io
import json
import os
import stat
from pathlib import Path

import pytest
import torch
from conftest import build_tokenizer, tiny_gemma
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata
from sae_selfexplain_plugin.adapters.cli import main
from test_hostile_cli import FAST, save_sae

from sae_selfexplain_plugin.errors import InputError
from sae_selfexplain_plugin.files import MAX_LINE_CHARS, atomic_writer, capped_lines, refuse_input
from sae_selfexplain_plugin.identity import decoder_fingerprint
from sae_selfexplain_plugin.store import ResultsStore


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_rewritten_file_keeps_its_mode_and_a_new_one_gets_the_umask(tmp_path: Path) -> None:
    old = tmp_path / "old.txt"
    old.write_text("before")
    os.chmod(old, 0o644)
    with atomic_writer(old) as f:
        f.write("after")
    assert old.read_text() == "after" and _mode(old) == 0o644
    os.chmod(old, 0o640)
    with atomic_writer(old) as f:
        f.write("again")
    assert _mode(old) == 0o640
    mask = os.umask(0o027)
    try:
        with atomic_writer(tmp_path / "new.txt") as f:
            f.write("new")
    finally:
        os.umask(mask)
    assert _mode(tmp_path / "new.txt") == 0o640  # 0666 less the umask, not mkstemp's 0600


def test_a_symlinked_output_is_written_through_and_stays_a_link(tmp_path: Path) -> None:
    target = tmp_path / "real" / "results.jsonl"
    target.parent.mkdir()
    target.write_text("old\n")
    link = tmp_path / "link.jsonl"
    link.symlink_to(target)
    with atomic_writer(link) as f:
        f.write("new\n")
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_text() == "new\n"


def test_refuse_input_compares_files_not_names(tmp_path: Path) -> None:
    data = tmp_path / "in.jsonl"
    data.write_text("{}\n")
    (tmp_path / "alias.jsonl").symlink_to(data)
    folder = tmp_path / "sae"
    folder.mkdir()
    (folder / "cfg.json").write_text("{}")
    for out in (data, tmp_path / "alias.jsonl", tmp_path / "sub" / ".." / "in.jsonl"):
        with pytest.raises(InputError, match=r"is the same file as the results .*in\.jsonl"):
            refuse_input(out, "--out", {"the results": data})
    with pytest.raises(InputError, match=r"same file as --sae .*cfg\.json"):
        refuse_input(folder / "cfg.json", "--out", {"--sae": folder})
    refuse_input(tmp_path / "other.jsonl", "--out", {"the results": data, "--sae": folder, "unused": None})


def test_lines_are_read_with_a_cap(tmp_path: Path) -> None:
    ok = "x" * 10 + "\n"
    assert [n for n, _ in capped_lines(io.StringIO(ok * 3), "f")] == [1, 2, 3]
    exact = "y" * MAX_LINE_CHARS + "\n"
    assert [len(t) for _, t in capped_lines(io.StringIO(exact + ok), "f")] == [MAX_LINE_CHARS + 1, 11]
    with pytest.raises(InputError, match=r"f line 2 is longer than 33,554,432 characters"):
        list(capped_lines(io.StringIO(ok + "z" * (MAX_LINE_CHARS + 1)), "f"))


def _sae_like(folder: Path, other: Path) -> Path:
    """An SAE saved under `other`'s cfg (same name, hook, sizes) with other weights."""
    torch.manual_seed(7)
    meta = SAEMetadata(
        model_name="tiny-gemma3", hook_name="blocks.2.hook_resid_pre", neuronpedia_id="tiny-gemma3/2-test"
    )
    sae = StandardSAE(StandardSAEConfig(d_in=64, d_sae=12, metadata=meta))
    with torch.no_grad():
        sae.W_dec.copy_(torch.randn_like(sae.W_dec))
    sae.save_model(folder)
    assert (
        json.loads((folder / "cfg.json").read_text())["metadata"]
        == json.loads((other / "cfg.json").read_text())["metadata"]
    )
    return folder


def test_another_sae_under_the_same_name_never_resumes_from_the_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tok = build_tokenizer()
    tiny_gemma(len(tok)).save_pretrained(tmp_path / "tiny-gemma3")
    tok.save_pretrained(tmp_path / "tiny-gemma3")
    first = save_sae(tmp_path / "first")
    second = _sae_like(tmp_path / "second", first)
    store = tmp_path / "r.db"
    common = ["--model", str(tmp_path / "tiny-gemma3"), "--features", "0-3", "--store", str(store), "--resume", *FAST]
    assert main(["explain", "--sae", str(first), "--out", str(tmp_path / "a.jsonl"), *common]) == 0
    capsys.readouterr()
    assert main(["explain", "--sae", str(second), "--out", str(tmp_path / "b.jsonl"), *common]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "4 features explained" in said and "0 already in the store" in said, said
    a = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (tmp_path / "b.jsonl").read_text().splitlines()]
    fingerprints = {r["sae"]["fingerprint"] for r in a}, {r["sae"]["fingerprint"] for r in b}
    from sae_lens import SAE

    assert fingerprints == (
        {decoder_fingerprint(SAE.load_from_disk(str(first)).W_dec)},
        {decoder_fingerprint(SAE.load_from_disk(str(second)).W_dec)},
    )
    assert fingerprints[0] != fingerprints[1]
    with ResultsStore(store, read_only=True) as results:  # a name without the fingerprint still selects both
        assert len(list(results.records(sae_id="tiny-gemma3/2-test"))) == 8


def test_the_fingerprint_is_the_weights_in_any_dtype() -> None:
    w = torch.randn(12, 64)
    assert decoder_fingerprint(w) == decoder_fingerprint(w.clone().double())
    assert decoder_fingerprint(w) != decoder_fingerprint(w.T.contiguous())  # same bytes count, other shape
    changed = w.clone()
    changed[3, 5] += 1e-3
    assert decoder_fingerprint(w) != decoder_fingerprint(changed)


def test_an_export_names_a_local_model_by_its_folder_not_its_path() -> None:
    from sae_selfexplain_plugin.formats import to_neuronpedia_line
    from sae_selfexplain_plugin.results import Explanation, FeatureExplanations, public_model_name

    assert public_model_name("/home/me/ckpts/tiny-gemma3") == "tiny-gemma3"
    assert public_model_name("./tiny-gemma3") == "tiny-gemma3" and public_model_name("google/gemma-3-270m") == (
        "google/gemma-3-270m"
    )
    record = FeatureExplanations(1, [Explanation(1, "a fruit", 4.0, 2, "identity")], 0, model_id="/tmp/me/Model-X")
    line = to_neuronpedia_line(record, "m", "2-x", "u1", None, None)
    assert line is not None and "/tmp/me" not in json.dumps(line)
    assert json.loads(line["notes"])["explained_by"] == "model-x"


def test_examples_are_saved_and_read_only_with_their_saes_identity(tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    from sae_selfexplain_plugin.errors import SelfExplainError
    from sae_selfexplain_plugin.example_collector import ExampleCollector

    collector = ExampleCollector(3, top_k=2, window=4, n_random=1, pool_size=4)
    collector.add(torch.arange(8).reshape(1, 8), torch.rand(1, 8, 3))
    examples = collector.finish(lambda i: f" t{i}")
    with pytest.raises(SelfExplainError, match="without the identity of their SAE"):
        examples.save(tmp_path / "e.safetensors")
    examples.with_sae({"d_sae": 3, "fingerprint": "a" * 16}).save(tmp_path / "e.safetensors")
    with safe_open(str(tmp_path / "e.safetensors"), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    from sae_selfexplain_plugin.activation_examples import ActivationExamples

    assert ActivationExamples.load(tmp_path / "e.safetensors").sae == {"d_sae": 3, "fingerprint": "a" * 16}
    del meta["sae"]  # a /2 file with its identity removed could be attached to any SAE of 3 features
    save_file(tensors, tmp_path / "stripped.safetensors", metadata=meta)
    with pytest.raises(InputError, match=r"stripped\.safetensors: field 'sae' .* is missing"):
        ActivationExamples.load(tmp_path / "stripped.safetensors")
