from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from sae_selfexplain_plugin import (
    FeatureExplanations,
    GenerationRequest,
    Injection,
    InputError,
    PromptTemplate,
    SelfExplainConfig,
    SelfExplainer,
    TemplateError,
    register_template,
    render,
)
from sae_selfexplain_plugin.backend import left_pad, position_ids
from sae_selfexplain_plugin.decoding import cut_at_stop, decode, finish_rows, word_tokens

CFG = SelfExplainConfig(template="test-open", scales=(0.0, 1.0, 4.0), max_new_tokens=6)


def directions(backend, n=3, seed=1):
    return torch.randn(n, backend.d_model, generator=torch.Generator().manual_seed(seed))


def request_for(backend, prompts, vectors, max_new_tokens=6, temperature=0.0, seed=0, mode="replace"):
    """A GenerationRequest over rendered prompts of possibly different lengths (left-padded)."""
    ids, mask = left_pad([p.input_ids for p in prompts], backend.tokenizer.pad_token_id)
    positions = torch.zeros_like(ids, dtype=torch.bool)
    for row, p in enumerate(prompts):
        offset = ids.shape[1] - len(p.input_ids)
        positions[row, [offset + i for i in p.placeholder_positions]] = True
    inj = Injection(1, positions, vectors, mode)
    return GenerationRequest(ids, mask, inj, max_new_tokens, prompts[0].stop_strings, temperature, seed)


def test_injection_changes_the_output(backend):
    ex = SelfExplainer(backend, CFG.replace(scales=(0.0, 8.0)))
    records = ex.explain(directions(backend, 4))
    texts_zero = [r.candidates[0].text for r in records]
    texts_big = [r.candidates[1].text for r in records]
    assert texts_zero[0] == texts_zero[1]  # scale 0 writes the same zero vector for every feature
    assert texts_big != texts_zero


def test_injection_reaches_the_residual_only_at_the_placeholder(backend):
    prompt = render("definition", backend.tokenizer)
    ids = torch.tensor([prompt.input_ids])
    mask = torch.ones_like(ids)
    vec = torch.randn(1, backend.d_model) * 10
    positions = torch.zeros_like(ids, dtype=torch.bool)
    positions[0, list(prompt.placeholder_positions)] = True
    clean = backend.residual(ids, mask, 2)
    with backend.injecting(Injection(1, positions, vec)):
        patched = backend.residual(ids, mask, 2)
    changed = (patched - clean).abs().amax(-1)[0] > 1e-4
    first = prompt.placeholder_positions[0]
    assert not changed[:first].any()  # causal: nothing before the placeholder moves
    assert changed[first]


def test_replace_and_add_semantics():
    hidden = torch.ones(1, 3, 2)
    positions = torch.tensor([[False, True, False]])
    vec = torch.tensor([[5.0, 7.0]])
    assert Injection(0, positions, vec, "replace").apply(hidden)[0].tolist() == [[1, 1], [5, 7], [1, 1]]
    assert Injection(0, positions, vec, "add").apply(hidden)[0].tolist() == [[1, 1], [6, 8], [1, 1]]


def naive_greedy(backend, prompt, vector, max_new_tokens):
    """Reference: no KV cache, the whole sequence recomputed each step with the placeholder patched."""
    ids = list(prompt.input_ids)
    generated = []
    for _ in range(max_new_tokens):
        x = torch.tensor([ids])
        positions = torch.zeros_like(x, dtype=torch.bool)
        positions[0, list(prompt.placeholder_positions)] = True
        with backend.injecting(Injection(1, positions, vector[None])), torch.no_grad():
            logits = backend.model(input_ids=x).logits[0, -1]
        nxt = int(logits.argmax())
        if nxt in backend.eos_token_ids:
            break
        generated.append(nxt)
        ids.append(nxt)
    return backend.tokenizer.decode(generated, skip_special_tokens=True)


def test_cached_decoding_equals_full_recompute(backend):
    prompt = render("test-open", backend.tokenizer)
    vecs = directions(backend, 3) * 20
    result = backend.generate(request_for(backend, [prompt] * 3, vecs, max_new_tokens=8))
    assert result.texts == [naive_greedy(backend, prompt, v, 8) for v in vecs]


def test_batched_equals_unbatched_with_left_padding(backend):
    short = PromptTemplate(name="test-open-short", description="", text="X:", stop_strings=())
    prompts = [render("test-open", backend.tokenizer), render(short, backend.tokenizer)] * 2
    assert len({len(p.input_ids) for p in prompts}) == 2  # rows really need padding
    vecs = directions(backend, 4) * 20
    batched = backend.generate(request_for(backend, prompts, vecs, max_new_tokens=8))
    single = [backend.generate(request_for(backend, [p], v[None], max_new_tokens=8)) for p, v in zip(prompts, vecs)]
    assert batched.texts == [s.texts[0] for s in single]
    assert batched.tokens == [s.tokens[0] for s in single]
    assert batched.stop_reasons == [s.stop_reasons[0] for s in single]


def test_engine_batch_size_does_not_change_greedy_results(backend):
    d = directions(backend, 3)
    small = SelfExplainer(backend, CFG.replace(batch_size=2)).explain(d)
    large = SelfExplainer(backend, CFG.replace(batch_size=64)).explain(d)
    assert [c.text for r in small for c in r.candidates] == [c.text for r in large for c in r.candidates]


def test_records_hold_every_scale_and_the_choice(gemma_backend):
    cfg = CFG.replace(scales=(1.0, 3.0, 5.0), chosen_scale=3.2)
    records = SelfExplainer(gemma_backend, cfg).explain(directions(gemma_backend, 2), feature_ids=[10, 42])
    assert [r.feature_id for r in records] == [10, 42]
    for r in records:
        assert [c.scale for c in r.candidates] == [1.0, 3.0, 5.0]
        assert r.chosen is not None and r.chosen.scale == 3.0
        assert {c.template for c in r.candidates} == {"test-open"}
        assert r.settings_hash and r.model_id == "tiny-gemma3"


def test_json_round_trip(gemma_backend):
    (record,) = SelfExplainer(gemma_backend, CFG).explain(directions(gemma_backend, 1))
    again = FeatureExplanations.from_json(record.to_json())
    assert again == record
    with pytest.raises(InputError, match="JSON"):
        FeatureExplanations.from_json('{"feature_id": 1, "candi')
    with pytest.raises(InputError, match="lacks required keys"):
        FeatureExplanations.from_json('{"feature_id": 1}')


def test_sampling_is_seeded(gemma_backend):
    cfg = CFG.replace(temperature=1.0, n_samples=3, scales=(2.0,), max_new_tokens=8)
    d = directions(gemma_backend, 2)
    a = SelfExplainer(gemma_backend, cfg).explain(d)
    b = SelfExplainer(gemma_backend, cfg).explain(d)
    c = SelfExplainer(gemma_backend, cfg.replace(seed=7)).explain(d)
    texts = lambda rs: [x.text for r in rs for x in r.candidates]  # noqa: E731
    assert texts(a) == texts(b)
    assert texts(a) != texts(c)
    assert [x.sample for x in a[0].candidates] == [0, 1, 2]


def test_reference_norm_is_the_median_over_non_special_positions(gemma_backend):
    ex = SelfExplainer(gemma_backend, CFG)
    ids = torch.tensor([ex.prompt.input_ids])
    norms = gemma_backend.residual(ids, torch.ones_like(ids), CFG.layer)[0].norm(dim=-1)
    assert math.isclose(ex.reference_norm, float(norms[1:].median()), rel_tol=1e-5)  # position 0 is BOS


def test_relative_and_absolute_scales(gemma_backend):
    d = directions(gemma_backend, 2)
    rel = SelfExplainer(gemma_backend, CFG)
    absolute = SelfExplainer(gemma_backend, CFG.replace(scale_mode="absolute"))
    s = torch.tensor([2.0, 3.0])
    assert torch.allclose(absolute.injected_vectors(d, s).norm(dim=-1), s)
    assert torch.allclose(rel.injected_vectors(d, s).norm(dim=-1), s * rel.reference_norm)


def test_stop_strings_cut_the_text():
    assert cut_at_stop('a fruit". More', ('"', "\n")) == ("a fruit", True)
    assert cut_at_stop("no stop", ('"',)) == ("no stop", False)
    assert cut_at_stop('a\nb"c', ('"', "\n")) == ("a", True)


def test_position_ids_ignore_left_padding():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert position_ids(mask).tolist() == [[0, 1, 2], [0, 0, 0]]


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (torch.randn(2, 17), "direction dimension 17"),
        (torch.tensor([[float("nan")] * 64]), "NaN or inf"),
        (torch.zeros(0, 64), "empty"),
        (torch.zeros(1, 64), "all zeros"),
        (torch.randn(2, 3, 64), "shape"),
        (torch.randn(1, 64, dtype=torch.complex64), "real numbers"),
        (torch.empty(1, 64, device="meta"), "meta device"),
    ],
)
def test_bad_directions(gemma_backend, bad, match):
    with pytest.raises(InputError, match=match):
        SelfExplainer(gemma_backend, CFG).explain(bad)


def test_bad_rows_are_named_by_feature_id(gemma_backend):
    d = directions(gemma_backend, 3)
    d[1] = float("inf")
    d[2] = 0.0
    with pytest.raises(InputError, match=r"feature 11: NaN or inf values; feature 12: all zeros"):
        SelfExplainer(gemma_backend, CFG).explain(d, feature_ids=[10, 11, 12])


@pytest.mark.parametrize(("ids", "match"), [([-1], ">= 0"), ([1.7], "integers"), ([True], "integers"),
                                            (["3"], "integers"), (torch.tensor([1.0]), "integers")])  # fmt: skip
def test_feature_ids_are_not_coerced(gemma_backend, ids, match):
    with pytest.raises(InputError, match=match):
        SelfExplainer(gemma_backend, CFG).explain(directions(gemma_backend, 1), feature_ids=ids)


def test_feature_ids_must_match(gemma_backend):
    with pytest.raises(InputError, match="one id per row"):
        SelfExplainer(gemma_backend, CFG).explain(directions(gemma_backend, 2), feature_ids=[1])


def test_layer_out_of_range(gemma_backend):
    with pytest.raises(InputError, match=r"layer 4 is out of range.*0\.\.3"):
        SelfExplainer(gemma_backend, CFG.replace(layer=4))


def test_a_prompt_past_the_model_context_is_an_error(tokenizer):
    from conftest import tiny_gemma
    from sae_selfexplain_plugin.adapters.backends.transformers import TransformersBackend

    model = tiny_gemma(len(tokenizer))
    model.config.max_position_embeddings = 64
    backend = TransformersBackend(model, tokenizer, model_id="tiny-64")
    register_template(
        PromptTemplate(name="test-long", description="tests only", text="cat " * 57 + "X"), overwrite=True
    )
    n = len(render("test-long", tokenizer).input_ids)
    assert n < 64 < n + CFG.max_new_tokens  # the prompt alone fits; with its budget it does not
    with pytest.raises(
        InputError,
        match=rf"template 'test-long' renders to {n} tokens, which with max_new_tokens=6 makes {n + 6}, past the "
        "64-token context of tiny-64; shorten the template or lower max_new_tokens",
    ):
        SelfExplainer(backend, CFG.replace(template="test-long")).explain(directions(backend, 1))
    # exactly the context runs, to the last generated token
    fits = 64 - len(render("test-open", tokenizer).input_ids)
    config = CFG.replace(max_new_tokens=fits, scales=(1.0,))
    (record,) = SelfExplainer(backend, config).explain(directions(backend, 1))
    assert record.candidates[0].stop_reason == "length"


def test_generation_budget_past_the_context_is_an_error(backend):
    limit = backend.model.config.max_position_embeddings  # GPT-2's n_positions
    with pytest.raises(InputError, match=rf"max_new_tokens=1000 makes \d+, past the {limit}-token context"):
        SelfExplainer(backend, CFG.replace(max_new_tokens=1000)).explain(directions(backend, 1))


def test_unknown_template(gemma_backend):
    with pytest.raises(TemplateError, match="unknown template"):
        SelfExplainer(gemma_backend, CFG.replace(template="nope")).explain(directions(gemma_backend, 1))


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"scales": (1.0, -2.0)}, "negative scale"),
        ({"scales": ()}, "scales is empty"),
        ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
        ({"n_samples": 2}, "temperature > 0"),
        ({"injection": "multiply"}, "injection must be"),
        ({"scale_mode": "percent"}, "scale_mode must be"),
        ({"layer": -1}, "layer must be >= 0"),
        ({"scales": (1.0, 1e38)}, r"above 1e\+06"),
    ],
)
def test_bad_config(changes, match):
    with pytest.raises(InputError, match=match):
        SelfExplainConfig(**changes)


def test_config_round_trip_and_hash():
    cfg = SelfExplainConfig(scales=(1, 2), template="identity")
    assert SelfExplainConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.settings_hash() != cfg.replace(layer=3).settings_hash()
    assert cfg.settings_hash() == cfg.replace(batch_size=7).settings_hash()  # grouping, not output
    with pytest.raises(InputError, match="unknown SelfExplainConfig keys"):
        SelfExplainConfig.from_dict({"scale": [1]})


class ScriptedModel:
    """A StepModel whose row b emits script[b] token by token; records which rows stay in the batch."""

    def __init__(self, scripts, vocab=50):
        self.scripts, self.vocab, self.batches = scripts, vocab, []

    def _logits(self, rows, step):
        self.batches.append(list(rows))
        out = torch.zeros(len(rows), self.vocab)
        for i, r in enumerate(rows):
            out[i, self.scripts[r][step]] = 1.0
        return out

    def prefill(self, input_ids, attention_mask, injection):
        return self._logits(range(len(input_ids)), 0), {"rows": list(range(len(input_ids))), "step": 0}

    def step(self, token_ids, attention_mask, cache):
        assert attention_mask.shape[0] == len(token_ids) == len(cache["rows"])
        cache = {**cache, "step": cache["step"] + 1}
        return self._logits(cache["rows"], cache["step"]), cache

    def select_rows(self, cache, rows):
        return {**cache, "rows": [cache["rows"][i] for i in rows.tolist()]}


class CharTokenizer:
    """Token i decodes to chars[i]."""

    chars = 'abcdefgh"\n'

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.chars[i] for i in ids)


def test_rows_stop_at_stop_strings_and_eos_and_leave_the_batch():
    quote, newline, eos = 8, 9, 7
    scripts = [
        [0, 1, quote, 2, 2, 2],  # "ab" then a stop string
        [0, eos, 2, 2, 2, 2],  # "a" then EOS
        [2, 2, 2, 2, 2, 2],  # runs to the length limit
        [3, newline, 2, 2, 2, 2],  # "d" then the other stop string
    ]
    model = ScriptedModel(scripts)
    ids, mask = left_pad([[1, 2]] * 4, 0)
    req = GenerationRequest(ids, mask, Injection(0, ids > 0, torch.zeros(4, 3)), 5, ('"', "\n"))
    result = decode(model, req, CharTokenizer(), eos_token_ids={eos})
    assert result.texts == ["ab", "a", "ccccc", "d"]
    assert result.stop_reasons == ["stop_string", "eos", "length", "stop_string"]
    assert result.tokens[0] == [0, 1, quote]  # the stopping token is kept in tokens, cut from text
    assert model.batches == [[0, 1, 2, 3], [0, 1, 2, 3], [0, 2], [2], [2]]  # finished rows leave the batch


def test_finish_rows_cuts_whole_sequences_like_the_decode_loop():
    quote, eos = 8, 7
    scripts = [[0, 1, quote, 2, 2], [0, eos, 2, 2, 2], [2, 2, 2, 2, 2]]
    ids, mask = left_pad([[1, 2]] * 3, 0)
    req = GenerationRequest(ids, mask, Injection(0, ids > 0, torch.zeros(3, 3)), 5, ('"', "\n"))
    looped = decode(ScriptedModel(scripts), req, CharTokenizer(), eos_token_ids={eos})
    whole = finish_rows(scripts, CharTokenizer(), ('"', "\n"), {eos})
    assert whole == looped


def test_no_repeats_bans_each_generated_word_token_from_its_row(backend):
    prompt = render("test-open", backend.tokenizer)
    vectors = directions(backend, 6, seed=5) * 20
    request = request_for(backend, [prompt] * 6, vectors, max_new_tokens=12)
    plain = backend.generate(request)
    banned = backend.generate(dataclasses.replace(request, no_repeats=True))
    words = word_tokens(backend.tokenizer, 1 << 20)
    repeats = 0
    for free, ban in zip(plain.tokens, banned.tokens):
        word_ids = [t for t in ban if words[t]]
        assert len(word_ids) == len(set(word_ids))  # no word token twice in a row
        # identical up to the first step where plain decoding repeats a word token, different there
        first = next((i for i, t in enumerate(free) if words[t] and t in free[:i]), None)
        if first is None:
            assert ban == free
        else:
            repeats += 1
            assert ban[:first] == free[:first] and ban[first] != free[first]
    assert repeats > 0  # the tiny model does repeat, so the ban was exercised


def test_no_repeats_keeps_separators_and_follows_leaving_rows():
    # token 0..7 are letters (words), 9 is a newline (not a word); row 1 leaves the batch after its EOS
    scripts = [[0, 0, 1, 0, 9, 9], [2, 7, 2, 2, 2, 2], [3, 3, 9, 3, 9, 1]]
    ids, mask = left_pad([[1, 2]] * 3, 0)
    req = GenerationRequest(ids, mask, Injection(0, ids > 0, torch.zeros(3, 3)), 6, (), no_repeats=True)

    class Letters(CharTokenizer):
        def __len__(self):
            return len(self.chars)

        def batch_decode(self, rows):
            return [self.decode(r) for r in rows]

    result = decode(ScriptedModel(scripts, vocab=10), req, Letters(), eos_token_ids={7})
    # a banned script token falls to the best allowed logit (all 0: the lowest allowed id)
    assert result.tokens == [[0, 1, 2, 3, 9, 9], [2], [3, 0, 9, 1, 9, 2]]
