"""Resume checkpoints are never unpickled: `contexts --resume` and `train-adapter --resume` read safetensors with
JSON, checked against the run, and a planted pickle runs no code; nothing in the package unpickles at all."""

from __future__ import annotations

import pickle
import re
import shutil
from pathlib import Path

import torch
from sae_selfexplain_plugin.adapters.apps.train_direction_adapter import train_for_sae
from sae_selfexplain_plugin.adapters.backends import load_model
from sae_selfexplain_plugin.adapters.cli import main
from sae_selfexplain_plugin.adapters.sae_lens import load_sae

from sae_selfexplain_plugin import SelfExplainConfig
from sae_selfexplain_plugin.activation_examples import EXAMPLES_FILE, ActivationExamples
from sae_selfexplain_plugin.direction_adapter.training import TrainingSettings

PACKAGE_DIRS = ("sae_selfexplain_plugin", "adapters")
UNPICKLING = re.compile(r"weights_only\s*=\s*False|^\s*import\s+(c?pickle|dill|joblib)\b|\b(c?pickle|dill)\.", re.M)


class _Plant:
    """Unpickling this creates `marker`: what a hostile checkpoint could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def plant_pickle(path: Path, marker: Path) -> None:
    """Write a torch.save pickle at `path` whose loading creates `marker`, after checking that it does."""
    torch.save({"collector": _Plant(marker), "rows": 1}, path)
    probe = path.with_name(path.name + ".probe")
    shutil.copy(path, probe)
    torch.load(probe, weights_only=False)  # the danger is real: the old loader would have run it
    assert marker.exists()
    marker.unlink()
    probe.unlink()


def test_a_planted_pickle_training_checkpoint_runs_no_code(tiny_sae, tmp_path, capsys):
    out = tmp_path / "adapter.safetensors"
    marker = tmp_path / "pwned"
    plant_pickle(out.with_suffix(".safetensors.ckpt"), marker)
    argv = ["train-adapter", "--sae", str(tiny_sae), "--model", str(tiny_sae.parent / "tiny-model"), "--out", str(out),
            "--template", "test-open", "--layer", "1", "--steps", "4", "--eval-every", "2", "--batch-size", "4",
            "--words", "12", "--held-out", "64", "--resume"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr()
    [line] = [x for x in (err.out + err.err).splitlines() if "error" in x.lower()]  # beside model-loading bars
    assert line.startswith("error: ") and "not a readable resume checkpoint" in line
    assert "to start over" in line and "Traceback" not in err.out + err.err
    assert not marker.exists() and not out.exists()


def test_a_training_resume_checks_the_checkpoint_was_made_by_this_run(tiny_sae, tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    out = tmp_path / "adapter.safetensors"
    ckpt = out.with_suffix(".safetensors.ckpt")
    argv = ["train-adapter", "--sae", str(tiny_sae), "--model", str(tiny_sae.parent / "tiny-model"), "--out", str(out),
            "--template", "test-open", "--layer", "1", "--eval-every", "2", "--batch-size", "4", "--words", "12",
            "--held-out", "64"]  # fmt: skip
    assert main([*argv, "--steps", "4"]) == 0
    finished = out.read_bytes()
    # the checkpoint an interrupted run of the same command leaves (the library keeps it; the CLI deletes it)
    sae, _ = load_sae(str(tiny_sae))
    backend = load_model(str(tiny_sae.parent / "tiny-model"))
    examples = ActivationExamples.load(tiny_sae / EXAMPLES_FILE)
    settings = TrainingSettings(steps=2, batch_size=4, eval_every=2)
    config = SelfExplainConfig(layer=1, template="test-open")
    kept = tmp_path / "kept.ckpt"
    train_for_sae(sae, backend, examples, tmp_path / "a.safetensors", config=config, n_words=12, held_out=64,
                  settings=settings, checkpoint=kept)  # fmt: skip
    good = {k: v.clone() for k, v in load_file(tmp_path / "kept.ckpt").items()}
    with safe_open(str(tmp_path / "kept.ckpt"), framework="pt") as f:
        meta = f.metadata()
    capsys.readouterr()
    cases = [
        (lambda: shutil.copy(tmp_path / "kept.ckpt", ckpt), ["--lr", "0.5"], "field 'settings.lr' is 0.02 in the "
         "checkpoint but 0.5 in this run"),
        (lambda: shutil.copy(tmp_path / "kept.ckpt", ckpt), ["--held-out", "70"], "field 'adapter.trained_latents' is "
         r"\[\[64, 127\]\] in the checkpoint but \[\[70, 127\]\] in this run"),
        (lambda: shutil.copy(tmp_path / "kept.ckpt", ckpt), ["--steps", "1"], "field 'state.step' is 2: the "
         "checkpoint has trained more steps than this run's 1; pass --steps 2 or more"),
        (lambda: save_file({k: v for k, v in good.items() if k != "adapter.scale"}, ckpt, metadata=meta), [],
         "tensor 'adapter.scale' is missing"),
        (lambda: save_file({**good, "best.bias": torch.zeros(2)}, ckpt, metadata=meta), [],
         r"tensor 'best.bias' is \(2,\) torch.float32, expected \[64\] torch.float32"),
        (lambda: save_file({"w": torch.zeros(1)}, ckpt, metadata={"format": "pt"}), [], "field 'format' is 'pt'"),
        (lambda: ckpt.write_bytes(b"earlier run"), [], "is not a readable resume checkpoint"),
    ]  # fmt: skip
    for plant, extra, message in cases:
        plant()
        assert main([*argv, "--steps", "2", "--resume", *extra]) == 2
        err = capsys.readouterr()
        [line] = [x for x in (err.out + err.err).splitlines() if "error" in x.lower()]
        assert re.search(rf"^error: {re.escape(str(ckpt))}:? .*{message}.*delete {re.escape(str(ckpt))} to start over",
                         line), line  # fmt: skip
        assert out.read_bytes() == finished  # the earlier output is untouched
    # the checkpoint of this very run resumes
    shutil.copy(tmp_path / "kept.ckpt", ckpt)
    assert main([*argv, "--steps", "4", "--resume"]) == 0 and not ckpt.exists()


def _unpickling_lines(root: Path) -> tuple[int, list[str]]:
    files = [p for d in PACKAGE_DIRS for p in sorted((root / d).rglob("*.py"))]
    found = [f"{p}:{m.group(0)}" for p in files for m in UNPICKLING.finditer(p.read_text(encoding="utf-8"))]
    return len(files), found


def test_nothing_in_the_package_unpickles(tmp_path):
    root = Path(__file__).resolve().parents[1]
    scanned, found = _unpickling_lines(root)
    assert scanned > 20 and found == []
    # the check can fail: a copy with planted uses is caught, each of them
    for d in PACKAGE_DIRS:
        shutil.copytree(root / d, tmp_path / d, ignore=shutil.ignore_patterns("__pycache__", "data"))
    planted = ["state = torch.load(path, weights_only=False)", "import pickle", "obj = pickle.loads(blob)"]
    (tmp_path / "adapters" / "planted.py").write_text("\n".join(planted) + "\n")
    assert len(_unpickling_lines(tmp_path)[1]) == 3
    assert pickle  # this test module itself may use pickle: it plants the hostile files
