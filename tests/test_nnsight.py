"""The nnsight backend, locally and through every layer of the remote path, offline."""

from __future__ import annotations

import uuid
from dataclasses import replace

import nnsight
import pytest
import torch
from conftest import tiny_gemma
from ndif_server import NDIFBackend as NDIFServerCode  # an nnsight Backend running NDIF's server code
from ndif_server import NDIFServer
from nnsight.modeling.huggingface import _ID_CACHE  # read only, to show we never write it
from nnsight.modeling.transformers import TransformersModel
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata
from sae_selfexplain_plugin.adapters.backends import ndif as ndif_adapter
from sae_selfexplain_plugin.adapters.backends import nnsight as nnsight_adapter
from sae_selfexplain_plugin.adapters.backends.nnsight import (
    NNsightBackend,
    RemoteExecutionError,
    RemoteTimeout,
    remote_model_key,
)
from sae_selfexplain_plugin.adapters.backends.transformers import TransformersBackend

from sae_selfexplain_plugin import GenerationRequest, Injection, InputError, SelfExplainConfig, SelfExplainer, render
from sae_selfexplain_plugin.vocabulary import direction_lens, probe_size, probe_vocabulary

CFG = SelfExplainConfig(template="test-open", scales=(1.0, 4.0), max_new_tokens=5)
KEY = str(uuid.UUID(int=1234))  # NDIF keys are UUIDs


@pytest.fixture(scope="module")
def hf(tokenizer):
    return tiny_gemma(len(tokenizer))


@pytest.fixture
def nn_model(hf, tokenizer):
    return TransformersModel(hf, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def directions():
    return torch.randn(3, 64, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def expected(hf, tokenizer, directions):
    return texts(SelfExplainer(TransformersBackend(hf, tokenizer), CFG).explain(directions))


@pytest.fixture
def api_key(monkeypatch):
    monkeypatch.setattr(nnsight.CONFIG.API, "APIKEY", KEY)
    return KEY


def texts(records):
    return [c.text for r in records for c in r.candidates]


def test_local_nnsight_equals_transformers(nn_model, directions, expected):
    assert texts(SelfExplainer(NNsightBackend(nn_model), CFG).explain(directions)) == expected
    assert len(set(expected)) > 1


def test_nnsight_local_simulation_runs_the_sweep(nn_model, directions, expected):
    backend = NNsightBackend(nn_model, remote="local")
    assert texts(SelfExplainer(backend, CFG).explain(directions)) == expected


def test_requests_run_through_ndif_execution_code(nn_model, directions, expected):
    backend = NNsightBackend(nn_model, remote=NDIFServerCode(nn_model))
    assert texts(SelfExplainer(backend, CFG).explain(directions)) == expected


REPO = "tiny/gemma"


@pytest.fixture
def ndif(nn_model, api_key):
    with NDIFServer({remote_model_key(nn_model, REPO): nn_model}, {KEY}) as server:
        yield server


def remote(nn_model, server, **kw):
    return NNsightBackend(nn_model, remote=server.url, repo_id=REPO, poll_s=0.02, **kw)


def test_our_requests_through_ndif_server_code(nn_model, directions, expected, ndif):
    ndif.queue_delay_s = 0.5  # long beside poll_s (0.02), so early polls always happen (0.05 raced on fast runs)
    before = dict(nn_model.__dict__)
    ids_before = dict(_ID_CACHE)
    assert texts(SelfExplainer(remote(nn_model, ndif), CFG).explain(directions)) == expected
    assert len(ndif.posts) == 2  # the reference norm, then one batched generate for all 6 rows
    assert {p["ndif-api-key"] for p in ndif.posts} == {KEY}
    first, second = ndif.status_log.values()
    assert first == ["QUEUED", "PROVISIONING", "DEPLOYING", "DISPATCHED", "RUNNING", "COMPLETED"]
    assert second == ["QUEUED", "DISPATCHED", "RUNNING", "COMPLETED"]  # the model is up by then
    assert ndif.early_404s > 0  # polls before the first stored status got 404, and were waited out
    assert nn_model.__dict__ == before and ids_before == _ID_CACHE  # nothing of the user's or nnsight's changed


def test_a_sweep_is_one_session_split_by_payload_size(nn_model, directions, expected, ndif, monkeypatch):
    sizes: list[int] = []
    split = ndif_adapter._by_size

    def by_size(batches, cap):
        sizes[:] = [sum(t.numel() * t.element_size() for t in b[:4]) for b in batches]
        return split(batches, cap)

    monkeypatch.setattr(ndif_adapter, "_by_size", by_size)
    records = SelfExplainer(remote(nn_model, ndif), CFG.replace(batch_size=2)).explain(directions)  # 3 batches
    assert texts(records) == expected and len(ndif.posts) == 2  # the reference norm, one session of 3
    monkeypatch.setattr(ndif_adapter, "MAX_REQUEST_BYTES", sizes[0] + sizes[1])  # room for two batches
    records = SelfExplainer(remote(nn_model, ndif), CFG.replace(batch_size=2)).explain(directions)
    assert texts(records) == expected and len(ndif.posts) == 2 + 1 + 2  # norm, a session of 2, then 1 alone


@pytest.mark.parametrize(
    ("key", "prepare", "match"),
    [("", None, r"Missing or invalid API key"),
     ("not-a-uuid-secret", None, r"Invalid API key format: '\*\*\*'"),  # NDIF echoes the key: we redact it
     (str(uuid.UUID(int=7)), None, r"Invalid API key\."),
     (KEY, lambda s: setattr(s, "auth_down", True), r"Auth backend unavailable"),
     (KEY, lambda s: setattr(s, "ray_connected", False), r"compute backend is reconnecting")],
    ids=["401-no-key", "400-malformed", "403-unknown", "503-auth-down", "503-ray"],
)  # fmt: skip
def test_ndif_refusals_are_clear_errors(nn_model, directions, ndif, monkeypatch, key, prepare, match):
    monkeypatch.setattr(nnsight.CONFIG.API, "APIKEY", key)
    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    if prepare:
        prepare(ndif)
    with pytest.raises(RemoteExecutionError, match=match) as err:
        SelfExplainer(remote(nn_model, ndif), CFG).explain(directions)
    assert not key or key not in str(err.value)


def test_a_model_the_server_does_not_serve(nn_model, directions, api_key):
    with (
        NDIFServer({"another:model": nn_model}, {KEY}) as server,
        pytest.raises(RemoteExecutionError, match="failed: Error starting model"),
    ):
        SelfExplainer(remote(nn_model, server), CFG).explain(directions)


def test_the_execution_time_limit(nn_model, directions, ndif):
    ndif.execution_timeout_s = 0.0
    with pytest.raises(RemoteExecutionError, match="exceeded the execution timeout"):
        SelfExplainer(remote(nn_model, ndif), CFG).explain(directions)


def test_transient_poll_and_download_failures_recover(nn_model, directions, expected, ndif):
    ndif.fail_polls, ndif.fail_downloads = 3, 2
    assert texts(SelfExplainer(remote(nn_model, ndif), CFG).explain(directions)) == expected
    assert ndif.fail_polls == 0 and ndif.fail_downloads == 0


def test_a_timed_out_job_is_collected_by_the_same_call_again(nn_model, directions, expected, ndif):
    ndif.hold = True
    with pytest.raises(
        RemoteTimeout, match=r"did not finish within 0s \(last status: RUNNING\).*run the same call"
    ) as err:
        SelfExplainer(remote(nn_model, ndif, timeout_s=0.3), CFG).explain(directions)
    job = err.value.job_id
    assert len(ndif.posts) == 1 and ndif.status_log[job][-1] == "RUNNING"
    ndif.release()
    assert texts(SelfExplainer(remote(nn_model, ndif), CFG).explain(directions)) == expected
    assert len(ndif.posts) == 2  # the timed-out job was collected, not submitted again; then the generate
    assert ndif.status_log[job][-1] == "COMPLETED"


def test_bf16_as_ndif_serves_it(nn_model, directions, expected, tokenizer):
    """NDIF loads weights in bf16; the texts may differ from fp32 where greedy decoding is near a tie."""
    with NDIFServer({remote_model_key(nn_model, REPO): nn_model}, {KEY}, served_dtype=torch.bfloat16) as server:
        nnsight.CONFIG.API.APIKEY = KEY
        backend = remote(nn_model, server)
        ids = tokenizer("The meaning of the word", return_tensors="pt")["input_ids"]
        local = NNsightBackend(nn_model).residual(ids, torch.ones_like(ids), 2)
        served = backend.residual(ids, torch.ones_like(ids), 2)
        assert served.dtype == torch.bfloat16
        rel = ((served.float() - local).norm(dim=-1) / local.norm(dim=-1)).max().item()
        assert rel < BF16_RESIDUAL_TOLERANCE, rel
        got = texts(SelfExplainer(backend, CFG).explain(directions))
    same = sum(a == b for a, b in zip(got, expected)) / len(expected)
    assert same >= BF16_MIN_SAME_TEXTS, (same, got, expected)


# Measured on this tiny model (2026-11-25): relative L2 error of the residual entering blocks 1/2/3, bf16 weights
# vs fp32, 0.8% / 1.1% / 1.1%; greedy texts identical to fp32 for 64 of 64 (32 directions x 2 scales).
BF16_RESIDUAL_TOLERANCE = 0.03
BF16_MIN_SAME_TEXTS = 0.75


def test_our_model_key_is_nnsights(nn_model, monkeypatch):
    monkeypatch.setattr(nn_model, "repo_id", "org/model", raising=False)
    monkeypatch.setitem(_ID_CACHE, "org/model", "org/model")  # what nnsight's hub lookup would have cached
    assert remote_model_key(nn_model, "org/model") == nn_model.to_model_key()


def test_remote_options_pass_through_sae_self_explain(nn_model, directions, expected, ndif):
    sae = StandardSAE(StandardSAEConfig(d_in=64, d_sae=3, metadata=SAEMetadata(hook_name="blocks.1.hook_resid_pre")))
    with torch.no_grad():
        sae.W_dec.copy_(directions)
    via_sae = sae.self_explain([0, 1, 2], model=nn_model, remote=ndif.url, repo_id=REPO, timeout_s=60, poll_s=0.02,
                               config=CFG)  # fmt: skip
    via_model = nn_model.self_explain(sae, [0, 1, 2], remote=ndif.url, repo_id=REPO, poll_s=0.02, config=CFG)
    via_rows = nn_model.self_explain(directions, remote=ndif.url, repo_id=REPO, poll_s=0.02, config=CFG)
    assert texts(via_sae) == texts(via_model) == texts(via_rows) == expected
    with pytest.raises(InputError, match="repo_id: only for nnsight models"):
        sae.self_explain(0, model=TransformersBackend(nn_model._module, nn_model.tokenizer), repo_id=REPO, config=CFG)


def test_in_memory_model_needs_a_repo_id_for_ndif(nn_model):
    with pytest.raises(InputError, match="repo_id='google/gemma-3-270m'"):
        NNsightBackend(nn_model, remote=True)


def test_remote_picks_the_backend_and_old_imports_still_work(nn_model):
    # NNsightBackend(model, remote=...) as before: a server is the NDIF backend, anything else runs here
    for where in (True, "https://ndif.example"):
        backend = NNsightBackend(nn_model, remote=where, repo_id=REPO)
        assert type(backend) is nnsight_adapter.NDIFBackend and backend.device == torch.device("cpu")
    for where in (False, None, "local", NDIFServerCode(nn_model)):
        assert type(NNsightBackend(nn_model, remote=where)) is NNsightBackend
    with pytest.raises(InputError, match="runs on a server"):
        nnsight_adapter.NDIFBackend(nn_model, remote="local")
    for name in ("RemoteExecutionError", "RemoteTimeout", "remote_model_key", "MAX_REQUEST_BYTES"):
        assert getattr(nnsight_adapter, name) is getattr(ndif_adapter, name)


def test_sae_self_explain_through_nnsight(nn_model, expected, directions, api_key):
    sae = StandardSAE(StandardSAEConfig(d_in=64, d_sae=3, metadata=SAEMetadata(hook_name="blocks.1.hook_resid_pre")))
    with torch.no_grad():
        sae.W_dec.copy_(directions)
    via_sae = sae.self_explain([0, 1, 2], model=nn_model, remote="local", config=CFG)
    assert texts(via_sae) == expected
    via_model = nn_model.self_explain(sae, [0, 1, 2], config=CFG)  # the entry on the nnsight model
    assert texts(via_model) == expected
    assert texts(nn_model.self_explain(directions, config=CFG)) == expected
    with pytest.raises(InputError, match="remote: only for nnsight models"):
        sae.self_explain(0, model=TransformersBackend(nn_model._module, nn_model.tokenizer), remote=True, config=CFG)


@pytest.mark.parametrize("slots", [1, 2])
@pytest.mark.parametrize("where", [False, "local", "ndif"])
def test_nnsight_engine_applies_an_adapter_as_by_hand(nn_model, hf, tokenizer, directions, where, slots, request):
    import test_direction_adapter

    if where == "ndif":  # NDIF's own server code runs the trace
        backend = remote(nn_model, request.getfixturevalue("ndif"))
    else:
        backend = NNsightBackend(nn_model, remote=where, repo_id="tiny/gemma" if where else None)
    adapter = test_direction_adapter.make_adapter(backend, slots=slots)
    texts, _ = test_direction_adapter.engine_texts(backend, adapter, directions, (1.0,), 5)
    # only the adapted vectors travel: the same texts as the transformers backend given them by hand
    assert texts == test_direction_adapter.by_hand(TransformersBackend(hf, tokenizer), adapter, directions, (1.0,), 5)


def test_no_repeats_in_the_trace_equals_the_decode_loop(nn_model, hf, tokenizer, directions, ndif):
    # the ban runs inside the trace (per-step loop over the unembedding): locally, in nnsight's simulation
    # and through NDIF's execution code, the tokens of our own decode loop
    prompt = render("test-open", tokenizer)
    ids = torch.tensor([prompt.input_ids] * len(directions))
    positions = torch.zeros_like(ids, dtype=torch.bool)
    positions[:, list(prompt.placeholder_positions)] = True
    request = GenerationRequest(ids, torch.ones_like(ids), Injection(1, positions, directions * 20), 12,
                                no_repeats=True)  # fmt: skip
    loop = TransformersBackend(hf, tokenizer).generate(request)
    assert loop.tokens != TransformersBackend(hf, tokenizer).generate(replace(request, no_repeats=False)).tokens
    for backend in (NNsightBackend(nn_model), NNsightBackend(nn_model, remote="local"), remote(nn_model, ndif)):
        assert backend.generate(request) == loop


def test_vocabulary_probe_through_nnsight_and_ndif_equals_transformers(nn_model, hf, tokenizer, ndif):
    # the probe only needs each backend's `residual`: NDIF's server code runs one trace per batch
    encoder = torch.randn(64, 5, generator=torch.Generator().manual_seed(4))

    def encode(resid: torch.Tensor) -> torch.Tensor:
        return torch.relu(resid.float() @ encoder)

    expected = probe_vocabulary(TransformersBackend(hf, tokenizer), 2, encode, 5, batch_size=64)
    assert any(expected)
    for backend in (NNsightBackend(nn_model), remote(nn_model, ndif)):
        got = probe_vocabulary(backend, 2, encode, 5, batch_size=8)
        assert [[t for t, _ in p] for p in got] == [[t for t, _ in p] for p in expected]
        for a, b in zip(got, expected):
            assert [v for _, v in a] == pytest.approx([v for _, v in b], abs=1e-4)
    assert len(ndif.posts) == -(-probe_size(tokenizer) // 8) > 1  # one request per batch


def test_direction_lens_through_nnsight_and_ndif_equals_transformers(nn_model, hf, tokenizer, ndif):
    directions = torch.randn(3, 64, generator=torch.Generator().manual_seed(5))
    expected = direction_lens(TransformersBackend(hf, tokenizer), 2, directions, batch_size=64)
    assert all(expected)
    for backend in (NNsightBackend(nn_model), remote(nn_model, ndif)):
        got = direction_lens(backend, 2, directions, batch_size=64)
        assert [[t for t, _ in p] for p in got] == [[t for t, _ in p] for p in expected]
        for a, b in zip(got, expected):
            assert [v for _, v in a] == pytest.approx([v for _, v in b], abs=1e-4)
