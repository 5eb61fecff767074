"""The SAELens adapter and TransformerLens backends on tiny random models (offline, fast)."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tokenizer, tiny_gemma
from sae_lens import (
    SAE,
    GatedSAE,
    GatedSAEConfig,
    HookedSAETransformer,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
)
from sae_lens.saes.sae import SAEMetadata
from sae_lens.saes.transcoder import Transcoder, TranscoderConfig
from sae_selfexplain_plugin.adapters import sae_lens as adapter
from sae_selfexplain_plugin.adapters.backends.transformer_lens import TransformerBridgeBackend, TransformerLensBackend
from sae_selfexplain_plugin.adapters.backends.transformers import TransformersBackend
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.model_bridge import TransformerBridge

import sae_selfexplain_plugin
from sae_selfexplain_plugin import (
    FeatureExplanations,
    Injection,
    InputError,
    SelfExplainConfig,
    SelfExplainer,
)

CFG = SelfExplainConfig(template="test-open", scales=(1.0, 4.0), max_new_tokens=5)
D_MODEL = 64


@pytest.fixture(scope="module")
def saved_tokenizer(tmp_path_factory):
    # TransformerLens re-loads the tokenizer by name, so it must live in a folder.
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tok")
    build_tokenizer().save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def hooked(saved_tokenizer):
    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=3, d_model=D_MODEL, n_ctx=256, d_head=16, n_heads=4, d_mlp=128, d_vocab=len(saved_tokenizer),
        act_fn="gelu", normalization_type="RMS", positional_embedding_type="rotary", model_name="tiny-tl",
        initializer_range=0.2,
    )  # fmt: skip
    return HookedSAETransformer(cfg, tokenizer=saved_tokenizer)


def make_sae(
    cls=StandardSAE,
    cfg_cls=StandardSAEConfig,
    d_in=D_MODEL,
    hook="blocks.1.hook_resid_post",
    model="tiny-tl",
    **kw,
):
    torch.manual_seed(1)
    meta = SAEMetadata(model_name=model, hook_name=hook, neuronpedia_id="tiny-tl/1-test")
    sae = cls(cfg_cls(d_in=d_in, d_sae=32, metadata=meta, **kw))
    with torch.no_grad():
        sae.W_dec.copy_(torch.randn_like(sae.W_dec))
    return sae


@pytest.mark.parametrize(
    ("cls", "cfg_cls", "kw"),
    [(StandardSAE, StandardSAEConfig, {}), (TopKSAE, TopKSAEConfig, {"k": 4}),
     (JumpReLUSAE, JumpReLUSAEConfig, {}), (GatedSAE, GatedSAEConfig, {})],
)  # fmt: skip
def test_every_architecture_gains_self_explain(hooked, cls, cfg_cls, kw):
    sae = make_sae(cls, cfg_cls, **kw)
    one = sae.self_explain(3, model=hooked, config=CFG)
    assert isinstance(one, FeatureExplanations) and one.feature_id == 3 and one.chosen.scale == 4.0
    many = sae.self_explain(range(2), model=hooked, config=CFG)
    assert [e.feature_id for e in many] == [0, 1]
    tensor = sae.self_explain(torch.tensor([5, 1]), model=hooked, config=CFG)
    assert [e.feature_id for e in tensor] == [5, 1]


def test_results_equal_the_engine_on_the_decoder_rows(hooked):
    sae = make_sae()
    records = sae.self_explain([2, 7], model=hooked, config=CFG)
    direct = SelfExplainer(TransformerLensBackend(hooked), CFG).explain(sae.W_dec[[2, 7]].detach(), [2, 7])
    assert [c.text for r in records for c in r.candidates] == [c.text for r in direct for c in r.candidates]
    assert isinstance(records[0], FeatureExplanations)
    assert records[0].sae["neuronpedia_id"] == "tiny-tl/1-test" and records[0].sae["d_sae"] == 32


def test_options_are_config_fields(hooked):
    sae = make_sae()
    rec = sae.self_explain(0, model=hooked, template="test-open", scales=[2.0], max_new_tokens=3)
    assert [c.scale for c in rec.candidates] == [2.0]
    with pytest.raises(InputError, match="unknown options"):
        sae.self_explain(0, model=hooked, scale=[2.0])


def test_install_is_idempotent_and_reversible(hooked):
    sae = make_sae()
    sae_selfexplain_plugin.install()
    sae_selfexplain_plugin.install()
    assert hasattr(sae, "self_explain")
    sae_selfexplain_plugin.uninstall()
    try:
        assert not hasattr(sae, "self_explain") and not hasattr(SAE, "self_explain")
        assert adapter.self_explain(sae, 0, hooked, config=CFG).feature_id == 0  # the functional form remains
    finally:
        sae_selfexplain_plugin.install()
    assert hasattr(sae, "self_explain")


def test_install_leaves_the_sae_lens_registry_alone():
    from sae_lens.registry import SAE_CLASS_REGISTRY

    before = dict(SAE_CLASS_REGISTRY)
    sae_selfexplain_plugin.install()
    assert before == SAE_CLASS_REGISTRY


def test_tl_cached_decode_equals_the_transformers_backend_on_the_same_weights(saved_tokenizer):
    """The bridge wraps an HF model; HookedTransformer can't load a tiny one, so compare HF vs bridge here
    (HookedTransformer vs HF is compared on the real Gemma 3 270M)."""
    plain = TransformersBackend(tiny_gemma(len(saved_tokenizer)), saved_tokenizer)
    bridge = TransformerBridge.boot_transformers(
        "google/gemma-3-270m", hf_model=tiny_gemma(len(saved_tokenizer)), tokenizer=saved_tokenizer
    )
    bridged = TransformerBridgeBackend(bridge)
    d = torch.randn(3, D_MODEL, generator=torch.Generator().manual_seed(3))
    a = SelfExplainer(plain, CFG).explain(d)
    b = SelfExplainer(bridged, CFG).explain(d)
    assert [c.text for r in a for c in r.candidates] == [c.text for r in b for c in r.candidates]
    assert len({c.text for r in a for c in r.candidates}) > 1  # the injection matters


def test_tl_batched_equals_unbatched(hooked):
    d = torch.randn(3, D_MODEL, generator=torch.Generator().manual_seed(4))
    backend = TransformerLensBackend(hooked)
    small = SelfExplainer(backend, CFG.replace(batch_size=1)).explain(d)
    large = SelfExplainer(backend, CFG.replace(batch_size=6)).explain(d)
    assert [c.text for r in small for c in r.candidates] == [c.text for r in large for c in r.candidates]


def test_tl_prefix_cache_gives_the_same_texts_and_skips_the_prefix(hooked):
    import test_prefix_cache  # registers "test-long-prefix"

    d = torch.randn(3, D_MODEL, generator=torch.Generator().manual_seed(5))
    backend = TransformerLensBackend(hooked)
    config = test_prefix_cache.CFG
    backend.prefixes.enabled = False
    full = SelfExplainer(backend, config).explain(d)
    backend.prefixes.enabled = True
    explainer = SelfExplainer(backend, config)
    assert explainer.reference_norm > 0  # its full-prompt pass is not what is counted below
    lengths: list[int] = []
    with hooked.hooks(fwd_hooks=[("hook_embed", lambda x, hook: lengths.append(x.shape[1]))]):
        cached = explainer.explain(d)
    assert [c.text for r in cached for c in r.candidates] == [c.text for r in full for c in r.candidates]
    prompt = explainer.prompt
    first = min(prompt.placeholder_positions)
    # the one-row prefix pass, then every batch's prompt pass starts after it (decode steps feed one token)
    assert lengths[0] == first
    assert {n for n in lengths[1:] if n > 1} == {len(prompt.input_ids) - first}


def test_plain_hooked_transformer_gives_the_same_results(hooked, saved_tokenizer):
    plain = HookedTransformer(hooked.cfg, tokenizer=saved_tokenizer)
    plain.load_state_dict(hooked.state_dict(), strict=False)
    sae = make_sae()
    a = sae.self_explain([0, 3], model=plain, config=CFG)
    b = sae.self_explain([0, 3], model=hooked, config=CFG)
    assert [e.text for e in a] == [e.text for e in b]


def test_hooked_sae_transformer_with_and_without_attached_saes(hooked):
    sae = make_sae(hook="blocks.1.hook_resid_pre")
    without = sae.self_explain([0, 1], model=hooked, config=CFG)
    assert all(e.text is not None for e in without)
    hooked.add_sae(sae)
    try:
        attached = sae.self_explain([0, 1], model=hooked, config=CFG)
    finally:
        hooked.reset_saes()
    again = sae.self_explain([0, 1], model=hooked, config=CFG)
    assert [e.text for e in again] == [e.text for e in without]  # detaching restores the model
    assert len(attached) == 2


@pytest.mark.parametrize(
    ("features", "match"),
    [(32, "out of range"), (-1, "out of range"), ([1, 99], "out of range"), ([], "empty"),
     (torch.tensor([0.5]), "integer"), ([1.0], "integers")],
)  # fmt: skip
def test_bad_feature_indices(hooked, features, match):
    with pytest.raises(InputError, match=match):
        make_sae().self_explain(features, model=hooked, config=CFG)


def test_sae_on_the_meta_device(hooked):
    sae = make_sae().to("meta")
    with pytest.raises(InputError, match="meta device"):
        sae.self_explain(0, model=hooked, config=CFG)


def test_d_in_mismatch(hooked):
    with pytest.raises(InputError, match="decoder width 48 != the model's d_model 64"):
        make_sae(d_in=48).self_explain(0, model=hooked, config=CFG)


@pytest.mark.parametrize(
    ("cfg_changes", "weights_as", "match"),
    [  # weights_as: the weights file's new name, None to delete it, "" to leave it
        ({}, None, r"has cfg\.json but no weights file sae_weights\.safetensors, where SAELens expects"),
        ({}, "weights.pt", r"no weights file sae_weights\.safetensors, .*the folder holds \['weights\.pt'\] instead"),
        ({"d_in": 576.9}, "", r"cfg\.json: field 'd_in' must be a whole number >= 1 \(a width\), got 576\.9 \(float\)"),
        ({"d_in": "64"}, "", r"field 'd_in' must be a whole number .* got '64' \(str\)"),
        ({"d_sae": True}, "", r"field 'd_sae' must be a whole number .* got True \(bool\)"),
        ({"d_sae": 0}, "", r"field 'd_sae' must be a whole number >= 1 .* got 0 \(int\)"),
        ({"d_in": None}, "", r"field 'd_in' must be a whole number"),
        ({"dtype": "float99"}, "", r"cannot build an SAE from .*cfg\.json \(ValueError: Invalid dtype: float99"),
    ],
)
def test_a_broken_sae_folder_is_reported_by_its_true_cause(tmp_path, cfg_changes, weights_as, match):
    import json

    folder = tmp_path / "sae"
    make_sae().save_model(folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, **cfg_changes}))
    weights = folder / "sae_weights.safetensors"
    if weights_as is None:
        weights.unlink()
    elif weights_as:
        weights.rename(folder / weights_as)
    with pytest.raises(InputError, match=match) as caught:
        adapter.load_sae_folder(folder)
    assert "corrupt or truncated" not in str(caught.value)


@pytest.mark.parametrize(
    ("cfg_text", "match"),
    [
        ("[1, 2]", r"not a valid SAE config: a JSON object is expected, got list"),
        ('{"d_sae": 32}', r"not a valid SAE config: it lacks the field 'd_in'"),
        ("\udcff", r"cannot read it as UTF-8 text"),
    ],
)
def test_a_cfg_that_is_no_sae_config(tmp_path, cfg_text, match):
    folder = tmp_path / "sae"
    make_sae().save_model(folder)
    (folder / "cfg.json").write_bytes(cfg_text.encode("utf-8", "surrogateescape"))
    with pytest.raises(InputError, match=match):
        adapter.load_sae_folder(folder)


def test_tl_context_bounds_the_prompt_and_its_budget(hooked):
    assert TransformerLensBackend(hooked).context_length == 256  # cfg.n_ctx
    with pytest.raises(InputError, match=r"max_new_tokens=300 makes \d+, past the 256-token context of tiny-tl"):
        make_sae().self_explain(0, model=hooked, config=CFG.replace(max_new_tokens=300))


def test_sae_from_another_model(hooked):
    sae = make_sae(model="gpt2-small")
    with pytest.raises(InputError, match=r"trained on 'gpt2-small'.*check_model=False"):
        sae.self_explain(0, model=hooked, config=CFG)
    assert sae.self_explain(0, model=hooked, config=CFG, check_model=False).feature_id == 0


def test_unmappable_hook(hooked):
    sae = make_sae(hook="blocks.1.attn.hook_z")
    with pytest.raises(InputError, match=r"decoder writes 'blocks\.1\.attn\.hook_z', which is not in the residual"):
        sae.self_explain(0, model=hooked, config=CFG)
    assert sae.self_explain(0, model=hooked, config=CFG, check_hook=False).feature_id == 0


@pytest.mark.parametrize(
    ("hook", "layer"),
    [("blocks.6.hook_resid_pre", 6), ("blocks.6.hook_resid_post", 7), ("blocks.6.hook_mlp_out", 6),
     ("blocks.3.hook_out", 4), ("model.layers.12.output", 13),
     # TransformerBridge's own names
     ("blocks.4.mlp.hook_out", 4), ("blocks.4.attn.hook_out", 4), ("blocks.4.ln2.hook_in", 4), ("blocks.4.hook_in", 4)],
)  # fmt: skip
def test_hook_names_map_to_layers(hook, layer):
    assert adapter.sae_layer(make_sae(hook=hook)) == layer


def test_unsupported_model_type():
    with pytest.raises(InputError, match="unsupported model type dict"):
        make_sae().self_explain(0, model={"not": "a model"}, config=CFG)


def test_transformers_model_needs_its_tokenizer(gemma_backend, tokenizer):
    sae = make_sae(model="tiny-gemma3")
    with pytest.raises(InputError, match="tokenizer="):
        sae.self_explain(0, model=gemma_backend.model, config=CFG)
    assert sae.self_explain(0, model=gemma_backend.model, tokenizer=tokenizer, config=CFG, check_model=False)


def test_model_is_required_when_metadata_names_no_embedded_model():
    with pytest.raises(InputError, match="pass the model"):
        make_sae(model="gpt2-small").self_explain(0, config=CFG)


@pytest.mark.parametrize("slots", [1, 2])
def test_tl_engine_applies_an_adapter_as_by_hand(hooked, slots):
    import test_direction_adapter

    backend = TransformerLensBackend(hooked)
    adapter = test_direction_adapter.make_adapter(backend, slots=slots)
    d = torch.randn(3, D_MODEL, generator=torch.Generator().manual_seed(6))
    texts, _ = test_direction_adapter.engine_texts(backend, adapter, d, (1.0, 0.5), 5)
    assert texts == test_direction_adapter.by_hand(backend, adapter, d, (1.0, 0.5), 5)


# --- Fit with SAELens and TransformerLens (issue 18) ---


@pytest.mark.parametrize("use_error_term", [True, False])
def test_sae_attached_at_the_injection_hook(hooked, use_error_term):
    sae = make_sae(hook="blocks.2.hook_resid_pre")  # CFG injects at the input of block 2
    unattached = sae.self_explain([0, 1, 2], model=hooked, config=CFG)
    hooked.add_sae(sae, use_error_term=use_error_term)
    try:
        attached = sae.self_explain([0, 1, 2], model=hooked, config=CFG)
        backend = TransformerLensBackend(hooked)
        ids = torch.tensor([[1, 5, 6, 7]])
        vectors = torch.randn(1, D_MODEL)
        seen: list[torch.Tensor] = []
        handle = hooked.blocks[2].ln1.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
        try:
            injection = Injection(2, torch.tensor([[False, False, True, False]]), vectors)
            backend.prefill(ids, torch.ones_like(ids), injection)
        finally:
            handle.remove()
    finally:
        hooked.reset_saes()
    # block 2 reads the injected vector at the placeholder (ln1 is the first to read it), whatever the SAE does
    assert torch.allclose(seen[0][0, 2], vectors[0])
    if use_error_term:  # the SAE's output equals its input: the model is unchanged, so are the texts
        assert [e.text for e in attached] == [e.text for e in unattached]
    else:
        assert all(e.text is not None for e in attached)


def test_attaching_an_sae_invalidates_the_prefix_cache(hooked):
    import test_prefix_cache  # registers "test-long-prefix"

    d = torch.randn(3, D_MODEL, generator=torch.Generator().manual_seed(5))
    backend = TransformerLensBackend(hooked)
    config = test_prefix_cache.CFG
    SelfExplainer(backend, config).explain(d)  # caches the prefix of the unattached model
    hooked.add_sae(make_sae(hook="blocks.1.hook_resid_pre"), use_error_term=False)  # changes the prefix's keys
    try:
        reused = SelfExplainer(backend, config).explain(d)
        fresh = SelfExplainer(TransformerLensBackend(hooked), config).explain(d)
    finally:
        hooked.reset_saes()
    assert [c.text for r in reused for c in r.candidates] == [c.text for r in fresh for c in r.candidates]


def test_residual_reads_what_follows_an_attached_sae(hooked):
    sae = make_sae(hook="blocks.2.hook_resid_pre")
    backend = TransformerLensBackend(hooked)
    ids = torch.tensor([[1, 5, 6, 7]])
    plain = backend.residual(ids, torch.ones_like(ids), 2)
    hooked.add_sae(sae, use_error_term=True)
    try:
        attached = backend.residual(ids, torch.ones_like(ids), 2)
    finally:
        hooked.reset_saes()
    assert torch.allclose(attached, plain, atol=1e-5)


@pytest.mark.parametrize(
    ("sae_model", "model_id"),
    [("gpt2-small", "gpt2"), ("gpt2", "gpt2-small"), ("gpt2-small", "openai-community/gpt2"),
     ("tiny-stories-1M", "TinyStories-1M"), ("roneneldan/TinyStories-1M", "tiny-stories-1M"),
     ("google/gemma-3-270m", "gemma-3-270m")],
)  # fmt: skip
def test_model_aliases_match(hooked, sae_model, model_id):
    sae = make_sae(model=sae_model)
    adapter.check_compatible(sae, TransformerLensBackend(hooked, model_id=model_id))


def test_a_real_model_mismatch_names_both(hooked):
    sae = make_sae(model="gpt2-medium")
    with pytest.raises(InputError, match=r"trained on 'gpt2-medium'.*model is 'gpt2'"):
        adapter.check_compatible(sae, TransformerLensBackend(hooked, model_id="gpt2"))


def _fresh_python(code: str) -> str:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_install_survives_find_spec_before_the_first_import():
    # optional-dependency checks call find_spec without importing: the method must still be added later
    out = _fresh_python(
        "import importlib.util, sae_selfexplain_plugin\n"
        "assert importlib.util.find_spec('sae_lens') is not None\n"
        "assert importlib.util.find_spec('nnsight') is not None\n"
        "import sae_lens, nnsight\n"
        "from nnsight.modeling.transformers import TransformersModel\n"
        "print(hasattr(sae_lens.SAE, 'self_explain'), hasattr(TransformersModel, 'self_explain'))"
    )
    assert out == "True True"


def test_install_when_sae_lens_is_imported_first():
    out = _fresh_python("import sae_lens, sae_selfexplain_plugin\nprint(hasattr(sae_lens.SAE, 'self_explain'))")
    assert out == "True"


def test_install_when_the_adapter_is_imported_before_sae_lens():
    # the adapter's own import of SAELens installs the integration while the adapter package is half loaded
    out = _fresh_python(
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    warnings.simplefilter('always')\n"
        "    import sae_selfexplain_plugin.adapters.sae_lens\n"
        "    import sae_lens\n"
        "failed = [str(w.message) for w in seen if 'integration' in str(w.message)]\n"
        "print(hasattr(sae_lens.SAE, 'self_explain'), failed)"
    )
    assert out == "True []"


def _transcoder(hook_in="blocks.1.ln2.hook_normalized", hook_out="blocks.1.hook_mlp_out"):
    meta = SAEMetadata(model_name="tiny-tl", hook_name=hook_in, hook_name_out=hook_out)
    torch.manual_seed(3)
    tc = Transcoder(TranscoderConfig(d_in=D_MODEL, d_sae=16, d_out=D_MODEL, apply_b_dec_to_input=False, metadata=meta))
    with torch.no_grad():
        tc.W_dec.copy_(torch.randn_like(tc.W_dec))
    return tc


def test_transcoders_explain_their_decoder_rows(hooked):
    tc = _transcoder()
    records = tc.self_explain([0, 3], model=hooked, config=CFG)
    direct = SelfExplainer(TransformerLensBackend(hooked), CFG).explain(tc.W_dec[[0, 3]].detach(), [0, 3])
    assert [r.text for r in records] == [r.text for r in direct]
    assert adapter.sae_layer(tc) == 1  # its decoder writes blocks.1.hook_mlp_out


def test_a_transcoder_writing_outside_the_residual_stream_is_refused(hooked):
    tc = _transcoder(hook_out="blocks.1.mlp.hook_post")
    with pytest.raises(InputError, match=r"decoder writes 'blocks\.1\.mlp\.hook_post'"):
        tc.self_explain(0, model=hooked, config=CFG)


def test_check_hook_false_on_a_non_residual_hook_warns_once(hooked):
    adapter.checks._warned_hooks.clear()
    sae = make_sae(hook="blocks.1.attn.hook_z")
    with pytest.warns(UserWarning, match="treats its decoder rows as residual directions"):
        sae.self_explain(0, model=hooked, config=CFG, check_hook=False)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sae.self_explain(1, model=hooked, config=CFG, check_hook=False)


def test_one_return_type(hooked):
    sae = make_sae()
    one = sae.self_explain(3, model=hooked, config=CFG)
    assert isinstance(one, FeatureExplanations) and one.feature_id == 3
    assert one.chosen is not None and one.text == one.chosen.text and len(one.candidates) == 2
    many = sae.self_explain([3, 4], model=hooked, config=CFG)
    assert isinstance(many, list) and all(isinstance(r, FeatureExplanations) for r in many)
    assert many[0].text == one.text


def test_config_beside_keyword_options_and_the_injection_layer_name(hooked):
    sae = make_sae()
    by_config = sae.self_explain(0, model=hooked, config=CFG.replace(layer=1, scales=(2.0,)))
    by_keywords = sae.self_explain(0, model=hooked, config=CFG, injection_layer=1, scales=(2.0,))
    by_alias = sae.self_explain(0, model=hooked, config=CFG, layer=1, scales=(2.0,))
    assert by_config.text == by_keywords.text == by_alias.text
    assert by_keywords.candidates[0].layer == 1
    with pytest.raises(InputError, match="injection_layer=1 and layer=2"):
        sae.self_explain(0, model=hooked, config=CFG, injection_layer=1, layer=2)


def test_return_all_is_deprecated(hooked):
    with pytest.warns(DeprecationWarning, match="return_all"):
        rec = make_sae().self_explain(0, model=hooked, config=CFG, return_all=True)
    assert isinstance(rec, FeatureExplanations)
