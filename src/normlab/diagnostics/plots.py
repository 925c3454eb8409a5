"""Figures of a Probe's records, drawn headless.

Uses matplotlib's object-oriented API (``Figure`` + the Agg canvas) rather than pyplot,
so nothing here touches the global backend or needs a display, and figures are freed as
soon as they are dropped.
"""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .probe import Probe

__all__ = ["figure_to_png", "gradient_norms", "histogram_grid", "percentile_bands", "save_figure"]

# Layer names are data, not markup: a module named "$^$" would otherwise be parsed as
# matplotlib math text (and fail to draw), and "$x$" would be typeset.
_LITERAL = {"parse_math": False}


def _figure(width: float, height: float) -> Figure:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("plots need matplotlib: pip install 'normlab[experiments]'") from err
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def histogram_grid(
    probe: Probe,
    layers: list[str] | None = None,
    step: int | None = None,
    ncols: int = 5,
    title: str | None = None,
) -> Figure:
    """One panel per layer (execution order), shared axes: the classic picture of
    activations collapsing or saturating with depth (Glorot & Bengio, 2010, Fig. 3).

    Args:
        probe: the :class:`Probe` that recorded the activations.
        layers: the layer names to draw; None for every layer with recorded histograms.
            Default None.
        step: the recorded step to draw (the nearest with finite values where that step has
            none); None for the latest. Default None.
        ncols: panels per row. Default 5.
        title: the figure's title; None for a default one. Default None.

    Returns:
        The matplotlib figure (save it with :func:`save_figure`).
    """
    layers = layers or [n for n in probe.layer_names if any("hist" in r for r in probe.records(n))]
    if not layers:
        raise ValueError("no histograms recorded yet: run a training-mode forward with the probe attached")
    ncols = min(ncols, len(layers))
    nrows = math.ceil(len(layers) / ncols)
    fig = _figure(2.4 * ncols, 2.0 * nrows + 0.4)
    axes = fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False)
    shown = {}
    for ax, name in zip(axes.flat, layers):
        edges, fractions = probe.histogram(name, step)
        # The histogram of the nearest step with finite values: title it with that step,
        # and its own std (a later non-finite step has no histogram to show).
        shown[name] = probe.histogram_step(name, step)
        record = next(r for r in probe.records(name) if r["step"] == shown[name] and "hist" in r)
        ax.stairs(fractions, edges, fill=True, alpha=0.8)
        ax.set_title(f"{name}\nstep {shown[name]}, std {record.get('std', math.nan):.2g}", fontsize=8, **_LITERAL)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(layers) :]:
        ax.set_visible(False)
    steps = set(shown.values())
    where = f"step {steps.pop()}" if len(steps) == 1 else "latest step with finite values of each layer"
    fig.suptitle(title or f"activation histograms ({where})", fontsize=10)
    fig.supxlabel("activation", fontsize=8)
    fig.supylabel("fraction of values", fontsize=8)
    return fig


def percentile_bands(probe: Probe, layers: list[str] | None = None, ncols: int = 4, title: str | None = None) -> Figure:
    """The 15th–85th percentile band and the median of each layer over the recorded steps
    (Ioffe & Szegedy, 2015, Fig. 1b/c).

    Args:
        probe: the :class:`Probe` that recorded the activations.
        layers: the layer names to draw; None for every recorded layer. Default None.
        ncols: panels per row. Default 4.
        title: the figure's title; None for a default one. Default None.

    Returns:
        The matplotlib figure.
    """
    layers = layers or probe.layer_names
    if not layers:
        raise ValueError("nothing recorded yet")
    ncols = min(ncols, len(layers))
    nrows = math.ceil(len(layers) / ncols)
    fig = _figure(3.0 * ncols, 2.2 * nrows + 0.4)
    axes = fig.subplots(nrows, ncols, sharex=True, squeeze=False)
    for ax, name in zip(axes.flat, layers):
        steps, p15 = probe.series(name, "p15")
        _, p50 = probe.series(name, "p50")
        _, p85 = probe.series(name, "p85")
        ax.fill_between(steps, p15, p85, alpha=0.3, label="15th-85th")
        ax.plot(steps, p50, lw=1.2, label="median")
        ax.set_title(name, fontsize=8, **_LITERAL)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(layers) :]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title or "activation percentiles over training", fontsize=10)
    fig.supxlabel("step", fontsize=8)
    return fig


def gradient_norms(probe: Probe, key: str = "grad_norm", title: str | None = None, window: int = 5) -> Figure:
    """Gradient norm per layer (execution order, log scale): a slope down toward the
    input is vanishing, up is exploding. Each point is the median of the layer's last
    ``window`` records; a layer with a non-finite value among them is drawn as a red ×
    at the top of the axis, labelled, not as the median of the finite ones before it.

    Args:
        probe: the :class:`Probe` that recorded the gradients.
        key: the recorded number to draw. Default "grad_norm".
        title: the figure's title; None for a default one. Default None.
        window: the number of last records per layer whose median is drawn. Default 5.

    Returns:
        The matplotlib figure.
    """
    finite = probe.latest(key, window=window)
    raw = probe.latest(key, window=window, finite_only=False)
    if not raw:
        raise ValueError(f"no {key} recorded: enable gradients and run a backward pass")
    names = list(raw)
    bad = [i for i, n in enumerate(names) if not math.isfinite(raw[n])]
    fig = _figure(max(4.0, 0.5 * len(names) + 2), 3.0)
    ax = fig.subplots()
    good = [i for i in range(len(names)) if i not in bad]
    ax.plot(good, [max(finite[names[i]], 1e-30) for i in good], marker="o")
    ax.set_yscale("log")
    if bad:
        top = max([finite[names[i]] for i in good], default=1.0) * 10
        ax.plot(bad, [max(top, 1e-30)] * len(bad), "x", color="red", markersize=9, label="NaN/inf")
        ax.legend(fontsize=7)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7, **_LITERAL)
    ax.set_ylabel(key.replace("_", " "))
    ax.set_title(
        title
        or f"{key.replace('_', ' ')} per layer (median of the last {window} records)"
        + (f"; non-finite in {len(bad)}" if bad else ""),
        fontsize=10,
    )
    return fig


def figure_to_png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def figure_to_data_uri(fig: Figure) -> str:
    return "data:image/png;base64," + base64.b64encode(figure_to_png(fig)).decode("ascii")


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write a matplotlib figure to ``path`` (PNG, 110 dpi; parent folders created) and return
    the path. The figure stays open: close it with ``matplotlib.pyplot.close(fig)``.

    Args:
        fig: a matplotlib figure.
        path: where to write it.

    Returns:
        ``path`` as a :class:`pathlib.Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
