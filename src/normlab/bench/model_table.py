"""The tables of ``normlab bench models``: one row per model case as text, and the
markdown table the docs quote."""

from __future__ import annotations

from .common import text_table

__all__ = ["format_model_markdown", "format_model_table"]


def format_model_table(rows: list[dict]) -> str:
    header = (
        f"{'model':<45}{'layout':<14}{'mode':<6}{'input':<14}{'exec':<9}{'thr':>3} | "
        f"{'torch.nn ms':>11}{'normlab ms':>11}{'ratio':>7} | {'rel diff':>8} {'check':<5}"
    )
    return text_table(
        header,
        (
            f"{r['name']:<45}{r['layout']:<14}{r['mode']:<6}{r['input']:<14}"
            f"{'compiled' if r['compiled'] else 'eager':<9}{r['threads']:>3} | "
            f"{r['torch_ms']:>11.2f}{r['normlab_ms']:>11.2f}{r['ratio']:>7.2f} | "
            f"{r['max_rel_diff']:>8.1e} {'ok' if r['agrees'] else 'FAIL':<5}"
            for r in rows
        ),
    )


def _ms(value: float) -> str:
    """Milliseconds to three significant digits, without exponents."""
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def format_model_markdown(rows: list[dict]) -> str:
    """One line per (model, mode): each (exec, threads) column as 'ratio (normlab / torch.nn
    ms)', the form docs/performance.md and the README use."""
    columns = sorted({(r["compiled"], r["threads"]) for r in rows})
    heads = [f"{'compiled' if c else 'eager'}, {t} thr" for c, t in columns]
    lines = [
        "| model | layout | mode | input | " + " | ".join(heads) + " | agree |",
        "|---|---|---|---|" + "---|" * len(heads) + "---|",
    ]
    groups: dict[tuple, dict] = {}
    for r in rows:
        groups.setdefault((r["model"], r["mode"]), {})[(r["compiled"], r["threads"])] = r
    for group in groups.values():
        first = next(iter(group.values()))
        cells = [
            f"{group[c]['ratio']:.2f} ({_ms(group[c]['normlab_ms'])} / {_ms(group[c]['torch_ms'])})"
            if c in group
            else "–"
            for c in columns
        ]
        agree = sum(r["agrees"] for r in group.values())
        lines.append(
            f"| {first['name']} | {first['layout']} | {first['mode']} | {first['input']} | "
            + " | ".join(cells)
            + f" | {agree}/{len(group)} |"
        )
    return "\n".join(lines)
