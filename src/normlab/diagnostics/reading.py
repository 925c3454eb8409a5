"""The Probe's reading half: records summarized when they are read (histogram ranges,
percentiles), the series and latest values findings use, and the warnings about what was
not recorded."""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .summaries import Record, saturation_band, summarize_records

if TYPE_CHECKING:
    from .recorder import Series

__all__ = ["Reader"]


def _nice_bound(value: float) -> float:
    """The smallest of 1, 2, 5 × 10^k that is ≥ value (histogram ranges people can read)."""
    if not value > 0 or not math.isfinite(value):
        return 1.0
    exponent = math.floor(math.log10(value))
    for step in (1.0, 2.0, 5.0, 10.0):
        # int ** int is typed Any (a negative power is a float): the product is a float
        bound: float = step * 10**exponent
        if bound >= value:
            return bound
    return 10.0 ** (exponent + 1)


class Reader:
    """Reading a :class:`~normlab.diagnostics.Probe`'s records; nothing here touches the
    model."""

    # The state this half reads (set by Probe.__init__ and the recording half).
    layers: dict[str, nn.Module]
    order: list[str]
    bins: int
    hist_range: tuple[float, float] | None
    _recorded_steps: int
    _seen: set[str]
    _unrecordable: dict[str, str]
    _warned: set[str]
    _compiled_inside: bool
    _permanent: bool
    _ranges: dict[str, tuple[float, float]]
    _series: dict[str, Series]

    # --- reading ---------------------------------------------------------------------------

    @property
    def layer_names(self) -> list[str]:
        """Watched layers that have run, in execution order."""
        return list(self.order)

    @property
    def unrecorded(self) -> dict[str, str]:
        """Selected layers with no record although recorded steps ran, and why."""
        if not self._recorded_steps:
            return {}
        out: dict[str, str] = {}
        for name in self.layers:
            if name in self._seen:
                continue
            if name in self._unrecordable:
                out[name] = self._unrecordable[name]
            else:
                out[name] = "never called during a recorded forward"
        return out

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _check_coverage(self) -> None:
        if not self._recorded_steps:
            self._warn_once(
                "nothing",
                "the Probe recorded nothing: no training-mode forward of the probed model itself ran while it was "
                "attached (calling one of its submodules directly does not count; eval-mode forwards count "
                "only with record_eval=True)",
            )
        if self._compiled_inside:
            self._warn_once(
                "compiled",
                "the model ran inside torch.compile after the Probe was attached, so the compiled graph "
                "keeps the hooks it first saw and the records are incomplete; attach the Probe to the "
                "compiled module instead: Probe(torch.compile(model))",
            )
        missing = self.unrecorded
        if self._permanent and missing and len(missing) == len(self.layers):
            self._warn_once(
                "compiled-before",
                f"no layer recorded in {self._recorded_steps} recorded steps: torch.compile had compiled this "
                "model's code before the Probe's hooks were registered, and it does not look at hooks again; "
                "attach the Probe before the compiled model's first call (or call torch._dynamo.reset() first)",
            )
        elif missing:
            listed = "; ".join(f"{name}: {why}" for name, why in missing.items())
            self._warn_once("unrecorded:" + ",".join(missing), f"selected layers have no records: {listed}")

    def _range(self, layer: str) -> tuple[float, float]:
        if self.hist_range is not None:
            return self.hist_range
        if layer not in self._ranges:
            band = saturation_band(self.layers[layer])
            if band is not None:
                self._ranges[layer] = band[0]
            else:
                first = next((r for r in self._series[layer].records if "_sample" in r), None)
                if first is None:
                    return (-1.0, 1.0)  # nothing to read yet; not fixed
                extremes = torch.stack([first["_min"], first["_max"]]).float()
                if not torch.isfinite(extremes).all():
                    sample = first["_sample"].float()
                    extremes = sample[torch.isfinite(sample)]
                bound = extremes.abs().max().item() if extremes.numel() else 1.0
                self._ranges[layer] = (-_nice_bound(bound), _nice_bound(bound))
        return self._ranges[layer]

    def _summarized(self, layer: str) -> list[Record]:
        records = self._series[layer].records
        band = saturation_band(self.layers[layer])
        summarize_records(records, bins=self.bins, hist_range=self._range(layer), band=band)
        return records

    def records(self, layer: str) -> list[dict[str, Any]]:
        """The layer's records, oldest first, as dicts of numbers."""
        if layer not in self._series:
            raise KeyError(f"{layer!r} is not a watched layer; watched: {list(self.layers)}")
        return [dict(r) for r in self._summarized(layer)]

    def series(self, layer: str, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of one recorded quantity of one layer."""
        rows = [(r["step"], r[key]) for r in self._summarized(layer) if key in r]
        return [s for s, _ in rows], [v for _, v in rows]

    def latest(self, key: str, window: int = 1, *, finite_only: bool = True) -> dict[str, float]:
        """Per layer (execution order), the median of ``key`` over its last ``window``
        records that have it. With ``finite_only`` (the default) NaN values are ignored
        (a quantity that could not be computed that step, e.g. a drift when the batch was
        NaN; non-finite steps are reported as such by ``findings``); without, a NaN among
        them makes the value NaN."""
        out: dict[str, float] = {}
        for name in self.order:
            values = [r[key] for r in self._summarized(name) if key in r][-window:]
            if not values:
                continue
            tensor = torch.tensor(values, dtype=torch.float64)
            median = tensor.nanmedian().item() if finite_only else tensor.median().item()
            if not finite_only or not math.isnan(median):
                out[name] = float(median)
        return out

    def histogram(self, layer: str, step: int | None = None) -> tuple[list[float], list[float]]:
        """(bin edges, fractions) of ``layer`` at ``step`` (default: its latest record
        with a histogram; see :meth:`histogram_step` for which step that is)."""
        record = self._histogram_record(layer, step)
        lo, hi = self._range(layer)
        edges = torch.linspace(lo, hi, self.bins + 1).tolist()
        return edges, record["hist"]

    def histogram_step(self, layer: str, step: int | None = None) -> int:
        """The step whose histogram :meth:`histogram` returns (the nearest recorded one
        that has finite values)."""
        found: int = self._histogram_record(layer, step)["step"]
        return found

    def _histogram_record(self, layer: str, step: int | None) -> Record:
        records = [r for r in self._summarized(layer) if "hist" in r]
        if not records:
            raise ValueError(f"no histogram recorded for layer {layer!r}")
        return records[-1] if step is None else min(records, key=lambda r: abs(r["step"] - step))
