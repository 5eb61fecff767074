"""`eval`'s report beside its JSON: a PNG of each labeller's score distribution per scorer, and an HTML page with
the table (means, 95% intervals, against the top-tokens baseline) and that plot.

The distributions show what a mean hides: a labeller whose mean beats the floor only through a few features,
or a scorer under which every labeller, the floor included, sits at the same place.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from sae_selfexplain_plugin.files import atomic_writer
from sae_selfexplain_plugin.scoring import versus

from .evaluation import EvalReport, LabellerResult

SCORERS = {  # per-feature key -> column title
    "activation_check": "activation check",
    "embedding": "embedding AUROC",
    "detection": "detection AUROC",
    "generation_check": "generation check",
}
BASELINE = "top-tokens baseline"


def _values(result: LabellerResult, key: str) -> list[float]:
    return [v[key]["value"] for v in result.per_feature.values() if key in v and v[key]["value"] is not None]


def scorers_in(report: EvalReport) -> list[str]:
    """The scorers that ran (any labeller has a value)."""
    return [k for k in SCORERS if any(_values(r, k) for r in report.results)]


def write_plot(report: EvalReport, path: str | Path) -> None:
    """Box plots, one panel per scorer, one box per labeller (0.5 = chance marked); fixed single scales left out."""
    import matplotlib

    matplotlib.use("Agg")  # no display: write files only
    import matplotlib.pyplot as plt

    results = [r for r in report.results if not r.labeller.startswith("fixed@")]
    keys = scorers_in(report)
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 0.45 * len(results) + 1.5), sharey=True)
    axes = [axes] if len(keys) == 1 else list(axes)
    for ax, key in zip(axes, keys):
        data = [_values(r, key) or [float("nan")] for r in results]
        ax.boxplot(data, orientation="horizontal", widths=0.6, showmeans=True)
        ax.axvline(0.5, color="grey", linestyle=":", linewidth=1)
        ax.set_xlim(0, 1)
        ax.set_title(SCORERS[key], fontsize=10)
    axes[0].set_yticks(range(1, len(results) + 1), [r.labeller for r in results], fontsize=8)
    title = f"{len(report.features)} features of {report.sae} on {report.model_id} ({report.scored_on})"
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_writer(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def write_html(report: EvalReport, path: str | Path, plot: str | Path) -> None:
    """A self-contained page: the table (mean [95% interval], vs the baseline) and the plot inlined."""
    keys = scorers_in(report)
    reference = next((r for r in report.results if r.labeller == BASELINE), None)
    head = "".join(f"<th>{html.escape(SCORERS[k])}</th><th>vs baseline</th>" for k in keys)
    rows = []
    for r in report.results:
        cells = []
        for k in keys:
            values = _values(r, k)
            interval = r.intervals.get(k)
            mean = f"{sum(values) / len(values):.3f}" if values else "-"
            shown = f"{mean} [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else mean
            against = versus(interval, reference.intervals.get(k)) if reference and r is not reference else ""
            cells.append(f"<td>{shown}</td><td>{against}</td>")
        rows.append(f"<tr><td>{html.escape(r.labeller)}</td>{''.join(cells)}<td>{r.scored}</td></tr>")
    image = base64.b64encode(Path(plot).read_bytes()).decode("ascii")
    page = f"""<!doctype html><meta charset="utf-8"><title>sae-selfexplain eval</title>
<style>body{{font:14px system-ui;margin:2em}} td,th{{padding:2px 8px;text-align:right}}
td:first-child{{text-align:left}}</style>
<h1>{html.escape(report.sae)} on {html.escape(report.model_id)}</h1>
<p>{len(report.features)} features, scored on the {html.escape(report.scored_on)}; means with bootstrap 95% intervals;
"tie" where the interval overlaps the top-tokens baseline's. 0.5 = chance; read each score beside the random-words
floor and the shuffled control. Which labeller each scorer favours: docs/evaluation.md.</p>
<table><tr><th>labeller</th>{head}<th>scored</th></tr>{"".join(rows)}</table>
<p><img alt="score distributions" src="data:image/png;base64,{image}"></p>
"""
    with atomic_writer(path) as f:
        f.write(page)
