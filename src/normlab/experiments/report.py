"""One self-contained HTML page for a set of study results, beside their JSON and PNGs."""

from __future__ import annotations

import html
from pathlib import Path

from .output import atomic_write_text, machine_info

__all__ = ["STATES", "VERDICTS", "render_report", "write_report"]

VERDICTS = ("yes", "partly", "no")
#: What a report says about its run: every study finished, still running (the page is
#: rewritten after each study, so a run killed outright leaves this), or stopped early.
STATES = ("complete", "running", "interrupted")

_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222;
       line-height: 1.45; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 2.2em; border-bottom: 1px solid #ccc; }
.meta { color: #666; font-size: 0.9em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.85em; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
.yes { background: #e6f4e6; } .partly { background: #fdf3d8; } .no { background: #f9e0e0; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; }
.error { color: #a00; font-weight: bold; }
.partial { border: 2px solid #a00; background: #f9e0e0; padding: 0.6em 1em; font-weight: bold; }
details summary { cursor: pointer; color: #335; }
"""


def _e(value) -> str:
    return html.escape(str(value))


def _table(columns, rows, classes=None) -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = []
    for i, row in enumerate(rows):
        # Only the known verdicts become a class: the value comes from a JSON file and is
        # not trusted to be safe inside an attribute.
        cls = f' class="{classes[i]}"' if classes and classes[i] in VERDICTS else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _figure(folder: str, fig: dict, lazy: bool = False) -> str:
    loading = ' loading="lazy"' if lazy else ""
    return (
        f'<figure><img src="{_e(folder)}/{_e(fig["file"])}" alt="{_e(fig["caption"])}"{loading}>'
        f"<figcaption>{_e(fig['caption'])}</figcaption></figure>"
    )


def _section(result: dict, folder: str) -> str:
    parts = [
        f'<h2 id="{_e(result["study"])}">{_e(result["title"])}</h2>',
        f'<p class="meta">normlab run {_e(result["study"])} — setting {_e(result.get("setting", ""))}, '
        f"{result.get('seconds') or 0:.0f} s. {_e(result['question'])}</p>",
    ]
    if result.get("error"):
        parts.append(f'<p class="error">This study failed: {_e(result["error"])}</p>')
        return "\n".join(parts)
    if result.get("summary"):
        parts.append("<ul>" + "".join(f"<li>{_e(s)}</li>" for s in result["summary"]) + "</ul>")
    if result.get("comparison"):
        parts.append("<h3>Published vs ours</h3>")
        rows = [[c["what"], c["published"], c["ours"], c["agrees"], c.get("why", "")] for c in result["comparison"]]
        parts.append(
            _table(
                ["claim", "published", "ours", "agrees", "why it differs"],
                rows,
                [c["agrees"] for c in result["comparison"]],
            )
        )
    figures = result.get("figures", [])
    for fig in (f for f in figures if not f.get("folded")):
        parts.append(_figure(folder, fig))
    folded = [f for f in figures if f.get("folded")]
    if folded:  # many figures alike (one per configuration): out of the way, one click each
        parts.append(f"<details><summary>{len(folded)} more figures, one per configuration</summary>")
        parts.extend(_figure(folder, fig, lazy=True) for fig in folded)
        parts.append("</details>")
    for table in result.get("tables", []):
        parts.append(f"<h3>{_e(table['title'])}</h3>" + _table(table["columns"], table["rows"]))
        if table.get("note"):
            parts.append(f'<p class="meta">{_e(table["note"])}</p>')
    parts.append(
        f'<p class="meta">Every number: <a href="{_e(folder)}/result.json">{_e(folder)}/result.json</a>'
        f" (config included).</p>"
    )
    return "\n".join(parts)


def _banner(state: str, done: int, pending: list[str], reason: str) -> str:
    total = done + len(pending)
    if state == "running":
        return (
            f'<p class="partial">In progress: {done} of {total} studies finished so far. If no normlab '
            "process is still writing here, the run was stopped before it finished and this report is "
            "partial: run it again for a complete one.</p>"
        )
    return (
        f'<p class="partial">Interrupted{f" ({_e(reason)})" if reason else ""} after {done} of {total} '
        f"studies: this report is partial. Not finished: {_e(', '.join(pending))}. Run it again for a "
        "complete report.</p>"
    )


def render_report(
    results: list[dict],
    *,
    setting: str,
    seconds: float,
    machine: dict | None = None,
    state: str = "complete",
    pending: list[str] | tuple[str, ...] = (),
    reason: str = "",
) -> str:
    """The page for ``results``. ``state`` is one of :data:`STATES`; when the run is not
    complete, a banner says so and ``pending`` lists the studies it has not finished."""
    if state not in STATES:
        raise ValueError(f"state must be one of {STATES}, got {state!r}")
    pending = list(pending)
    machine = machine or machine_info()
    verdicts = [c["agrees"] for r in results for c in r.get("comparison", [])]
    counts = ", ".join(f"{verdicts.count(v)} {v}" for v in VERDICTS)
    toc = "".join(
        f'<li><a href="#{_e(r["study"])}">{_e(r["title"])}</a>{" — failed" if r.get("error") else ""}</li>'
        for r in results
    )
    toc += "".join(f"<li>{_e(name)} — not finished</li>" for name in pending)
    banner = "" if state == "complete" else _banner(state, len(results), pending, reason)
    head = (
        f"<h1>normlab studies{'' if state == 'complete' else f' ({state}, partial)'}</h1>{banner}"
        f'<p class="meta">Setting <b>{_e(setting)}</b>; {len(results)} studies in {seconds:.0f} s on '
        f"{_e(machine.get('cores'))} CPU cores ({_e(machine.get('cpu'))}), Python {_e(machine.get('python'))}, "
        f"torch {_e(machine.get('torch'))}. Published claims checked: {counts}.</p>"
        "<p>Every study runs on data generated or shipped offline (MNIST-1D, Gaussian features) with small "
        "models on a CPU, so the published numbers — mostly ImageNet-scale — are compared in shape and "
        "direction, not in value. Where ours differ, the table says so and why.</p>"
        f"<ol>{toc}</ol>"
    )
    body = "\n".join(_section(r, r["study"]) for r in results)
    title = f"normlab studies ({_e(setting)}{'' if state == 'complete' else f', {state}'})"
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>"
        f"<style>{_CSS}</style></head><body>{head}{body}</body></html>"
    )


def write_report(
    results: list[dict],
    out_dir: Path,
    *,
    setting: str,
    seconds: float,
    state: str = "complete",
    pending: list[str] | tuple[str, ...] = (),
    reason: str = "",
) -> Path:
    page = render_report(results, setting=setting, seconds=seconds, state=state, pending=pending, reason=reason)
    return atomic_write_text(out_dir / "index.html", page)
