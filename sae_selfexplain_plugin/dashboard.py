"""The feature dashboard: one self-contained HTML file (data, script and styles inline; no network, no server).

    write_dashboard(records, "report.html", examples=examples, config=config)

Per feature: metric curves against scale (hover for values, click a point for that scale's explanation), the
chosen explanation and the kept candidates, the not-self-explainable flag, scores, the top activating contexts
with per-token highlighting, and a Neuronpedia link. Controls (policy, composite weight, minimum scale, probe
layer) re-run the policies of policies.py, ported to the page, live. The overview table is paged, so 1,000+
features stay fast; all text from models and corpora is inserted as text, never as HTML.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from importlib.resources import files
from pathlib import Path
from typing import Any

from .activation_examples import ActivationExamples
from .config import SelfExplainConfig
from .errors import InputError
from .files import atomic_writer
from .policies import KNEE_FRACTION
from .results import FeatureExplanations
from .scale_metrics import default_probe_layer

NEURONPEDIA = "https://www.neuronpedia.org"
TOP_CONTEXTS = 5


def dashboard_data(
    records: Iterable[FeatureExplanations],
    *,
    examples: ActivationExamples | None = None,
    config: SelfExplainConfig | None = None,
    title: str | None = None,
) -> dict[str, Any]:
    """The JSON the page renders (compact: rounded numbers, a few contexts per feature)."""
    records = list(records)
    if not records:
        raise InputError("no results to show: the dashboard needs at least one feature record.")
    first = records[0]
    cfg = config or SelfExplainConfig(policy=first.policy)
    n_layers = max((len(r.sweep.get("self_similarity_by_layer", [])) for r in records), default=0)
    probe = cfg.probe_layer if cfg.probe_layer is not None else _probe_layer_of(records, n_layers)
    features = []
    for r in records:
        f: dict[str, Any] = {
            "id": r.feature_id,
            "sweep": r.sweep,
            "scales": sorted({c.scale for c in r.candidates}),
            "cands": [[c.scale, c.sample, c.text, c.metrics.get("relevancy")] for c in r.candidates],
            "scores": r.scores,
            "flags": r.flags,
        }
        if r.vocabulary:
            f["vocab"] = [[v["token"], round(float(v["activation"]), 2)] for v in r.vocabulary]
        if examples is not None and 0 <= r.feature_id < examples.d_sae:
            ex = examples[r.feature_id]
            f["freq"] = round(ex.frequency, 6)
            f["top"] = [[c.tokens, [round(v, 2) for v in c.values]] for c in ex.top[:TOP_CONTEXTS]]
        features.append(f)
    np_id = (first.sae or {}).get("neuronpedia_id")
    return {
        "title": title or f"self-explanations: {np_id or first.model_id}",
        "subtitle": f"{len(records)} features · model {first.model_id} · settings {first.settings_hash}",
        "neuronpedia_base": f"{NEURONPEDIA}/{np_id}/" if np_id else None,
        "n_layers": n_layers,
        "settings": {
            "policy": cfg.policy,
            "composite_weight": cfg.composite_weight,
            "min_scale": cfg.min_scale,
            "probe_layer": probe,
            "keep_top": cfg.keep_top,
            "chosen_scale": cfg.chosen_scale,
            "explainable_threshold": cfg.explainable_threshold,
            "knee_fraction": KNEE_FRACTION,
        },
        "features": features,
    }


def render_dashboard(data: dict[str, Any]) -> str:
    """The page with `data` inlined. `<` is escaped in the JSON, so no text can close the script element."""
    blob = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    blob = blob.replace("<", "\\u003c").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    template = files("sae_selfexplain_plugin").joinpath("data/dashboard.html").read_text(encoding="utf-8")
    return template.replace("/*DATA*/", blob, 1)


def write_dashboard(
    records: Iterable[FeatureExplanations],
    out: str | Path,
    *,
    examples: ActivationExamples | None = None,
    config: SelfExplainConfig | None = None,
    title: str | None = None,
) -> Path:
    """Write the dashboard for `records` to `out` (atomically); returns the path."""
    html = render_dashboard(dashboard_data(records, examples=examples, config=config, title=title))
    out = Path(out)
    with atomic_writer(out) as f:
        f.write(html)
    return out


def _probe_layer_of(records: list[FeatureExplanations], n_layers: int) -> int:
    """The layer whose row of self_similarity_by_layer equals the recorded self_similarity."""
    for r in records:
        rows = r.sweep.get("self_similarity_by_layer") or []
        for layer, row in enumerate(rows):
            if row == r.sweep.get("self_similarity") and any(row):
                return layer
    return default_probe_layer(n_layers) if n_layers else 0
