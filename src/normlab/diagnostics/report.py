"""A self-contained HTML report of a Probe: figures embedded as data URIs, findings listed."""

from __future__ import annotations

import html
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .plots import figure_to_data_uri, gradient_norms, histogram_grid, percentile_bands

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from typing_extensions import Unpack

    from .findings import Thresholds
    from .probe import Probe

__all__ = ["write_report"]

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; font-size: 13px; } td, th { padding: 3px 8px; border-bottom: 1px solid #ddd; }
th { text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.finding { border-left: 4px solid #c33; padding: 4px 10px; margin: 8px 0; background: #fdf3f3; }
.ok { border-left: 4px solid #393; padding: 4px 10px; background: #f3fbf3; }
img { max-width: 100%; }
"""

_COLUMNS = [
    "std",
    "mean",
    "p15",
    "p50",
    "p85",
    "dead",
    "saturated",
    "grad_norm",
    "weight_grad_norm",
    "relative_grad",
    "update_ratio",
    "learning_ratio",
    "mean_drift",
]


def _cell(value: float | None) -> str:
    if value is None:
        return "<td></td>"
    if isinstance(value, float) and not math.isfinite(value):
        return f"<td class=num>{value}</td>"
    return f"<td class=num>{value:.3g}</td>"


def _figure_html(make: Callable[[], Figure], caption: str) -> str:
    try:
        fig = make()
    except ValueError as err:  # nothing of that kind was recorded
        return f"<p><em>{html.escape(caption)}: {html.escape(str(err))}</em></p>"
    return f'<figure><img alt="{html.escape(caption)}" src="{figure_to_data_uri(fig)}"><figcaption>{html.escape(caption)}</figcaption></figure>'


def write_report(
    probe: Probe, path: str | Path, *, title: str = "normlab probe report", **thresholds: Unpack[Thresholds]
) -> Path:
    path = Path(path)
    findings = probe.findings(**thresholds)
    # The last record's value as it is: a NaN shows as nan, not as an empty cell.
    latest = {key: probe.latest(key, window=1, finite_only=False) for key in _COLUMNS}
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{html.escape(type(probe.layers[name]).__name__)}</td>"
        + "".join(_cell(latest[key].get(name)) for key in _COLUMNS)
        + "</tr>"
        for name in probe.layer_names
    )
    finding_html = (
        "".join(
            f"<div class=finding><b>{html.escape(f.kind.replace('_', ' '))}</b>: {html.escape(f.message)}"
            f"<br><i>Suggestion:</i> {html.escape(f.suggestion)}</div>"
            for f in findings
        )
        or "<div class=ok>No problems found with the current thresholds.</div>"
    )
    missing = probe.unrecorded
    unrecorded = (
        "<p><b>Selected but not recorded:</b> "
        + "; ".join(f"{html.escape(name)} ({html.escape(why)})" for name, why in missing.items())
        + "</p>"
        if missing
        else ""
    )
    figures = "".join(
        [
            _figure_html(lambda: histogram_grid(probe), "Activation histograms per layer (latest step)"),
            _figure_html(lambda: percentile_bands(probe), "15th/50th/85th percentiles over training"),
            _figure_html(lambda: gradient_norms(probe), "Gradient norm per layer"),
        ]
    )
    document = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{_STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p>{probe.step} {"optimizer steps" if probe.optimizer is not None else "training forwards"} seen, every {probe.every} recorded; {len(probe.layer_names)} layers.</p>
{unrecorded}
<h2>Findings</h2>
{finding_html}
<h2>Latest values per layer</h2>
<table><tr><th>layer</th><th>type</th>{"".join(f"<th>{c}</th>" for c in _COLUMNS)}</tr>{rows}</table>
<h2>Figures</h2>
{figures}
</body></html>
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(document, encoding="utf-8")
    return path
