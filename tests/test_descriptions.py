"""Teacher descriptions of SAE latents (`describe`, apps/descriptions.py) and adapters trained on them, on the
tiny SAE and model."""

from __future__ import annotations

import json

import pytest
from sae_selfexplain_plugin.adapters.apps import autointerp
from sae_selfexplain_plugin.adapters.apps.descriptions import (
    describe_latents,
    descriptions_header,
    is_token_list,
    read_descriptions,
    usable_description,
)
from sae_selfexplain_plugin.adapters.apps.sae_latent import token_latents
from sae_selfexplain_plugin.adapters.apps.train_direction_adapter import latent_directions
from sae_selfexplain_plugin.adapters.backends import load_model
from sae_selfexplain_plugin.adapters.cli import main
from sae_selfexplain_plugin.adapters.sae_lens import load_sae, sae_identity

from sae_selfexplain_plugin import DirectionAdapter
from sae_selfexplain_plugin.activation_examples import EXAMPLES_FILE, ActivationExamples
from sae_selfexplain_plugin.errors import InputError


@pytest.mark.parametrize(
    ("text", "listed", "usable"),
    [
        ("database, database, db, sqlite, SQL", True, False),
        (",, ,, ,,", True, False),
        ("", False, False),
        ("cats", False, False),
        ("words about cats and other pets", False, True),
        ("the word 'idea', as in plans, thoughts, or suggestions", False, True),
        ("ideas, plans, thoughts", True, False),
        ("numbers in a list, such as 1, 2 and 3", False, True),
    ],
)
def test_token_lists_are_told_from_descriptions(text, listed, usable):
    assert is_token_list(text) is listed and usable_description(text) is usable


@pytest.fixture
def tiny(tiny_sae):
    sae, _ = load_sae(str(tiny_sae))
    return sae, load_model(str(tiny_sae.parent / "tiny-model")), ActivationExamples.load(tiny_sae / EXAMPLES_FILE)


def test_describe_writes_batch_by_batch_and_resumes_after_a_cut_line(tiny, tmp_path, monkeypatch):
    sae, backend, examples = tiny
    latents = examples.live_features()[:6]
    out = tmp_path / "d.jsonl"
    header = descriptions_header(sae_identity(sae), backend.model_id)
    first = describe_latents(backend, examples, latents, out, header, batch_size=4)
    assert sorted(first) == sorted(latents)
    lines = out.read_text().splitlines()
    assert json.loads(lines[0])["explainer"] == backend.model_id and len(lines) == 7
    # a crash mid-line: the last latent's line is half written
    out.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:10])
    asked: list[list[int]] = []
    real = autointerp.autointerp_labels
    monkeypatch.setattr(
        autointerp,
        "autointerp_labels",
        lambda b, e, features, **k: asked.append(list(features)) or real(b, e, features, **k),
    )
    again = describe_latents(backend, examples, latents, out, header, resume=True, batch_size=4)
    assert asked == [[latents[-1]]]  # only the cut latent is described again
    assert again == first and len(out.read_text().splitlines()) == 7
    with pytest.raises(InputError, match="exists: pass --resume"):
        describe_latents(backend, examples, latents, out, header)
    with pytest.raises(InputError, match="written with explainer"):
        describe_latents(backend, examples, latents, out, {**header, "explainer": "other/model"}, resume=True)
    other_sae = {**header["sae"], "fingerprint": "0" * 16}
    with pytest.raises(InputError, match=r"belong to .* not to"):
        read_descriptions(out, sae=other_sae)
    notes = tmp_path / "notes.jsonl"
    notes.write_text('{"feature": 1}\n')
    with pytest.raises(InputError, match="not a descriptions file"):
        read_descriptions(notes)


def _descriptions_file(tiny, path, texts):
    sae = tiny[0]
    lines = [json.dumps(descriptions_header(sae_identity(sae), "teacher/model"))]
    lines += [json.dumps({"feature": f, "description": t}) for f, t in texts.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_latents_train_on_usable_descriptions_and_mixed_keeps_token_features_words(tiny, tmp_path):
    sae, _, examples = tiny
    live = [f for f in examples.live_features() if f >= 64]
    texts = {f: f"things of kind {f}" for f in live[:6]}
    texts[live[0]] = "a, b, c, d"  # a token list: left out
    data = latent_directions(sae, examples, range(64, 128), "descriptions", descriptions=texts)
    assert sorted(data.labels) == sorted(t for f, t in texts.items() if f != live[0])
    words = dict(token_latents(examples, range(64, 128), 5))
    mixed = latent_directions(sae, examples, range(64, 128), "mixed", descriptions=texts)
    assert set(words.values()) <= set(mixed.labels)  # token features: their word
    with pytest.raises(InputError, match="needs the descriptions"):
        latent_directions(sae, examples, range(64, 128), "descriptions")


def test_train_adapter_on_descriptions_records_them(tiny, tiny_sae, tmp_path, capsys):
    _, _, examples = tiny
    live = [f for f in examples.live_features() if f >= 64]
    path = _descriptions_file(tiny, tmp_path / "teacher.jsonl", {f: f"texts about topic {f}" for f in live[:8]})
    out = tmp_path / "adapter.safetensors"
    args = ["train-adapter", "--sae", str(tiny_sae), "--model", str(tiny_sae.parent / "tiny-model"), "--out", str(out)]
    args += ["--template", "test-open", "--layer", "1", "--steps", "4", "--eval-every", "2", "--batch-size", "4"]
    args += ["--words", "8", "--held-out", "64", "--latent-labels", "descriptions"]
    assert main(args) == 2
    assert "needs the descriptions" in capsys.readouterr().err
    assert main([*args, "--descriptions", str(path)]) == 0
    meta = DirectionAdapter.load(out).metadata
    assert "teacher.jsonl" in meta.trained_on and "teacher/model" in meta.trained_on
    assert "descriptions" in meta.trained_on and meta.trained_latents == [[64, 127]]
    assert main([*args, "--descriptions", str(path), "--out", str(path)]) == 2  # would overwrite its input
    assert "same file as --descriptions" in capsys.readouterr().err


def test_describe_command_resumes(tiny_sae, tmp_path, capsys):
    out = tmp_path / "d.jsonl"
    args = ["describe", "--sae", str(tiny_sae), "--explainer", str(tiny_sae.parent / "tiny-model")]
    args += ["--latents", "0-7", "--out", str(out)]
    assert main(args) == 0
    assert "8 latents described" in capsys.readouterr().out
    assert main(args) == 2 and "pass --resume" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0
    header, texts = read_descriptions(out)
    assert header["split"] == "explain" and sorted(texts) == list(range(8))  # "" where a latent has no contexts
