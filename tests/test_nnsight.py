"""The nnsight backend, locally and through every layer of the remote path, offline."""

from __future__ import annotations

import json

import nnsight
import pytest
import torch
from conftest import tiny_gemma
from fake_ndif import FakeNDIF, NotWhitelisted, StrictBackend
from nnsight.modeling.transformers import TransformersModel
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata
from sae_selfexplain_plugin.adapters.nnsight import NNsightBackend, RemoteExecutionError
from sae_selfexplain_plugin.adapters.transformers import TransformersBackend

from sae_selfexplain_plugin import InputError, SelfExplainConfig, SelfExplainer

CFG = SelfExplainConfig(template="test-open", scales=(1.0, 4.0), max_new_tokens=5)
KEY = "ndif-test-key"


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


def test_requests_pass_ndif_whitelist(nn_model, directions, expected):
    backend = NNsightBackend(nn_model, remote=StrictBackend(nn_model))
    assert texts(SelfExplainer(backend, CFG).explain(directions)) == expected


def test_whitelist_check_can_fail(nn_model):
    """A trace that touches json, or a sae_lens object, is refused: the strict check is not vacuous."""
    ids = torch.tensor([[2, 50, 60]])
    with pytest.raises(NotWhitelisted, match="json"), nn_model.trace(ids, backend=StrictBackend(nn_model)):
        h = nn_model.model.layers[0].output
        json.dumps([h.shape[0]])
    sae = StandardSAE(StandardSAEConfig(d_in=64, d_sae=4))
    with pytest.raises(NotWhitelisted, match="sae_lens"), nn_model.trace(ids, backend=StrictBackend(nn_model)):
        acts = sae.encode(nn_model.model.layers[0].output).save()  # noqa: F841


def test_unmodified_remote_client_against_loopback_ndif(nn_model, directions, expected, api_key):
    with FakeNDIF(nn_model, api_key) as server:
        backend = NNsightBackend(nn_model, remote=server.url, repo_id="google/gemma-3-270m", poll_s=0.02)
        assert texts(SelfExplainer(backend, CFG).explain(directions)) == expected
        assert len(server.jobs) == 2  # the reference norm, then one batched generate for all 6 rows
        assert set(server.seen_keys) == {KEY}


def test_a_sweep_of_several_batches_is_one_remote_session(nn_model, directions, expected, api_key):
    with FakeNDIF(nn_model, api_key) as server:
        backend = NNsightBackend(nn_model, remote=server.url, repo_id="google/gemma-3-270m", poll_s=0.02)
        records = SelfExplainer(backend, CFG.replace(batch_size=2)).explain(directions)  # 3 batches
        assert texts(records) == expected
        assert len(server.jobs) == 2  # the reference norm, then one session holding the 3 generates


def test_remote_job_error_is_reported(nn_model, directions, api_key):
    with FakeNDIF(nn_model, api_key) as server:
        server.mode = "error"
        backend = NNsightBackend(nn_model, remote=server.url, repo_id="google/gemma-3-270m", poll_s=0.02)
        with pytest.raises(RemoteExecutionError, match="failed: CUDA out of memory"):
            SelfExplainer(backend, CFG).explain(directions)


def test_remote_timeout_is_reported(nn_model, directions, api_key):
    with FakeNDIF(nn_model, api_key) as server:
        server.mode = "hang"
        backend = NNsightBackend(nn_model, remote=server.url, repo_id="m/x", timeout_s=0.3, poll_s=0.05)
        with pytest.raises(RemoteExecutionError, match=r"did not finish within 0s \(last status: RUNNING\)"):
            SelfExplainer(backend, CFG).explain(directions)


def test_bad_key_is_reported_without_the_key(nn_model, directions, monkeypatch):
    monkeypatch.setattr(nnsight.CONFIG.API, "APIKEY", "wrong-secret-777")
    with FakeNDIF(nn_model, KEY) as server:
        backend = NNsightBackend(nn_model, remote=server.url, repo_id="m/x", poll_s=0.02)
        with pytest.raises(RemoteExecutionError, match=r"refused the request.*API key") as err:
            SelfExplainer(backend, CFG).explain(directions)
    assert "wrong-secret-777" not in str(err.value)


def test_in_memory_model_needs_a_repo_id_for_ndif(nn_model):
    with pytest.raises(InputError, match="repo_id='google/gemma-3-270m'"):
        NNsightBackend(nn_model, remote=True)


def test_sae_self_explain_through_nnsight(nn_model, expected, directions, api_key):
    sae = StandardSAE(StandardSAEConfig(d_in=64, d_sae=3, metadata=SAEMetadata(hook_name="blocks.1.hook_resid_pre")))
    with torch.no_grad():
        sae.W_dec.copy_(directions)
    via_sae = sae.self_explain([0, 1, 2], model=nn_model, remote="local", config=CFG)
    assert texts(via_sae) == expected
    via_model = nn_model.self_explain(sae, [0, 1, 2], config=CFG)  # the entry on the nnsight model
    assert texts(via_model) == expected
    assert texts(nn_model.self_explain(directions, config=CFG)) == expected
    with pytest.raises(InputError, match="remote= needs an nnsight model"):
        sae.self_explain(0, model=TransformersBackend(nn_model._module, nn_model.tokenizer), remote=True, config=CFG)


@pytest.mark.parametrize("remote", [False, "local"])
def test_nnsight_engine_applies_an_adapter_as_by_hand(nn_model, hf, tokenizer, directions, remote):
    import test_direction_adapter

    backend = NNsightBackend(nn_model, remote=remote, repo_id="tiny/gemma" if remote else None)
    adapter = test_direction_adapter.make_adapter(backend)
    texts, _ = test_direction_adapter.engine_texts(backend, adapter, directions, (1.0,), 5)
    # only the adapted vectors travel: the same texts as the transformers backend given them by hand
    assert texts == test_direction_adapter.by_hand(TransformersBackend(hf, tokenizer), adapter, directions, (1.0,), 5)
