"""The demo SAE: its training script end to end on a tiny model, its activation examples, and loading errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import build_tokenizer, load_script, tiny_gemma
from sae_lens import SAE
from sae_selfexplain_plugin.adapters.backends.transformers import TransformersBackend
from sae_selfexplain_plugin.adapters.sae_lens import check_compatible, load_sae_folder
from safetensors.torch import load_file

from sae_selfexplain_plugin.activation_examples import EXAMPLES_FILE, ActivationExamples, score_split_path
from sae_selfexplain_plugin.errors import InputError
from sae_selfexplain_plugin.example_collector import ExampleCollector


def test_training_script_produces_a_loadable_sae(tiny_sae: Path) -> None:
    sae = SAE.load_from_disk(tiny_sae)
    meta = sae.cfg.metadata
    assert (sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.architecture()) == (64, 128, "topk")
    assert meta.hook_name == "blocks.1.hook_resid_post" and meta.hf_hook_name == "model.layers.1"
    assert meta.prepend_bos is True and meta.context_size == 32
    assert meta.neuronpedia_id == "tiny-model/1-selfexplain-res-1k"
    assert all(t.dtype == torch.float16 for t in load_file(tiny_sae / "sae_weights.safetensors").values())
    report = json.loads((tiny_sae / "training_report.json").read_text())
    for key in ("l0", "explained_variance", "dead_fraction", "ce_loss_recovered"):
        assert isinstance(report[key], float)
    assert 0 < report["l0"] <= 8
    assert report["explained_variance"] > 0.3  # a trained SAE reconstructs even a random model's residuals


def test_a_rerun_resumes_from_the_run_dir(tiny_sae: Path, tmp_path: Path) -> None:
    """The same command again reuses the rows and residual shards, and training resumed from its last
    checkpoint (three quarters of the way) ends with the same weights as the uninterrupted run."""
    root = tiny_sae.parent
    run = root / "run"
    shards = sorted((run / "residuals").iterdir())
    stamps = [p.stat().st_mtime_ns for p in shards]
    (checkpoints,) = run.glob("checkpoints-*")
    assert len([p for p in checkpoints.iterdir() if p.name.isdigit()]) == 3
    args = ["--model", str(root / "tiny-model"), "--corpus", str(root / "corpus.txt"), "--hook-layer", "1"]
    args += ["--tokens", "12000", "--held-tokens", "3000", "--context", "32", "--width", "128", "--k", "8"]
    args += ["--batch-size", "256", "--run-dir", str(run), "--checkpoints", "3", "--out", str(tmp_path / "again")]
    assert load_script("train_demo_sae").main(args) == 0
    assert [p.stat().st_mtime_ns for p in sorted((run / "residuals").iterdir())] == stamps  # not recomputed
    first, again = (
        load_file(tiny_sae / "sae_weights.safetensors"),
        load_file(tmp_path / "again" / "sae_weights.safetensors"),
    )
    assert all(torch.equal(first[k], again[k]) for k in first)
    with pytest.raises(SystemExit, match="holds a run with other settings"):
        load_script("train_demo_sae").main([*args[:-1], str(tmp_path / "x"), "--context", "16"])


def test_activation_examples_hold_the_features_peaks(tiny_sae: Path) -> None:
    examples = ActivationExamples.load(tiny_sae / EXAMPLES_FILE)
    assert examples.d_sae == 128
    live = examples.live_features()
    assert len(live) > 64
    feature = examples[live[0]]
    assert feature.top and all(len(c.tokens) == len(c.values) == 24 for c in feature.top)
    peaks = [c.max_value for c in feature.top]
    assert peaks == sorted(peaks, reverse=True) and peaks[0] > 0
    assert all(c.max_value == 0 for c in feature.random)
    assert feature.top_tokens() and all(isinstance(t, str) for t in feature.top_tokens())
    score = ActivationExamples.load(score_split_path(tiny_sae / EXAMPLES_FILE))  # the held-out split beside it
    assert score.sae == examples.sae and score.live_features()
    assert {c.text for c in examples[live[0]].top}.isdisjoint(c.text for c in score[live[0]].top)  # other documents


def test_collector_keeps_the_true_top_contexts() -> None:
    """Streaming top-k equals the top-k computed on all data at once."""
    g = torch.Generator().manual_seed(1)
    acts = torch.relu(torch.randn(40, 30, 6, generator=g) - 1.5)
    ids = torch.randint(0, 50, (40, 30), generator=g)
    collector = ExampleCollector(6, top_k=3, window=8, n_random=4, pool_size=20)
    for i in range(0, 40, 7):
        collector.add(ids[i : i + 7], acts[i : i + 7])
    examples = collector.finish(str)
    peaks = acts.max(dim=1).values  # [rows, features]
    for f in range(6):
        expected = peaks[:, f].topk(3).values
        got = [c.max_value for c in examples[f].top]
        assert got == pytest.approx(expected[expected > 0].tolist(), abs=1e-3)
        row = int(peaks[:, f].argmax())
        assert examples[f].top[0].text in "".join(str(int(t)) for t in ids[row])
    assert collector.dead_fraction() == float((acts.amax((0, 1)) == 0).float().mean())


def test_examples_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no activation examples"):
        ActivationExamples.load(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(InputError, match="not a readable"):
        ActivationExamples.load(bad)
    with pytest.raises(InputError, match="no text"):
        ExampleCollector(4).finish(str)


def test_corrupt_or_truncated_weights_are_named(tiny_sae: Path, tmp_path: Path) -> None:
    folder = tmp_path / "sae"
    shutil.copytree(tiny_sae, folder)
    weights = folder / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(InputError, match="corrupt or truncated"):
        load_sae_folder(folder)
    weights.write_bytes(b"garbage")
    with pytest.raises(InputError, match="corrupt or truncated"):
        load_sae_folder(folder)


def test_cfg_that_does_not_match_the_weights_or_the_model(tiny_sae: Path, tmp_path: Path) -> None:
    folder = tmp_path / "sae"
    shutil.copytree(tiny_sae, folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "d_in": 96}))
    with pytest.raises(InputError, match="d_in=96"):
        load_sae_folder(folder)
    (folder / "cfg.json").write_text("{")
    with pytest.raises(InputError, match="not a valid SAE config"):
        load_sae_folder(folder)


def test_sae_of_another_width_than_the_model(tiny_sae: Path) -> None:
    tok = build_tokenizer()
    narrow = TransformersBackend(tiny_gemma(len(tok), hidden_size=32), tok)
    with pytest.raises(InputError, match="decoder width 64 != the model's d_model 32"):
        check_compatible(load_sae_folder(tiny_sae), narrow)


def test_the_demo_explains_the_1_5b_model_where_installed_else_says_why(monkeypatch) -> None:
    from sae_selfexplain_plugin.adapters.apps import demo_sae
    from sae_selfexplain_plugin.adapters.backends.embedded import DEFAULT_MODEL, QWEN_1_5B

    monkeypatch.setattr(type(QWEN_1_5B), "installed", lambda self: True)
    assert demo_sae.demo_model(None) == (QWEN_1_5B.name, None)
    monkeypatch.setattr(type(QWEN_1_5B), "installed", lambda self: False)
    model, why = demo_sae.demo_model(None)
    assert model == DEFAULT_MODEL and why and "make qwen-1.5b" in why
    assert demo_sae.demo_model("smollm2-135m-instruct") == ("smollm2-135m-instruct", None)
    with pytest.raises(InputError, match="no demo SAE ships for 'gemma-3-270m'"):
        demo_sae.demo_sae_dir("gemma-3-270m")
    for model, folder in demo_sae.DEMO_SAES.items():  # every listed SAE ships, with both example splits
        assert (folder / "sae_weights.safetensors").is_file() and (folder / "cfg.json").is_file(), model
        assert score_split_path(folder / EXAMPLES_FILE).is_file(), model
        assert sum(f.stat().st_size for f in folder.iterdir()) < 70e6, model  # fp16 weights, uint16 token ids
