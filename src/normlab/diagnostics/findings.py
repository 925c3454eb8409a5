"""Turn a Probe's records into plain, actionable diagnoses."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypedDict

from .. import nn as nln
from .layers import WEIGHT_LAYERS
from .summaries import ACTIVATIONS

if TYPE_CHECKING:
    from .probe import Probe

__all__ = ["Finding", "Thresholds", "diagnose"]


@dataclass
class Finding:
    """One problem :func:`diagnose` found. ``str(finding)`` is its one-line form.

    Attributes:
        kind: "vanishing_gradients", "exploding_gradients", "nonfinite", "collapse",
            "saturation", "dead_units" or "stat_drift".
        layers: the names of the layers it concerns (as in ``model.named_modules()``).
        message: what was measured, with the numbers, in one sentence.
        suggestion: what to try, in one sentence.
        numbers: the measured values by name, for programs.
    """

    kind: str
    layers: list[str]
    message: str
    suggestion: str
    numbers: dict[str, float | dict[str, float]] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"[{self.kind}] {self.message} Suggestion: {self.suggestion}"


class Thresholds(TypedDict, total=False):
    """The keyword arguments of :func:`diagnose` after ``probe``, each optional: what
    :meth:`Probe.findings <normlab.diagnostics.Probe.findings>` and ``Probe.report`` pass on."""

    vanishing_ratio: float
    exploding_ratio: float
    collapse_ratio: float
    saturation_threshold: float
    dead_threshold: float
    drift_threshold: float
    window: int


def _fmt(values: dict[str, float], digits: int = 3) -> str:
    return ", ".join(f"{k}: {v:.{digits}g}" for k, v in values.items())


def _ends(names: list[str]) -> tuple[str, str] | None:
    return (names[0], names[-1]) if len(names) >= 2 else None


def diagnose(
    probe: Probe,
    *,
    vanishing_ratio: float = 1e3,
    exploding_ratio: float = 1e3,
    collapse_ratio: float = 1e-2,
    saturation_threshold: float = 0.3,
    dead_threshold: float = 0.4,
    drift_threshold: float = 0.5,
    window: int = 5,
) -> list[Finding]:
    """Findings from the last ``window`` records of each layer (medians).

    - vanishing gradients: the first weight layer learns more than ``vanishing_ratio``
      times more slowly than the last — by what a step does to the weights: the
      update-to-weight ratio ‖Δw‖/‖w‖ without its weight decay (``learning_ratio``)
      when an optimizer is hooked, else (and where coupled weight decay is inside the
      step, SGD's or Adam's ``weight_decay``) the relative gradient ‖∇w‖/‖w‖ (an SGD
      step's ratio over the learning rate). Decay shrinks every weight by lr·wd, learning
      or not; a raw gradient norm would also move with the input's scale (a LayerNorm
      divides it out), which leaves learning unchanged;
    - exploding gradients: the first learns more than ``exploding_ratio`` times faster;
    - non-finite: a NaN/inf in an activation or gradient of the last records;
    - collapse: the activation std of the last layer is below ``collapse_ratio`` × the
      first's (activations shrinking toward 0 with depth), compared within each stretch
      between normalization layers (a norm resets the scale);
    - saturation: a tanh/sigmoid layer has more than ``saturation_threshold`` of its
      outputs in the flat tails (Hardtanh/Hardsigmoid: at their bounds);
    - dead units: more than ``dead_threshold`` of a layer's units pass no gradient
      anywhere on the batch (ReLU never positive; ReLU6 stuck at 0 or 6; Hardswish below −3)
      — measured only for activations that have such a flat region;
    - statistic drift: a BatchNorm's batch statistics (over valid positions, for a
      masked layer) are more than ``drift_threshold`` running standard deviations away
      from its running ones.

    Args:
        probe: the :class:`Probe` that recorded the training steps.
        vanishing_ratio: keyword-only; the first-to-last learning ratio flagged as vanishing.
            Default 1e3.
        exploding_ratio: keyword-only; the last-to-first ratio flagged as exploding. Default 1e3.
        collapse_ratio: keyword-only; the last-to-first activation std ratio flagged as
            collapse. Default 1e-2.
        saturation_threshold: keyword-only; the saturated fraction flagged. Default 0.3.
        dead_threshold: keyword-only; the dead-unit fraction flagged. Default 0.4.
        drift_threshold: keyword-only; the drift, in running standard deviations, flagged.
            Default 0.5.
        window: keyword-only; the number of last records per layer whose median is judged.
            Default 5.

    Returns:
        The findings; [] when nothing is wrong.
    """
    found: list[Finding] = []
    layers = probe.layers
    order = probe.layer_names
    weight_layers = [n for n in order if isinstance(layers[n], WEIGHT_LAYERS)]
    activation_layers = [n for n in order if isinstance(layers[n], ACTIVATIONS)]

    nonfinite = [
        n
        for n in order
        for r in probe.records(n)[-window:]
        if r.get("nonfinite", 0) or r.get("grad_nonfinite", 0) or r.get("weight_grad_nonfinite", 0)
    ]
    if nonfinite:
        names = sorted(set(nonfinite), key=order.index)
        found.append(
            Finding(
                "nonfinite",
                names,
                f"Non-finite activations or gradients (NaN/inf) in {', '.join(names)}.",
                "Lower the learning rate, clip gradients (torch.nn.utils.clip_grad_norm_), and check "
                "the input data and loss for NaN/inf.",
            )
        )

    # What a step does to each weight, weight decay left out (it shrinks every weight,
    # learning or not): measured with the optimizer, else ∝ for SGD. Where coupled decay
    # is inside the step there is no learning part to measure: the gradient is used.
    learning = probe.latest("learning_ratio", window)
    key = "learning_ratio" if learning and all(n in learning for n in probe.latest("update_ratio", window)) else None
    key = key or "relative_grad"
    rates = {n: v for n, v in probe.latest(key, window).items() if math.isfinite(v)}
    rated = [n for n in weight_layers if n in rates]
    ends = _ends(rated)
    what = (
        "update-to-weight ratio (weight decay left out)"
        if key == "learning_ratio"
        else "relative weight gradient |grad W|/|W|"
    )
    if ends:
        first, last = ends
        ratio = rates[last] / rates[first] if rates[first] > 0 else math.inf
        per_layer = {n: rates[n] for n in rated}
        if ratio > vanishing_ratio:
            found.append(
                Finding(
                    "vanishing_gradients",
                    [first, last],
                    f"Early layers barely learn: the {what} of {first} ({rates[first]:.3g}) is "
                    f"{ratio:.3g}x smaller than that of {last} ({rates[last]:.3g}). Per layer: {_fmt(per_layer)}.",
                    "Use He initialization for ReLU layers (Xavier for tanh), avoid saturating activations "
                    "(sigmoid) in deep stacks, add normalization (BatchNorm, or GroupNorm at small batch "
                    "sizes) between layers, or residual connections.",
                    {"ratio_last_over_first": ratio, key: per_layer},
                )
            )
        elif ratio > 0 and 1 / ratio > exploding_ratio:
            found.append(
                Finding(
                    "exploding_gradients",
                    [first, last],
                    f"Early layers change far faster than late ones: the {what} of {first} ({rates[first]:.3g}) "
                    f"is {1 / ratio:.3g}x larger than that of {last} ({rates[last]:.3g}). "
                    f"Per layer: {_fmt(per_layer)}.",
                    "Lower the learning rate, clip gradients (torch.nn.utils.clip_grad_norm_), use a "
                    "smaller-gain initialization, or add normalization.",
                    {"ratio_first_over_last": 1 / ratio, key: per_layer},
                )
            )

    stds = probe.latest("std", window)
    spread = [n for n in (activation_layers or weight_layers) if n in stds]
    # A normalization layer resets the scale, so activations before it and after it are not
    # one trend: compare the ends of each stretch between normalization layers.
    norm_positions = [order.index(n) for n in order if nln.is_norm_layer(layers[n])]
    stretches: dict[int, list[str]] = {}
    for n in spread:
        stretches.setdefault(sum(p < order.index(n) for p in norm_positions), []).append(n)
    collapsing = [
        (stds[e[1]] / stds[e[0]], stretch)
        for stretch in stretches.values()
        if (e := _ends(stretch)) and stds[e[0]] > 0 and stds[e[1]] / stds[e[0]] < collapse_ratio
    ]
    if collapsing:
        _, stretch = min(collapsing, key=lambda pair: pair[0])
        first, last = stretch[0], stretch[-1]
        per_layer = {n: stds[n] for n in stretch}
        found.append(
            Finding(
                "collapse",
                [first, last],
                f"Activations collapse toward 0 with depth: std {stds[first]:.3g} at {first} falls to "
                f"{stds[last]:.3g} at {last} ({stds[last] / stds[first]:.2g}x). Per layer: {_fmt(per_layer)}.",
                "The weights are too small for the depth: use Xavier initialization for tanh/sigmoid "
                "or He for ReLU, or add normalization before each activation.",
                {"std": per_layer},
            )
        )

    # units past a threshold on their own, one finding each: (kind, the probe's metric, threshold,
    # what it says with the fractions in place of {}, what to do)
    for kind, metric, threshold, text, advice in (
        (
            "saturation",
            "saturated",
            saturation_threshold,
            "Saturated units (tanh |a| ≥ 0.99, sigmoid outside [0.01, 0.99], Hardtanh/Hardsigmoid at their "
            "bounds): {} of outputs in the flat tails, where the gradient is almost 0.",
            "The pre-activations are too large: use Xavier initialization (gain 1 for tanh, the 4x bound "
            "for sigmoid), add normalization before the activation, or lower the learning rate.",
        ),
        (
            "dead_units",
            "dead",
            dead_threshold,
            "Dead units (their activation passes no gradient anywhere on the batch, e.g. a ReLU "
            "never positive): {} of units.",
            "Check for large negative biases and lower the learning rate; use He initialization, "
            "normalization before the activation, or an activation that passes gradient on its "
            "negative side (LeakyReLU, ELU, GELU).",
        ),
    ):
        over = {n: v for n, v in probe.latest(metric, window).items() if v > threshold}
        if over:
            found.append(Finding(kind, list(over), text.format(_fmt(over, 2)), advice, {metric: over}))

    drift = probe.latest("mean_drift", window)
    std_drift = probe.latest("std_drift", window)
    drifting = {n: max(drift.get(n, 0.0), std_drift.get(n, 0.0)) for n in set(drift) | set(std_drift)}
    drifting = {n: v for n, v in sorted(drifting.items(), key=lambda kv: order.index(kv[0])) if v > drift_threshold}
    if drifting:
        found.append(
            Finding(
                "stat_drift",
                list(drifting),
                f"Batch statistics are far from the running estimates (in running std units): {_fmt(drifting, 2)}. "
                f"Eval mode will normalize differently from training.",
                "Typical of small or non-i.i.d. batches: use GroupNorm (or BatchRenorm), larger batches, or "
                "recompute the statistics with normlab.surgery.precise_bn before evaluating.",
                {"drift": drifting},
            )
        )
    return found
