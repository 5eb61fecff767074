"""The HTML dashboard, checked in a real headless Chromium (Debian's, driven by Playwright)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from sae_selfexplain_plugin import SelfExplainConfig
from sae_selfexplain_plugin.dashboard import dashboard_data, write_dashboard
from sae_selfexplain_plugin.errors import InputError
from sae_selfexplain_plugin.example_collector import ExampleCollector
from sae_selfexplain_plugin.policies import explainable, rank_scales
from sae_selfexplain_plugin.results import Explanation, FeatureExplanations

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).parent.parent / "out" / "test-artifacts"
SCALES = [0.0, 0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0]
EVIL = '<script>window.__pwned = 1</script></script><img src=x onerror="window.__pwned = 2">'
WORDS = ["cat", "dog", "river", "music", "stone", "winter"]


def synthetic_records(n: int, n_layers: int = 6) -> list[FeatureExplanations]:
    """Records with varied sweeps, so the policies disagree and the weight control matters."""
    g = torch.Generator().manual_seed(0)
    cfg = SelfExplainConfig(scales=SCALES)
    records = []
    for f in range(n):
        s = torch.tensor(SCALES)
        peak = float(torch.rand(1, generator=g)) * 6 + 1
        ss = (0.3 * torch.exp(-((s - peak) ** 2) / 4) + 0.02 * torch.rand(len(s), generator=g)) * (f % 7 != 3)
        ce = 0.2 * s ** (1 + float(torch.rand(1, generator=g)))
        ss[0], ce[0] = 0.0, 0.0
        by_layer = [[round(float(v) * (layer / (n_layers - 1)), 5) for v in ss] for layer in range(n_layers)]
        sweep = {
            "scale": SCALES,
            "self_similarity": by_layer[n_layers - 2],
            "entropy": [round(float(v), 5) for v in -ss],
            "cross_entropy": [round(float(v), 5) for v in ce],
            "self_similarity_by_layer": by_layer,
        }
        word = WORDS[f % len(WORDS)]
        texts = [f"{word} at scale {sc:g}" for sc in SCALES]
        if f == 1:
            texts[5] = EVIL
        cands = [Explanation(f, t, sc, 2, "chat-meaning", metrics={"relevancy": 0.1}) for t, sc in zip(texts, SCALES)]
        ranked = [SCALES[i] for i in rank_scales(sweep, cfg.replace(policy="composite"), "composite")]
        flags = [] if explainable(sweep, cfg) else ["not_self_explainable"]
        chosen = None if flags else SCALES.index(ranked[0])
        records.append(
            FeatureExplanations(
                f, cands, chosen, "composite", "tiny", "abc", {"neuronpedia_id": "tiny-model/1-test-res"},
                sweep=sweep, ranked_scales=ranked, flags=flags,
                scores={"activation_check": {"value": round(f / n, 3)}, "embedding": {"value": 0.5}},
                vocabulary=[{"token": EVIL if f == 1 else word, "activation": 3.5}] if f % 2 else [],
            )
        )  # fmt: skip
    return records


def synthetic_examples(d_sae: int):
    collector = ExampleCollector(d_sae, top_k=5, window=8, n_random=3, pool_size=10)
    g = torch.Generator().manual_seed(1)
    collector.add(torch.randint(0, 20, (12, 16), generator=g), torch.relu(torch.randn(12, 16, d_sae, generator=g)))
    return collector.finish(lambda i: f" w{i}" if i != 7 else " <b>bold?</b>")


@pytest.fixture(scope="module")
def page():
    if not Path(CHROMIUM).exists():
        if os.environ.get("SAE_SELFEXPLAIN_REQUIRE_BROWSER"):
            pytest.fail(f"no Chromium at {CHROMIUM}: `make browser` installs Debian's chromium.")
        pytest.skip("Debian's chromium is not installed (make browser)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"],
        )  # fmt: skip
        tab = browser.new_page(viewport={"width": 1400, "height": 900})
        yield tab
        browser.close()


@pytest.fixture(scope="module")
def opened(page, tmp_path_factory):
    records = synthetic_records(40)
    examples = synthetic_examples(40)
    html = write_dashboard(records, tmp_path_factory.mktemp("dash") / "report.html", examples=examples,
                           config=SelfExplainConfig(scales=SCALES, policy="composite", probe_layer=4))  # fmt: skip
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(html.as_uri())
    page.wait_for_selector("tr.row")
    return page, records, errors, examples


def chosen_scale_shown(page) -> float | None:
    text = page.inner_text("#feature")
    value = text.split("chosen scale (")[1].split(":")[1].split(";")[0].strip()
    return None if value == "–" else float(value)


def test_page_renders_without_errors_and_plots(opened):
    page, records, errors, _ = opened
    assert page.locator("tr.row").count() == len(records)
    assert page.locator("svg.plot").count() == 3
    assert page.locator("svg.plot circle").count() == 3 * len(SCALES)
    assert page.locator("svg.histogram").count() >= 2
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
    assert errors == []


def test_model_text_is_shown_as_text_never_run(opened):
    page, _, errors, examples = opened
    page.fill("#search", "")
    page.click("tr.row[data-id='1']")
    page.click("svg.plot[data-metric='entropy'] circle[data-scale='4']")
    assert page.inner_text(".selected-explanation") == EVIL
    assert page.evaluate("window.__pwned") is None
    odd = next(f for f in range(40) if any(" <b>bold?</b>" in c.tokens for c in examples[f].top[:5]))
    page.click(f"tr.row[data-id='{odd}']")
    assert "<b>bold?</b>" in page.inner_text("#feature")  # a corpus token, shown as text
    assert errors == []


def test_vocabulary_probe_tokens_show_as_text_when_recorded(opened):
    page, _, errors, _ = opened
    page.fill("#search", "")
    page.click("tr.row[data-id='3']")
    assert page.inner_text("#vocabulary-probe") == f"vocabulary probe (not a self-explanation): {WORDS[3]} (3.5)"
    page.click("tr.row[data-id='1']")
    assert EVIL in page.inner_text("#vocabulary-probe") and page.evaluate("window.__pwned") is None
    page.click("tr.row[data-id='2']")  # not probed: no line
    assert page.locator("#vocabulary-probe").count() == 0
    assert errors == []


def test_clicking_a_point_shows_that_scales_explanation(opened):
    page, records, _, _ = opened
    page.click("tr.row[data-id='2']")
    for scale in (0.5, 6):
        page.click(f"svg.plot[data-metric='self-similarity'] circle[data-scale='{scale:g}']")
        assert page.inner_text(".selected-explanation") == records[2].at_scale(scale)[0].text


def test_the_weight_control_moves_the_choice_as_the_python_policy_does(opened):
    page, records, _, _ = opened
    base = SelfExplainConfig(scales=SCALES, policy="composite", probe_layer=4)
    moved = 0
    for weight in ("0", "0.4", "1"):
        page.eval_on_selector("#weight", "(e, v) => { e.value = v; e.dispatchEvent(new Event('input')); }", weight)
        cfg = base.replace(composite_weight=float(weight))
        for r in records[:12]:
            page.click(f"tr.row[data-id='{r.feature_id}']")
            sweep = {**r.sweep, "self_similarity": r.sweep["self_similarity_by_layer"][4]}
            expected = SCALES[rank_scales(sweep, cfg, "composite")[0]]
            assert chosen_scale_shown(page) == expected, (weight, r.feature_id)
            moved += weight == "1" and expected != SCALES[rank_scales(sweep, base, "composite")[0]]
    assert moved > 0  # the control really changed some choices


def test_probe_layer_and_min_scale_controls_recompute(opened):
    page, records, _, _ = opened
    page.eval_on_selector("#weight", "(e) => { e.value = '0.4'; e.dispatchEvent(new Event('input')); }")
    page.select_option("#policy", "max-self-similarity")
    page.fill("#min-scale", "4")
    page.dispatch_event("#min-scale", "change")
    page.select_option("#probe-layer", "5")
    cfg = SelfExplainConfig(scales=SCALES, min_scale=4.0)
    for r in records[:5]:
        page.click(f"tr.row[data-id='{r.feature_id}']")
        sweep = {**r.sweep, "self_similarity": r.sweep["self_similarity_by_layer"][5]}
        assert chosen_scale_shown(page) == SCALES[rank_scales(sweep, cfg, "max-self-similarity")[0]]
    page.select_option("#policy", "composite")
    page.fill("#min-scale", "1")
    page.dispatch_event("#min-scale", "change")
    page.select_option("#probe-layer", "4")


def test_search_filters_and_flags_show(opened):
    page, records, _, _ = opened
    page.fill("#search", "river")
    expected = [r for r in records if any("river" in c.text for c in r.candidates)]
    assert page.locator("tr.row").count() == len(expected) > 0
    page.fill("#search", "3")
    assert page.locator("tr.row").count() == 1  # a feature id
    assert "not self-explainable" in page.inner_text("tr.row")  # feature 3 never self-explains (f % 7 == 3)
    page.fill("#search", "")
    assert page.locator("tr.row").count() == len(records)
    link = page.locator("#neuronpedia-link")
    assert link.get_attribute("href").startswith("https://www.neuronpedia.org/tiny-model/1-test-res/")


def test_a_thousand_features_stay_small_and_paged(page, tmp_path):
    records = synthetic_records(1000, n_layers=30)
    html = write_dashboard(records, tmp_path / "big.html", examples=synthetic_examples(1000))
    assert html.stat().st_size < 8e6
    page.goto(html.as_uri())
    page.wait_for_selector("tr.row")
    assert page.locator("tr.row").count() == 100  # one page rendered; the rest on demand
    page.click("#next")
    assert page.locator("tr.row").first.get_attribute("data-id") == "100"


def test_no_records_is_a_clear_error():
    with pytest.raises(InputError, match="at least one feature"):
        dashboard_data([])
