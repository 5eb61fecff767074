"""Scale metrics (prompt probes), policies, the cheap generate-only-chosen path, and relevancy."""

from __future__ import annotations

import pytest
import torch

from sae_selfexplain_plugin import Injection, InputError, SelfExplainConfig, SelfExplainer
from sae_selfexplain_plugin.backend import left_pad
from sae_selfexplain_plugin.policies import explainable, rank_scales
from sae_selfexplain_plugin.scale_metrics import METRICS, cross_entropy, entropy

CFG = SelfExplainConfig(template="test-open", scales=(0.0, 1.0, 2.0, 4.0), max_new_tokens=5)


def directions(backend, n=3, seed=1):
    return torch.randn(n, backend.d_model, generator=torch.Generator().manual_seed(seed))


def test_probe_reads_the_last_real_token_whatever_the_padding(gemma_backend):
    """Left padding must not change what the metrics read (the original scripts read a pad position)."""
    ex = SelfExplainer(gemma_backend, CFG)
    prompt = list(ex.prompt.input_ids)
    vec = directions(gemma_backend, 1) * 5
    results = []
    for other in ([], [[5] * (len(prompt) + 3)]):  # alone, or beside a longer row: 3 pads on the left
        ids, mask = left_pad([prompt, *other], 0)
        positions = torch.zeros_like(ids, dtype=torch.bool)
        offset = ids.shape[1] - len(prompt)
        positions[0, [offset + p for p in ex.prompt.placeholder_positions]] = True
        resid, logits = gemma_backend.probe(ids, mask, Injection(1, positions, vec.expand(len(ids), -1)), [3])
        results.append((resid[:1], logits[:1]))
    (r0, l0), (r1, l1) = results
    assert torch.allclose(r0, r1, atol=1e-4) and torch.allclose(l0, l1, atol=1e-3)


def test_sweep_is_zero_at_scale_zero_and_matches_an_independent_computation(gemma_backend):
    ex = SelfExplainer(gemma_backend, CFG.replace(probe_layer=3))
    dirs = directions(gemma_backend)
    sweeps = ex.measure(dirs)
    assert all(s["scale"] == list(CFG.scales) for s in sweeps)
    for sweep in sweeps:
        assert all(sweep[m][0] == 0 for m in METRICS)  # baseline-subtracted
        assert sweep["self_similarity_by_layer"][3] == sweep["self_similarity"]  # every block, the probe's among them
        assert sweep["self_similarity_by_layer"][0] == [0.0] * len(CFG.scales)  # before the injection: no effect
    # Independent path: patch with injecting(), read the residual with residual() (which stops at layer 3).
    ids = torch.tensor([ex.prompt.input_ids])
    mask = torch.ones_like(ids)
    positions = torch.zeros_like(ids, dtype=torch.bool)
    positions[0, list(ex.prompt.placeholder_positions)] = True

    def last_resid(vec):
        with gemma_backend.injecting(Injection(CFG.layer, positions, vec[None])):
            return gemma_backend.residual(ids, mask, 3)[0, -1]

    for f in range(3):
        for j, scale in enumerate(CFG.scales):
            vec = ex.injected_vectors(dirs[f : f + 1], torch.tensor([scale]))[0]
            cos = torch.cosine_similarity(last_resid(vec), dirs[f], dim=0)
            cos0 = torch.cosine_similarity(last_resid(torch.zeros_like(vec)), dirs[f], dim=0)
            assert sweeps[f]["self_similarity"][j] == pytest.approx(float(cos - cos0), abs=1e-4)


def test_entropy_and_cross_entropy_definitions():
    uniform = torch.zeros(1, 8)
    assert float(entropy(uniform)[0]) == pytest.approx(torch.log(torch.tensor(8.0)).item())
    peaked = torch.tensor([[10.0, 0, 0, 0, 0, 0, 0, 0]])
    assert float(entropy(peaked)[0]) < 0.01
    # CE(p, q) >= H(p), equal when q == p
    assert float(cross_entropy(peaked, peaked[0])[0]) == pytest.approx(float(entropy(peaked)[0]), abs=1e-5)
    assert float(cross_entropy(peaked, uniform[0])[0]) > float(entropy(peaked)[0])


SWEEP = {
    "scale": [0.0, 0.5, 1.0, 2.0, 4.0, 8.0],
    "self_similarity": [0.0, 0.01, 0.05, 0.20, 0.22, 0.30],
    "entropy": [0.0, 0.1, 0.1, -0.5, -0.2, 1.0],
    "cross_entropy": [0.0, 0.1, 0.2, 0.5, 0.6, 4.0],
}


def test_policies_rank_scales_by_their_rules():
    cfg = SelfExplainConfig(scales=SWEEP["scale"], min_scale=1.0, keep_top=3)
    assert rank_scales(SWEEP, cfg, "fixed") == [4, 3, 2]  # nearest to chosen_scale=4: 4, 2, then 1 (before 8)
    assert rank_scales(SWEEP, cfg, "max-self-similarity") == [5, 4, 3]
    # composite by hand over scales >= 1 (indices 2..5)
    ss, ce = SWEEP["self_similarity"][2:], SWEEP["cross_entropy"][2:]
    mm = lambda v: [(x - min(v)) / (max(v) - min(v)) for x in v]  # noqa: E731
    score = [0.4 * a - 0.6 * b for a, b in zip(mm(ss), mm(ce))]
    expected = [2 + i for i in sorted(range(4), key=lambda i: -score[i])][:3]
    assert rank_scales(SWEEP, cfg, "composite") == expected
    # knee: first scale reaching 80% of max self-similarity (0.24): 0.22 < 0.24, so 8.0
    assert rank_scales(SWEEP, cfg, "knee")[0] == 5
    flatter = {**SWEEP, "self_similarity": [0.0, 0.01, 0.05, 0.28, 0.29, 0.30]}
    assert rank_scales(flatter, cfg, "knee") == [3, 4, 5]
    assert rank_scales(SWEEP, cfg.replace(keep_top=1), "composite") == expected[:1]


@pytest.mark.parametrize("policy", ["fixed", "max-self-similarity", "composite", "knee"])
def test_every_policy_ranks_odd_sweeps(policy):
    """All-negative, all-equal and single-scale sweeps still give a ranking (a crash would lose a run)."""
    cfg = SelfExplainConfig(scales=SWEEP["scale"], keep_top=2)
    negative = {**SWEEP, "self_similarity": [0.0, -0.1, -0.05, -0.2, -0.3, -0.01]}
    flat = {k: [0.0] * 6 if k != "scale" else v for k, v in SWEEP.items()}
    for sweep in (negative, flat):
        ranked = rank_scales(sweep, cfg, policy)
        assert len(ranked) == 2 and len(set(ranked)) == 2
    if policy == "knee":
        assert rank_scales(negative, cfg, policy)[0] == 5  # -0.01 is the best, and within 10% of it
    one = {k: v[:2] for k, v in SWEEP.items()}
    assert rank_scales(one, cfg.replace(scales=(0.0, 0.5)), policy) in ([1], [1, 0])


def test_min_scale_excludes_small_scales_and_the_flag():
    cfg = SelfExplainConfig(scales=SWEEP["scale"], min_scale=4.0)
    assert set(rank_scales(SWEEP, cfg, "max-self-similarity")) == {4, 5}
    assert explainable(SWEEP, cfg)
    flat = {**SWEEP, "self_similarity": [0.0, 0.001, 0.002, 0.003, 0.004, 0.009]}
    assert not explainable(flat, cfg)


def test_records_carry_the_sweep_ranking_and_flags(gemma_backend):
    cfg = CFG.replace(policy="composite", min_scale=1.0, keep_top=2)
    records = SelfExplainer(gemma_backend, cfg).explain(directions(gemma_backend))
    for r in records:
        assert (
            r.policy == "composite"
            and len(r.ranked_scales) == 2
            and set(r.sweep) == {"scale", *METRICS, "self_similarity_by_layer"}
        )
        assert all(set(METRICS) <= set(c.metrics) for c in r.candidates)
        if "not_self_explainable" in r.flags:
            assert r.chosen is None
        else:
            assert r.chosen is not None and r.chosen.scale == r.ranked_scales[0]


def test_metrics_and_relevancy_are_optional(gemma_backend):
    plain = SelfExplainer(gemma_backend, CFG.replace(metrics=False)).explain(directions(gemma_backend, 2))
    assert all(r.sweep == {} and "relevancy" not in r.chosen.metrics for r in plain)
    measured = SelfExplainer(gemma_backend, CFG.replace(metrics=False, policy="knee")).explain(
        directions(gemma_backend, 2)
    )
    assert all(r.sweep for r in measured)  # a metric policy always measures


def test_generating_only_the_chosen_scales_gives_the_same_texts(gemma_backend):
    cfg = CFG.replace(policy="max-self-similarity", keep_top=2, min_scale=0.5)
    dirs = directions(gemma_backend, 4)
    full = SelfExplainer(gemma_backend, cfg).explain(dirs)
    cheap = SelfExplainer(gemma_backend, cfg.replace(generate="chosen")).explain(dirs)
    for a, b in zip(full, cheap):
        assert [c.scale for c in b.candidates] == a.ranked_scales == b.ranked_scales
        assert [c.text for c in b.candidates] == [a.at_scale(s)[0].text for s in a.ranked_scales]
        assert a.chosen_index is None or a.chosen.text == b.chosen.text


def test_relevancy_is_a_mean_probability_difference(gemma_backend):
    cfg = CFG.replace(scales=(0.0, 8.0), chosen_scale=8.0, keep_top=2, min_scale=0.0, relevancy=True)
    records = SelfExplainer(gemma_backend, cfg).explain(directions(gemma_backend, 2))
    for r in records:
        zero, big = r.at_scale(0.0)[0], r.at_scale(8.0)[0]
        assert 0 <= big.metrics["relevancy"] <= 1
        if zero.text:  # the zero vector vs. the unpatched placeholder token: a real but different input
            assert 0 <= zero.metrics["relevancy"] <= 1
    assert any(r.at_scale(8.0)[0].metrics["relevancy"] > 0 for r in records)


class NoProbe:
    """A backend that can generate but not run prompt probes (e.g. nnsight here)."""

    def __init__(self, inner):
        self.inner = inner
        self.tokenizer, self.n_layers, self.d_model = inner.tokenizer, inner.n_layers, inner.d_model
        self.device, self.model_id = inner.device, inner.model_id

    def residual(self, *args):
        return self.inner.residual(*args)

    def generate(self, request):
        return self.inner.generate(request)


def test_a_backend_without_probes_still_explains_with_the_fixed_policy(gemma_backend):
    backend = NoProbe(gemma_backend)
    records = SelfExplainer(backend, CFG).explain(directions(gemma_backend, 2))
    assert all(r.sweep == {} and r.chosen.scale == 4.0 for r in records)
    with pytest.raises(InputError, match="needs the metric sweep"):
        SelfExplainer(backend, CFG.replace(policy="composite")).explain(directions(gemma_backend, 2))
    with pytest.raises(InputError, match="cannot run prompt probes"):
        SelfExplainer(backend, CFG).measure(directions(gemma_backend, 2))


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"policy": "best"}, "unknown policy"),
        ({"generate": "some"}, "generate must be"),
        ({"keep_top": 0}, "keep_top"),
        ({"composite_weight": 1.5}, "composite_weight"),
        ({"probe_layer": -1}, "probe_layer"),
    ],
)
def test_bad_policy_settings(changes, match):
    with pytest.raises(InputError, match=match):
        SelfExplainConfig(**changes)


def test_probe_layer_out_of_range(gemma_backend):
    with pytest.raises(InputError, match="out of range"):
        SelfExplainer(gemma_backend, CFG.replace(probe_layer=9)).measure(directions(gemma_backend, 1))


def test_records_with_sweeps_and_scores_pass_the_schema(gemma_backend, tmp_path):
    from sae_selfexplain_plugin.export import export_jsonl
    from sae_selfexplain_plugin.formats import validate_file

    records = SelfExplainer(gemma_backend, CFG.replace(policy="composite")).explain(directions(gemma_backend, 2))
    records[0].scores = {"activation_check": {"value": 0.5}, "embedding": {"value": None, "reason": "none"}}
    export_jsonl(records, tmp_path / "r.jsonl")
    count, violations = validate_file(tmp_path / "r.jsonl")
    assert count == 2 and violations == []


def test_metrics_read_on_the_generation_prefill_equal_separate_probe_passes(gemma_backend):
    """generate="all" reads the metrics on its own prompt pass; the numbers equal measure()'s."""
    dirs = directions(gemma_backend, 3)
    ex = SelfExplainer(gemma_backend, CFG)
    records = ex.explain(dirs)
    for r, sweep in zip(records, ex.measure(dirs)):
        for key in ("self_similarity", "entropy", "cross_entropy"):
            assert r.sweep[key] == pytest.approx(sweep[key], abs=2e-4)


class IgnoresProbes(NoProbe):
    """Generates without reading probes, but offers prompt probes: the engine falls back to them."""

    def generate(self, request):
        result = self.inner.generate(request)
        result.prompt_residuals = None
        return result

    def probe(self, *args):
        return self.inner.probe(*args)

    def mean_token_embedding(self):
        return self.inner.mean_token_embedding()

    def token_logprobs(self, *args):
        return self.inner.token_logprobs(*args)


def test_a_backend_that_ignores_probe_layers_is_measured_separately(gemma_backend):
    dirs = directions(gemma_backend, 2)
    expected = SelfExplainer(gemma_backend, CFG).explain(dirs)
    got = SelfExplainer(IgnoresProbes(gemma_backend), CFG).explain(dirs)
    for a, b in zip(expected, got):
        assert a.sweep["self_similarity"] == pytest.approx(b.sweep["self_similarity"], abs=2e-4)
