from __future__ import annotations

import hashlib
import importlib
import multiprocessing
from pathlib import Path

import pytest
import torch
from cache_worker import build_in_child, fake_spec
from sae_selfexplain_plugin.adapters.backends import embedded
from sae_selfexplain_plugin.adapters.backends.embedded import (
    EmbeddedModel,
    SplitGGUF,
    cache_root,
    default_device_dtype,
    ensure_cached,
    get_embedded,
)
from transformers import AutoModelForCausalLM

from sae_selfexplain_plugin import InputError, ModelCacheError


def builds(log: Path) -> int:
    return log.read_text().count("build") if log.exists() else 0


def test_two_processes_build_the_cache_once(tmp_path):
    log, results = tmp_path / "log", tmp_path / "results"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=build_in_child, args=(str(tmp_path), str(log), str(results))) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    folders = set(results.read_text().split())
    assert len(folders) == 1 and builds(log) == 1
    folder = Path(folders.pop())
    AutoModelForCausalLM.from_pretrained(folder)  # complete and loadable
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".tmp-")]  # no leftovers


def test_corrupt_or_partial_cache_is_rebuilt(tmp_path):
    log = tmp_path / "log"
    spec = fake_spec(log)
    folder = ensure_cached(spec, tmp_path)
    assert ensure_cached(spec, tmp_path) == folder and builds(log) == 1  # valid cache: reused

    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    ensure_cached(spec, tmp_path)
    assert builds(log) == 2
    AutoModelForCausalLM.from_pretrained(folder)

    (folder / "manifest.json").unlink()  # partial: the manifest is written last
    ensure_cached(spec, tmp_path)
    assert builds(log) == 3

    (folder / "manifest.json").write_text("{not json")
    ensure_cached(spec, tmp_path)
    assert builds(log) == 4


def test_failed_build_leaves_no_partial_cache(tmp_path):
    class Broken(EmbeddedModel):
        def convert(self, workdir, out):
            out.mkdir()
            (out / "half.bin").write_bytes(b"x")
            raise RuntimeError("disk full")

    spec = Broken("b", "b/b", "none", "", False, lambda d: d, "broken", n_layers=1)
    with pytest.raises(RuntimeError, match="disk full"):
        ensure_cached(spec, tmp_path)
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["broken.lock"]


def test_missing_package_names_the_install_command(tmp_path):
    def locate(workdir: Path) -> Path:
        return embedded._package_dir("not_a_pkg_zz", "pip install zz")

    spec = EmbeddedModel("x", "x/x", "not-a-pkg", "pip install zz", False, locate, "x", n_layers=1)
    with pytest.raises(ModelCacheError, match="pip install zz"):
        ensure_cached(spec, tmp_path)


def test_cache_root_honours_the_environment(tmp_cache):
    assert cache_root() == tmp_cache


def test_unknown_embedded_model():
    with pytest.raises(InputError, match="gemma-3-270m"):
        get_embedded("llama-70b")


def test_device_and_dtype_are_picked_automatically(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device_dtype() == (torch.device("cpu"), torch.float32)  # bf16 is slower on CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_device_dtype() == (torch.device("cuda"), torch.bfloat16)


def _fake_parts(root: Path, parts: list[bytes], prefix: str = "fakegguf_part") -> SplitGGUF:
    """Installed-looking packages `fakegguf_part1..N` under `root`, each holding data/partNN.bin."""
    for i, data in enumerate(parts, 1):
        (root / f"{prefix}{i}" / "data").mkdir(parents=True)
        (root / f"{prefix}{i}" / "data" / f"part{i:02d}.bin").write_bytes(data)
    whole = b"".join(parts)
    return SplitGGUF(prefix, "1.0", len(parts), len(whole), hashlib.sha256(whole).hexdigest(), "model.gguf")


PARTS = [b"GGUF" + bytes(range(256)) * 3, bytes(reversed(range(256))) * 2, b"tail"]


def test_split_gguf_assembles_its_parts_in_order(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    split = _fake_parts(tmp_path / "site", PARTS)
    importlib.invalidate_caches()
    (tmp_path / "work").mkdir()
    out = split.assemble(tmp_path / "work", "make parts")
    assert out.read_bytes() == b"".join(PARTS)
    assert split.requirements() == ["fakegguf_part1==1.0", "fakegguf_part2==1.0", "fakegguf_part3==1.0"]


def test_split_gguf_refuses_a_corrupt_or_missing_part(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    split = _fake_parts(tmp_path / "site", PARTS)
    importlib.invalidate_caches()
    work = tmp_path / "work"
    work.mkdir()
    part2 = tmp_path / "site" / "fakegguf_part2" / "data" / "part02.bin"
    part2.write_bytes(b"\0" + part2.read_bytes()[1:])  # same size, one byte changed
    with pytest.raises(ModelCacheError, match=r"a part is corrupt or of another version than 1\.0.*make parts"):
        split.assemble(work, "make parts")
    assert list(work.iterdir()) == []  # the wrong bytes are not left behind
    part2.unlink()
    with pytest.raises(ModelCacheError, match=r"part02\.bin is missing; reinstall with: make parts"):
        split.assemble(work, "make parts")
    part2.write_bytes(PARTS[1])
    missing = SplitGGUF("fakegguf_part", "1.0", 4, 1, "0" * 64, "model.gguf")  # a fourth package never installed
    with pytest.raises(ModelCacheError, match=r"'fakegguf_part4' is not installed; make parts"):
        missing.assemble(work, "make parts")


def test_the_qwen_entries_are_split_ggufs_with_an_install_target():
    """The registry's Qwen models: the sizes of the issue, pinned parts, and the make target pyproject installs."""
    pyproject = (Path(__file__).parent.parent / "pyproject.toml").read_text()
    for name, split, size in (
        ("qwen2.5-coder-1.5b-instruct", embedded.QWEN_1_5B_PARTS, 1_117_320_768),
        ("qwen2.5-coder-0.5b-instruct", embedded.QWEN_0_5B_PARTS, 491_400_064),
    ):
        spec = get_embedded(name)
        assert split.size == size and spec.chat and spec.cache_key.endswith(split.sha256[:8])
        assert all(f'"{req}"' in pyproject for req in split.requirements())
        assert "make qwen" in spec.install_hint
