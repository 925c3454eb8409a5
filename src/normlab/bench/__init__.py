"""normlab.bench — benchmarks that print ratios measured in the same run.

Timings never appear in tests. Each benchmark interleaves the things it compares, takes
medians over repetitions, and reports ratios, so that a noisy shared machine moves both
sides alike.
"""

from .fold import FoldBenchConfig, run_fold_benchmark
from .timing import interleaved_medians

__all__ = ["FoldBenchConfig", "interleaved_medians", "run_fold_benchmark"]
