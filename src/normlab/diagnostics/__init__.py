"""normlab.diagnostics — see inside a network while it trains.

``Probe(model)`` records per-layer activation, gradient and weight statistics during real
training; ``probe.findings()`` turns them into diagnoses (vanishing/exploding gradients,
collapse, saturation, dead units, batch-vs-running drift) with suggestions;
``probe.report(path)`` writes a self-contained HTML report.
"""

from .findings import Finding, Thresholds, diagnose
from .layers import DEFAULT_LAYER_TYPES, select_layers, unit_dims
from .plots import gradient_norms, histogram_grid, percentile_bands, save_figure
from .probe import Probe
from .summaries import SampleIndex, activation_summary, batch_vs_running, dead_unit_rule, summarize

__all__ = [
    "DEFAULT_LAYER_TYPES",
    "Finding",
    "Probe",
    "activation_summary",
    "batch_vs_running",
    "dead_unit_rule",
    "diagnose",
    "gradient_norms",
    "SampleIndex",
    "summarize",
    "Thresholds",
    "histogram_grid",
    "percentile_bands",
    "save_figure",
    "select_layers",
    "unit_dims",
]
