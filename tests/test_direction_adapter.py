"""Direction adapters: file round trip, mismatch errors, training, and the engine applying them."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from sae_selfexplain_plugin import (
    AdapterMetadata,
    DirectionAdapter,
    GenerationRequest,
    Injection,
    InputError,
    SelfExplainConfig,
    SelfExplainer,
    render,
)
from sae_selfexplain_plugin.direction_adapter.training import LabelledDirections, TrainingSettings, train_adapter
from sae_selfexplain_plugin.formats import to_neuronpedia_line, validate
from sae_selfexplain_plugin.ops import patch_residual

ARCHITECTURES = [("scale", 0), ("scalar-affine", 0), ("scalar-affine-low-rank", 3)]


def template_for(slots: int) -> str:
    """The test template with a placeholder for each of `slots` (test-open has one, test-two two)."""
    return "test-two" if slots > 1 else "test-open"


def make_adapter(backend, architecture="scalar-affine", rank=0, seed=0, **changes) -> DirectionAdapter:
    """An adapter for `backend` with random (non-initial) weights; with slots, for the two-placeholder template."""
    fields = dict(
        model_id=backend.model_id, d_model=backend.d_model, source="blocks.2.hook_resid_post", layer=1,
        template=template_for(changes.get("slots", 1)), architecture=architecture, rank=rank,
    )  # fmt: skip
    adapter = DirectionAdapter(AdapterMetadata(**{**fields, **changes}), init_scale=5.0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 3)
    return adapter


def by_hand(backend, adapter, directions, scales, max_new_tokens, no_repeats=True):
    """The texts of injecting scale * adapter(unit direction) with a hand-built request, no engine (which,
    with an adapter, bans repeated word tokens by default)."""
    prompt = render(adapter.metadata.template, backend.tokenizer)
    unit = directions / directions.norm(dim=-1, keepdim=True)
    with torch.no_grad():
        vectors = torch.cat([adapter(unit) * s for s in scales])  # scale-major rows
    ids = torch.tensor([prompt.input_ids] * len(vectors))
    positions = torch.zeros_like(ids, dtype=torch.bool)
    positions[:, list(prompt.placeholder_positions)] = True
    request = GenerationRequest(
        ids, torch.ones_like(ids), Injection(1, positions, vectors), max_new_tokens, no_repeats=no_repeats
    )
    texts = [t.strip() for t in backend.generate(request).texts]
    n = len(directions)
    return [[texts[j * n + f] for j in range(len(scales))] for f in range(n)]


def engine_texts(backend, adapter, directions, scales, max_new_tokens):
    config = SelfExplainConfig(
        template=adapter.metadata.template, layer=1, adapter=adapter, adapter_scales=scales,
        max_new_tokens=max_new_tokens,
    )  # fmt: skip
    records = SelfExplainer(backend, config).explain(directions)
    return [[c.text for c in r.candidates] for r in records], records


@pytest.mark.parametrize(
    ("architecture", "rank", "slots"),
    [(a, r, 1) for a, r in ARCHITECTURES] + [("scalar-affine", 0, 2), ("scalar-affine-low-rank", 3, 2)],
)
def test_file_round_trip(tmp_path, gemma_backend, architecture, rank, slots):
    adapter = make_adapter(gemma_backend, architecture, rank, slots=slots)
    loaded = DirectionAdapter.load(adapter.save(tmp_path / "a.safetensors"))
    x = torch.randn(4, gemma_backend.d_model)
    assert torch.equal(adapter(x), loaded(x))
    assert adapter(x).shape == ((4, slots, gemma_backend.d_model) if slots > 1 else (4, gemma_backend.d_model))
    assert loaded.metadata == adapter.metadata
    assert loaded.fingerprint == adapter.fingerprint
    d = gemma_backend.d_model
    bias, low_rank = {"scale": (0, 0), "scalar-affine": (1, 0), "scalar-affine-low-rank": (1, 1)}[architecture]
    assert loaded.n_parameters == 1 + bias * slots * d + low_rank * (d * rank + slots * d * rank)


def test_slots_are_the_shared_part_plus_their_own(gemma_backend):
    adapter = make_adapter(gemma_backend, "scalar-affine-low-rank", 3, slots=2)
    x = torch.randn(5, gemma_backend.d_model)
    out = adapter(x)
    for k in range(2):  # s·x + (x U) V_kᵀ + b_k
        by_hand = adapter.scale * x + (x @ adapter.U) @ adapter.V[k].T + adapter.bias[k]
        assert torch.allclose(out[:, k], by_hand, atol=1e-5)
    assert not torch.allclose(out[:, 0], out[:, 1])
    with pytest.raises(InputError, match="slots must be >= 1"):
        make_adapter(gemma_backend, "scale", slots=2)
    with pytest.raises(InputError, match="slots must be >= 1"):
        make_adapter(gemma_backend, slots=0)


def test_patch_residual_writes_one_vector_per_slot():
    hidden = torch.randn(2, 6, 4)
    positions = torch.zeros(2, 6, dtype=torch.bool)
    positions[0, [1, 4]] = True
    positions[1, [2, 5]] = True  # rows differ, as left padding makes them
    vectors = torch.randn(2, 2, 4)
    for add in (False, True):
        out = patch_residual(hidden, positions, vectors, add)
        expected = hidden.clone()
        for b, where in enumerate(positions.nonzero()[:, 1].view(2, 2).tolist()):
            for k, t in enumerate(where):
                expected[b, t] = vectors[b, k] + (hidden[b, t] if add else 0)
        assert torch.equal(out, expected)
    # one vector per row goes to every placeholder of that row, as before
    assert torch.equal(patch_residual(hidden, positions, vectors[:, 0], False)[0, 4], vectors[0, 0])


def test_slotted_adapter_needs_that_many_placeholders(gemma_backend):
    adapter = make_adapter(gemma_backend, slots=3)
    with pytest.raises(InputError, match=r"3 slots .* template 'test-two' has 2; use slots=1 or slots=2\."):
        SelfExplainer(gemma_backend, SelfExplainConfig(template="test-two", layer=1, adapter=adapter))


def test_new_low_rank_adapter_is_its_scalar_affine_part(gemma_backend):
    meta = AdapterMetadata("m", gemma_backend.d_model, "s", 1, "test-open", "scalar-affine-low-rank", rank=2)
    x = torch.randn(3, gemma_backend.d_model)
    assert torch.allclose(DirectionAdapter(meta, init_scale=2.0)(x), 2.0 * x)


def test_low_rank_start_is_seeded(gemma_backend):
    meta = AdapterMetadata("m", gemma_backend.d_model, "s", 1, "test-open", "scalar-affine-low-rank", rank=2)
    torch.manual_seed(1)
    first = DirectionAdapter(meta, seed=3).U
    torch.manual_seed(2)  # the global RNG plays no part
    assert torch.equal(first, DirectionAdapter(meta, seed=3).U)
    assert not torch.equal(first, DirectionAdapter(meta, seed=4).U)


def test_damaged_and_foreign_files(tmp_path, gemma_backend):
    with pytest.raises(InputError, match="no adapter file"):
        DirectionAdapter.load(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(InputError, match="not a readable safetensors"):
        DirectionAdapter.load(junk)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(InputError, match="no adapter metadata"):
        DirectionAdapter.load(foreign)
    path = make_adapter(gemma_backend).save(tmp_path / "a.safetensors")
    rewrite_metadata(path, d_model=7)  # metadata no longer matches the weights
    with pytest.raises(InputError, match="do not match its metadata"):
        DirectionAdapter.load(path)


def rewrite_metadata(path, text=None, **changes):
    """Replace the adapter metadata in a saved file's header: with `text`, or the stored fields plus `changes`."""
    blob = path.read_bytes()
    end = 8 + int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:end])
    meta = json.loads(header["__metadata__"]["sae_selfexplain_adapter"])
    header["__metadata__"]["sae_selfexplain_adapter"] = text if text is not None else json.dumps({**meta, **changes})
    new_header = json.dumps(header).encode()
    path.write_bytes(len(new_header).to_bytes(8, "little") + new_header + blob[end:])


@pytest.mark.parametrize(
    ("text", "changes", "match"),
    [
        ("{not json", {}, "adapter metadata: malformed or truncated JSON"),
        ("[1]", {}, "adapter metadata: expected a JSON object, got list"),
        (None, {"d_model": "576"}, "field 'd_model' must be an integer >= 1, got '576' \\(str\\)"),
        (None, {"rank": "64"}, "field 'rank' must be an integer >= 0, got '64'"),
        (None, {"d_model": 1e11}, "field 'd_model' must be an integer >= 1, got 100000000000.0"),
        (None, {"layer": True}, "field 'layer' must be an integer >= 0, got True"),
        (None, {"template": 3}, "field 'template' must be a string"),
        (None, {"validation": {"loss": "low"}}, "field 'validation' must be an object of numbers"),
        (None, {"architecture": "mystery"}, "adapter metadata: unknown adapter architecture 'mystery'"),
        # sizes the file's tensors do not hold: refused before anything is allocated
        (None, {"d_model": 10**11}, r"d_model=100000000000, .* holds U \(64, 3\) \(needs \(100000000000, 3\)\)"),
        (None, {"rank": 10**9}, "do not match its metadata"),
        (None, {"slots": 10**9}, "do not match its metadata"),
    ],
)
def test_bad_adapter_metadata_names_the_file_and_field(tmp_path, gemma_backend, text, changes, match):
    path = make_adapter(gemma_backend, "scalar-affine-low-rank", 3).save(tmp_path / "a.safetensors")
    rewrite_metadata(path, text, **changes)
    with pytest.raises(InputError, match=match) as caught:
        DirectionAdapter.load(path)
    assert str(path) in str(caught.value)


def test_adapter_for_another_width_is_refused_before_it_is_built(tmp_path, gemma_backend):
    path = make_adapter(gemma_backend).save(tmp_path / "a.safetensors")
    with pytest.raises(InputError, match="field 'd_model' is 64, but the model's d_model is 32"):
        DirectionAdapter.load(path, d_model=32)
    config = SelfExplainConfig(template="test-open", layer=1, adapter=str(path))
    assert SelfExplainer(gemma_backend, config).adapter is not None  # the right width loads


def test_adapter_with_a_nan_weight_is_refused(tmp_path, gemma_backend):
    adapter = make_adapter(gemma_backend, "scalar-affine-low-rank", 3)
    with torch.no_grad():
        adapter.bias[5] = float("nan")
    path = adapter.save(tmp_path / "a.safetensors")
    with pytest.raises(InputError, match=f"{path}: tensor 'bias' holds 1 NaN or infinite values of 64"):
        DirectionAdapter.load(path)
    # in memory too: the engine refuses it rather than generating empty texts
    config = SelfExplainConfig(template="test-open", layer=1, adapter=adapter)
    with pytest.raises(InputError, match="the adapter: tensor 'bias' holds 1 NaN"):
        SelfExplainer(gemma_backend, config)
    with torch.no_grad():
        adapter.bias.zero_()
        adapter.U.fill_(float("inf"))
    with pytest.raises(InputError, match="tensor 'U' holds 192 NaN or infinite"):
        DirectionAdapter.load(adapter.save(path))


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"d_model": 32}, "d_model 32"),
        ({"model_id": "other/model"}, "model 'other/model'"),
        ({"layer": 2}, "injection layer 2 != 1"),
        ({"template": "identity"}, "template 'identity'"),
    ],
)
def test_mismatched_adapter_is_a_clear_error(gemma_backend, changes, match):
    adapter = DirectionAdapter(
        AdapterMetadata(
            **{
                **dict(model_id=gemma_backend.model_id, d_model=64, source="s", layer=1, template="test-open"),
                **changes,
            }
        )
    )
    with pytest.raises(InputError, match=match):
        SelfExplainer(gemma_backend, SelfExplainConfig(template="test-open", layer=1, adapter=adapter))


def test_bad_adapter_options(gemma_backend):
    with pytest.raises(InputError, match="adapter must be a DirectionAdapter"):
        SelfExplainConfig(adapter=3)
    with pytest.raises(InputError, match="adapter_scales is empty"):
        SelfExplainConfig(adapter_scales=())
    with pytest.raises(InputError, match="needs an adapter"):
        SelfExplainConfig(scale_mode="adapter")


SLOTS = pytest.mark.parametrize("slots", [1, 2])  # one vector for every placeholder, or one per placeholder


@SLOTS
def test_engine_applies_the_adapter_as_by_hand(backend, slots):
    adapter = make_adapter(backend, model_id=backend.model_id, slots=slots)
    d = torch.randn(3, backend.d_model, generator=torch.Generator().manual_seed(1)) * 7
    texts, records = engine_texts(backend, adapter, d, (1.0, 0.5), 5)
    assert texts == by_hand(backend, adapter, d, (1.0, 0.5), 5)
    assert len({t for row in texts for t in row}) > 1  # the vectors matter
    assert {c.scale_mode for r in records for c in r.candidates} == {"adapter"}
    # the pick is the adapter's own vector (x1), unless self-similarity flags the feature
    assert all(r.chosen.scale == 1.0 if r.chosen else "not_self_explainable" in r.flags for r in records)
    picked = next(r for r in records if r.chosen)
    assert validate(picked.to_dict(), "explanation-record") == []
    assert {c.adapter for r in records for c in r.candidates} == {adapter.fingerprint}
    line = to_neuronpedia_line(picked, "m", "s", "u1", None, None)
    assert line is not None and json.loads(line["notes"])["adapter"] == adapter.fingerprint


def test_adapter_enters_the_settings_hash_and_a_path_works(tmp_path, gemma_backend):
    adapter = make_adapter(gemma_backend)
    base = SelfExplainConfig(template="test-open", layer=1)
    plain = SelfExplainer(gemma_backend, base).settings_hash
    with_adapter = SelfExplainer(gemma_backend, base.replace(adapter=adapter)).settings_hash
    other = SelfExplainer(gemma_backend, base.replace(adapter=make_adapter(gemma_backend, seed=1))).settings_hash
    from_path = SelfExplainer(gemma_backend, base.replace(adapter=str(adapter.save(tmp_path / "a.safetensors"))))
    assert len({plain, with_adapter, other}) == 3
    assert from_path.settings_hash == with_adapter
    assert "adapter" not in base.to_dict()  # hashes without an adapter are unchanged


def test_no_repeats_defaults_to_on_with_an_adapter_and_enters_the_hash(gemma_backend):
    adapter = make_adapter(gemma_backend)
    base = SelfExplainConfig(template="test-open", layer=1)
    assert not base.bans_repeats and base.replace(no_repeats=True).bans_repeats
    assert base.replace(adapter=adapter).bans_repeats
    assert not base.replace(adapter=adapter, no_repeats=False).bans_repeats
    assert "no_repeats" not in base.to_dict()  # hashes without an adapter or the option are unchanged
    configs = [base, base.replace(no_repeats=True), base.replace(adapter=adapter),
               base.replace(adapter=adapter, no_repeats=False)]  # fmt: skip
    assert len({c.settings_hash() for c in configs}) == 4
    # the resolved value is stored, so reading a config back keeps its behaviour
    stored = base.replace(adapter=adapter).to_dict()
    assert stored["no_repeats"] is True and SelfExplainConfig.from_dict({**stored, "adapter": adapter}).bans_repeats
    with pytest.raises(InputError, match="no_repeats must be True, False or None"):
        SelfExplainConfig(no_repeats="yes")


@SLOTS
def test_training_lowers_validation_loss_and_resumes(tmp_path, gemma_backend, slots):
    template = template_for(slots)
    g = torch.Generator().manual_seed(0)
    words = ["cat", "dog", "sun", "tree"]
    centres = torch.randn(len(words), gemma_backend.d_model, generator=g)

    def data(n):
        rows = torch.arange(n) % len(words)
        return LabelledDirections(centres[rows] + 0.3 * torch.randn(n, gemma_backend.d_model, generator=g), [
            words[i] for i in rows.tolist()
        ])  # fmt: skip

    train, validation = data(32), data(8)
    prompt = render(template, gemma_backend.tokenizer)
    weights = [p.detach().clone() for p in gemma_backend.model.parameters()]
    settings = TrainingSettings(steps=20, batch_size=8, eval_every=10, patience=10, lr=0.05)
    adapter = DirectionAdapter(
        AdapterMetadata(
            gemma_backend.model_id,
            gemma_backend.d_model,
            "s",
            1,
            template,
            "scalar-affine-low-rank",
            rank=2,
            slots=slots,
        ),
        init_scale=5.0,
    )
    checkpoint = tmp_path / "ckpt.pt"
    first = train_adapter(adapter, gemma_backend, prompt, train, validation, settings, checkpoint=checkpoint)
    assert first.steps == 20 and checkpoint.is_file()
    resumed = train_adapter(
        adapter, gemma_backend, prompt, train, validation, settings.__class__(**{**settings.__dict__, "steps": 40}),
        checkpoint=checkpoint,
    )  # fmt: skip
    assert resumed.steps == 40 and [h["step"] for h in resumed.history] == [10, 20, 30, 40]
    assert resumed.best_validation_loss < resumed.initial_validation_loss
    assert resumed.initial_validation_loss == first.initial_validation_loss  # carried over, not re-measured
    # the model is untouched and trainable as before
    assert all(torch.equal(a, b) for a, b in zip(weights, gemma_backend.model.parameters()))
    assert all(p.requires_grad for p in gemma_backend.model.parameters())
