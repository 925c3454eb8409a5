"""Run every case of the torch suite and print the differences, grouped.

    .venv/bin/python tests/torch_suite/survey.py [--filter GLOB] [--show N] [--ids]

Ignores the known-failure table: it shows what normlab does now, so the table in
``known_failures.py`` can be checked and updated. Grouping is by the problem text with
numbers and shapes masked, which puts one defect's cases together.
"""

from __future__ import annotations

import argparse
import collections
import fnmatch
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import suite
import torch
from known_failures import KNOWN, known_failure


def _signature(problem: str) -> str:
    text = re.sub(r"\(at flat index.*", "", problem)
    text = re.sub(r"-?\d+(\.\d+)?(e[-+]?\d+)?", "#", text)
    return re.sub(r"\(#(, #)*,?\)|\[#(, #)*\]", "(shape)", text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--filter", default="*", help="only case ids matching this glob")
    parser.add_argument("--show", type=int, default=3, help="example ids per group")
    parser.add_argument("--ids", action="store_true", help="print every failing id")
    args = parser.parse_args(argv)
    # Tiny tensors: one thread is 10-20x faster than an OpenMP team on a shared machine.
    torch.set_num_threads(1)

    start = time.perf_counter()
    runs = [(c, suite.run_module_case) for c in suite.module_cases()]
    runs += [(c, suite.run_functional_case) for c in suite.functional_cases()]
    runs += [(c, suite.run_error_case) for c in suite.error_cases()]
    runs = [(c, fn) for c, fn in runs if fnmatch.fnmatchcase(c.id, args.filter)]

    groups: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
    counts = collections.Counter()
    table_wrong = []
    for case, fn in runs:
        problems, skip = fn(case)
        kind = "skipped" if skip else ("failing" if problems else "matched")
        counts[kind] += 1
        entry = known_failure(case.id)
        if skip is None and bool(problems) != (entry is not None):
            table_wrong.append(
                (case.id, "fails, not in the table" if problems else f"passes, but the table says {entry[0]}")
            )
        for problem in problems:
            groups[_signature(problem)].append((case.id, problem))
        if skip:
            groups["SKIP " + _signature(skip)].append((case.id, skip))

    print(
        f"{len(runs)} cases: {counts['matched']} matched, {counts['failing']} failing, "
        f"{counts['skipped']} skipped ({time.perf_counter() - start:.1f} s)\n"
    )
    for signature, hits in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        ids = sorted({case_id for case_id, _ in hits})
        print(f"[{len(ids)} cases] {signature}")
        print(f"    e.g. {hits[0][0]}: {hits[0][1]}")
        for case_id in ids if args.ids else ids[1 : args.show]:
            print(f"    {case_id}")
        print()
    by_dtype = collections.defaultdict(list)
    for _, dtype, excess in suite.MARGINS:
        by_dtype[suite.dtype_name(dtype)].append(excess)
    print(
        "normlab's error minus torch.nn's, in ulps of the dtype at the tensor's scale "
        f"(allowed: {suite.SLACK_ULPS}; float64: {suite.FLOAT64_ULPS}):"
    )
    for name, values in sorted(by_dtype.items()):
        values.sort()
        pick = [values[int(q * (len(values) - 1))] for q in (0.5, 0.9, 0.99, 1.0)]
        print(
            f"    {name}: {len(values)} tensors; median {pick[0]:.2f}, 90% {pick[1]:.2f}, "
            f"99% {pick[2]:.2f}, max {pick[3]:.2f}"
        )
    print()
    print(f"table: {len(KNOWN)} patterns; {len(table_wrong)} cases disagree with it")
    for case_id, why in table_wrong[:50]:
        print(f"    {case_id}: {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
