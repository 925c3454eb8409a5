"""``normlab bench``: benchmarks that print ratios measured in the same run."""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..bench.models import MODEL_KEYS
from ..experiments.output import machine_info
from .common import CommandError, SubcommandParser, atomic_write_json, out_checked, positive_int, write_out

__all__ = ["add_parser"]


def _write_result(args: argparse.Namespace, benchmark: str, **payload: Any) -> None:
    """--out, where given: the benchmark's name, the machine, then its own fields."""
    write_out(args, {"benchmark": benchmark, "machine": machine_info(), **payload})


def _report(args: argparse.Namespace, benchmark: str, header: str, table: str, **payload: Any) -> int:
    """A finished benchmark: its header line and table on stdout, then --out where given; exit status 0."""
    print(header)
    print(table)
    _write_result(args, benchmark, **payload)
    return 0


def run_fold(args: argparse.Namespace) -> int:
    from ..bench.fold import FoldBenchConfig, format_fold_table, run_fold_benchmark

    config = FoldBenchConfig(
        repeats=7 if args.quick else 21, threads=args.threads, widths=(64,) if args.quick else (64, 16)
    )
    rows = run_fold_benchmark(config)
    return _report(
        args,
        "fold",
        "eval inference, torch.nn BatchNorm unfolded vs folded into the convolutions "
        f"(median of {config.repeats}, interleaved, {config.threads} threads)",
        format_fold_table(rows),
        rows=rows,
    )


def run_probe(args: argparse.Namespace) -> int:
    from ..bench.probe import ProbeBenchConfig, format_probe_table, run_probe_benchmark

    config = ProbeBenchConfig(repeats=15 if args.quick else 61)
    rows = run_probe_benchmark(config)
    return _report(
        args,
        "probe",
        f"training step of a small CNN (batch {config.batch_size}, {config.threads} thread) "
        f"with a Probe on every layer, median of {config.repeats} x {config.steps_per_sample} steps, "
        f"interleaved, process CPU time",
        format_probe_table(rows),
        rows=rows,
    )


def run_sync(args: argparse.Namespace) -> int:
    from ..bench.sync import SyncBenchConfig, format_sync_table, run_sync_benchmark

    config = SyncBenchConfig(repeats=7 if args.quick else 21)
    result = run_sync_benchmark(config)
    return _report(
        args,
        "sync",
        f"2-process gloo DDP training step of a small CNN (3 BatchNorm layers), batch {config.batch_size} "
        f"per process, one thread each, median of {config.repeats} interleaved blocks of {config.steps_per_sample} steps",
        format_sync_table(result),
        **result,
    )


def _device(args: argparse.Namespace) -> str:
    """--device checked before any work: a clear error where it cannot run."""
    from ..bench.common import check_device

    try:
        return str(check_device(args.device))
    except ValueError as err:
        raise CommandError(str(err)) from None


def run_layers(args: argparse.Namespace) -> int:
    from ..bench.layers import format_layer_table, run_layer_benchmark, summary, tune_malloc
    from ..core import paths

    device = _device(args)
    tuned = False if args.default_malloc else tune_malloc()
    print(
        f"normlab vs torch.nn, float32, times as multiples of copying the same tensor (preallocated); "
        f"medians of interleaved repetitions; device {device}; {paths.status()}; malloc "
        f"{'keeps freed memory' if tuned else 'default'}",
        flush=True,
    )
    rows = run_layer_benchmark(
        quick=args.quick,
        threads=tuple(args.threads),
        device=device,
        progress=(
            lambda r: print(
                f"  {r['layer']} {r['shape']} {r['layout']} "
                f"{r['threads']} thr: fwd {r['fwd_ratio']:.2f} "
                f"f+b {r.get('fb_ratio', float('nan')):.2f}",
                flush=True,
            )
        )
        if args.verbose
        else None,
    )
    print(format_layer_table(rows))
    goals = summary(rows)
    print(
        f"\nnot slower than torch.nn (fwd and f+b ratio <= 1): {goals['not_slower_than_torch']}/{goals['rows']} rows; "
        f"training fwd <= 2x copy: {goals['train_fwd_le_2x_copy']}/{goals['train_rows']}; "
        f"f+b <= 5x copy: {goals['train_fb_le_5x_copy']}/{goals['train_rows']}; "
        f"eval BatchNorm <= 1.2x copy: {goals['eval_bn_le_1_2x_copy']}/{goals['eval_bn_rows']}; "
        f"add+norm f+b <= 0.6x unfused torch: {goals['add_norm_fb_le_0_6x_torch']}/{goals['add_norm_rows']}, "
        f"keeping no more: {goals['add_norm_saved_le_torch']}/{goals['add_norm_rows']}; "
        f"within 1e-5 relative of torch.nn: {goals['within_1e-5_of_torch']}/{goals['rows']}; "
        f"no less accurate than torch.nn against float64: {goals['no_less_accurate_than_torch']}/{goals['rows']} "
        f"(worst error: normlab {goals['max_err_ours']:.1e}, torch.nn {goals['max_err_torch']:.1e})"
    )
    _write_result(args, "layers", device=device, malloc_tuned=tuned, backend=paths.status(), summary=goals, rows=rows)
    return 0


def run_masked(args: argparse.Namespace) -> int:
    from ..bench.layers import tune_malloc
    from ..bench.masked import format_masked_table, run_masked_benchmark
    from ..core import paths

    tuned = tune_malloc()
    print(
        f"normlab masked norms vs the same layer unmasked, float32 CPU; medians of interleaved repetitions; "
        f"{paths.status()}; malloc {'keeps freed memory' if tuned else 'default'}",
        flush=True,
    )
    rows = run_masked_benchmark(quick=args.quick, threads=tuple(args.threads), repeats=args.repeats)
    print(format_masked_table(rows))
    within = sum(r["fwd_masked_plain"] <= 1.5 and r["fb_masked_plain"] <= 1.5 for r in rows)
    print(
        f"\nmasked <= 1.5x unmasked (fwd and f+b): {within}/{len(rows)} rows; worst error vs float64: "
        f"masked {max(r['err_masked'] for r in rows):.1e}, composed {max(r['err_composed'] for r in rows):.1e}"
    )
    _write_result(args, "masked", backend=paths.status(), rows=rows)
    return 0


def run_models(args: argparse.Namespace) -> int:
    from ..bench.common import tune_malloc
    from ..bench.models import (
        ModelBenchConfig,
        format_model_markdown,
        format_model_table,
        quick_config,
        run_model_benchmark,
        smoke_config,
        summary,
    )
    from ..core import paths

    device = _device(args)
    settings: dict[str, Any] = dict(
        models=tuple(args.models),
        modes=tuple(args.modes),
        compiled=(False,) if args.no_compile else (False, True),
        threads=tuple(args.threads),
        device=device,
    )
    if args.repeats:
        settings["repeats"] = args.repeats
    config = (smoke_config if args.smoke else quick_config if args.quick else ModelBenchConfig)(**settings)
    tuned = False if args.default_malloc else tune_malloc()
    print(
        "torch.nn model vs the same model after nl.surgery.from_torch, float32; train = forward, "
        "cross-entropy, backward, SGD step; eval = batch-1 inference without autograd; "
        f"medians of {config.repeats} interleaved repetitions (compilation left out); device {device}; "
        f"{paths.status()}; malloc {'keeps freed memory' if tuned else 'default'}"
        + ("; smoke setting: tiny shapes, the times mean nothing" if args.smoke else ""),
        flush=True,
    )
    progress = None
    if args.verbose:

        def progress(r: dict[str, Any]) -> None:
            print(
                f"  {r['model']} {r['mode']} {'compiled' if r['compiled'] else 'eager'} {r['threads']} thr: "
                f"ratio {r['ratio']:.2f} ({r['row_s']:.0f} s)",
                flush=True,
            )

    rows = run_model_benchmark(config, progress=progress)
    print(format_model_table(rows))
    for r in rows:
        if r["compiled"] and r["graphs_normlab"] != r["graphs_torch"]:
            print(
                f"note: {r['model']} {r['mode']} {r['threads']} thr compiled [graphs, graph breaks] "
                f"normlab {r['graphs_normlab']}, torch.nn {r['graphs_torch']} over the first two calls"
            )
    if args.markdown:
        print("\n" + format_model_markdown(rows))
    result = summary(rows)
    print(
        f"\nnot slower than torch.nn (ratio <= 1): {result['not_slower_than_torch']}/{result['rows']} rows "
        f"(median ratio {result['median_ratio']:.2f}, largest {result['max_ratio']:.2f}); "
        f"the two models agree after the same two steps (within {result['tolerance']:.0e} relative): "
        f"{result['agree']}/{result['rows']}"
    )
    _write_result(
        args,
        "models",
        device=device,
        malloc_tuned=tuned,
        backend=paths.status(),
        config=asdict(config),
        summary=result,
        rows=rows,
    )
    if result["disagreeing"]:
        print(
            "normlab bench models: the two models disagree in " + "; ".join(result["disagreeing"]),
            file=sys.stderr,
        )
        return 1
    return 0


def run_memory(args: argparse.Namespace) -> int:
    from ..bench.memory import MemoryBenchConfig, format_memory_table, run_memory_benchmark

    config = MemoryBenchConfig(batch=args.batch, threads=args.threads, device=_device(args))
    rows = run_memory_benchmark(config)
    return _report(
        args,
        "memory",
        f"training memory of a ResNet-style CNN ({config.blocks} blocks, width {config.width}, "
        f"{config.image}x{config.image} images, batch {config.batch}) on {config.device}; each variant in its own process; "
        "saved = bytes autograd keeps for backward (activations over 64 KiB)",
        format_memory_table(rows),
        config=asdict(config),
        rows=rows,
    )


def run_traffic(args: argparse.Namespace) -> int:
    from ..bench.traffic import format_traffic_table
    from ..bench.traffic import run_traffic as count
    from ..core.kernels import triton as triton_kernels

    if not triton_kernels.interpreted() or not triton_kernels.available():
        raise CommandError(
            "normlab bench traffic counts the Triton kernels' bytes inside Triton's interpreter: install "
            "triton and run with TRITON_INTERPRET=1 in the environment (it runs on the CPU, no GPU needed)"
        )
    print(
        "bytes (as passes over the input) and kernel launches per call, forward and backward — counted, "
        "not timed: torch.nn and normlab without Triton on the meta device, the Triton kernels on the "
        "meta device and inside Triton's interpreter (GPU tiling); see normlab.bench.traffic",
        flush=True,
    )
    rows = count(
        tuple(args.only) if args.only else None,
        progress=(lambda r: print(f"  {r['call']}", flush=True)) if args.verbose else None,
    )
    print(format_traffic_table(rows))
    _write_result(args, "traffic", rows=rows)
    return 0


def run_triton(args: argparse.Namespace) -> int:
    from ..bench.gpu import card_name, format_triton_rows, time_triton_rows
    from ..core.kernels import triton as triton_kernels

    device = _device(args)
    if not triton_kernels.available():
        raise CommandError(f"normlab bench triton: {triton_kernels.status()}")
    if device.startswith("cuda") and triton_kernels.interpreted():
        raise CommandError("normlab bench triton --device cuda times compiled kernels: unset TRITON_INTERPRET")
    if device == "cpu" and not triton_kernels.interpreted():
        raise CommandError("normlab bench triton --device cpu runs the kernels under TRITON_INTERPRET=1 only")
    card = card_name(device) if device.startswith("cuda") else "Triton's interpreter (CPU; times mean nothing)"
    rows = time_triton_rows(device, repeats=args.repeats, small=args.small)
    print(format_triton_rows(rows, card))
    _write_result(args, "triton", card=card, rows=rows)
    return 0 if all(r["max_rel_diff"] < 1e-4 for r in rows) else 1


def run_gpu(args: argparse.Namespace) -> int:
    from ..bench.gpu import BUDGET_S, CUDA_TEST_FILES, card_name, cuda_tests, plan, run_steps

    tests_dir = Path(args.tests)
    steps = plan(
        tests_dir=tests_dir,
        out_dir=Path(args.out_dir) if args.out_dir else None,
        quick=args.quick,
    )
    if args.dry_run:
        print(f"normlab bench gpu would run, within {sum(s.timeout_s for s in steps)} s (budget {BUDGET_S} s):")
        for step in steps:
            print(f"  {step.name} (limit {step.timeout_s} s): {' '.join(step.argv)}")
        if not cuda_tests(tests_dir):
            names = " or ".join(CUDA_TEST_FILES)
            print(f"  (no CUDA tests: no {names} under {tests_dir}; pass --tests PATH to the repository's tests/)")
        return 0
    import torch

    if not torch.cuda.is_available():
        print(f"normlab bench gpu: skipped — this torch ({torch.__version__}) sees no CUDA device")
        return 0
    if args.out_dir:
        Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    card = card_name()
    print(f"normlab bench gpu on {card}; torch {torch.__version__}", flush=True)
    results = run_steps(steps, card, echo=lambda line: print(line, flush=True))
    print(f"\n=== summary on {card} ===")
    for r in results:
        state = (
            "timed out" if r["returncode"] is None else ("ok" if r["returncode"] == 0 else f"exit {r['returncode']}")
        )
        print(f"  {r['step']:<30} {state:<10} {r['seconds']:>6.1f} s")
    if args.out_dir:
        atomic_write_json(Path(args.out_dir) / "gpu.json", {"card": card, "machine": machine_info(), "steps": results})
    return 0 if all(r["returncode"] == 0 for r in results) else 1


def add_parser(sub: argparse._SubParsersAction[SubcommandParser]) -> None:
    p = sub.add_parser("bench", help="benchmarks (ratios measured in the same run)")
    kinds = p.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    layers = kinds.add_parser("layers", help="every norm layer vs torch.nn (the default when no BENCHMARK is given)")
    layers.add_argument("--quick", action="store_true", help="one shape per family, about a minute")
    layers.add_argument("--threads", type=positive_int, nargs="+", default=[1, 2])
    layers.add_argument("--default-malloc", action="store_true", help="do not tune glibc malloc (see docs)")
    layers.add_argument("--verbose", action="store_true", help="print each row as it is measured")
    layers.add_argument("--device", default="cpu", help="cpu (default) or cuda: torch.nn's CUDA kernels on the GPU")
    layers.add_argument("--out", help="write the rows as JSON to this path")
    layers.set_defaults(func=out_checked(run_layers))
    masked = kinds.add_parser("masked", help="masked norms (mask=) vs the same layer unmasked, kernels and composed")
    masked.add_argument("--quick", action="store_true", help="one shape per family")
    masked.add_argument("--threads", type=positive_int, nargs="+", default=[1, 2])
    masked.add_argument("--repeats", type=positive_int, help="repetitions per row (default 15, 7 with --quick)")
    masked.add_argument("--out", help="write the rows as JSON to this path")
    masked.set_defaults(func=out_checked(run_masked))
    models = kinds.add_parser(
        "models", help="whole models (CNN, ViT-style, MLP) vs the same after from_torch: train step and eval"
    )
    size = models.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="5 repetitions; compiled rows at the last --threads only")
    size.add_argument("--smoke", action="store_true", help="tiny shapes, one repetition: checks every row runs")
    models.add_argument(
        "--models",
        nargs="+",
        choices=MODEL_KEYS,
        default=list(MODEL_KEYS),
        metavar="MODEL",
        help=f"which models ({', '.join(MODEL_KEYS)}; default all)",
    )
    models.add_argument("--modes", nargs="+", choices=("train", "eval"), default=["train", "eval"])
    models.add_argument("--no-compile", action="store_true", help="eager rows only (torch.compile takes minutes)")
    models.add_argument("--threads", type=positive_int, nargs="+", default=[1, 2])
    models.add_argument("--repeats", type=positive_int, help="repetitions per row (default 15, 5 with --quick)")
    models.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    models.add_argument("--default-malloc", action="store_true", help="do not tune glibc malloc (see docs)")
    models.add_argument("--verbose", action="store_true", help="print each row as it is measured")
    models.add_argument(
        "--markdown", action="store_true", help="also print one line per model and mode as a Markdown table"
    )
    models.add_argument("--out", help="write the rows as JSON to this path")
    models.set_defaults(func=out_checked(run_models))
    fold = kinds.add_parser("fold", help="ResNet-18-style eval inference, BatchNorm unfolded vs folded")
    fold.add_argument("--quick", action="store_true", help="fewer repetitions, one width")
    fold.add_argument("--threads", type=positive_int, default=2)
    fold.add_argument("--out", help="write the rows as JSON to this path")
    fold.set_defaults(func=out_checked(run_fold))
    probe = kinds.add_parser("probe", help="training-step slowdown of a Probe at every step and every 10th")
    probe.add_argument("--quick", action="store_true", help="fewer repetitions")
    probe.add_argument("--out", help="write the rows as JSON to this path")
    probe.set_defaults(func=out_checked(run_probe))
    sync = kinds.add_parser("sync", help="SyncBatchNorm vs local BatchNorm in a 2-process gloo DDP step")
    sync.add_argument("--quick", action="store_true", help="fewer repetitions")
    sync.add_argument("--out", help="write the result as JSON to this path")
    sync.set_defaults(func=out_checked(run_sync))
    memory = kinds.add_parser("memory", help="peak memory of BatchNorm+LeakyReLU: torch.nn, fused, in-place")
    memory.add_argument("--batch", type=positive_int, default=64)
    memory.add_argument("--threads", type=positive_int, default=2)
    memory.add_argument("--device", default="cpu", help="cpu (default: peak RSS) or cuda (peak allocated bytes)")
    memory.add_argument("--out", help="write the rows as JSON to this path")
    memory.set_defaults(func=out_checked(run_memory))
    traffic = kinds.add_parser(
        "traffic", help="bytes and launches per call: Triton kernels vs torch.nn (counted; TRITON_INTERPRET=1)"
    )
    traffic.add_argument("--only", nargs="+", metavar="TEXT", help="only the calls whose name contains TEXT")
    traffic.add_argument("--verbose", action="store_true", help="print each call as it is counted")
    traffic.add_argument("--out", help="write the rows as JSON to this path")
    traffic.set_defaults(func=out_checked(run_traffic))
    triton = kinds.add_parser("triton", help="the Triton kernels timed against torch.nn (a GPU; or the interpreter)")
    triton.add_argument("--device", default="cuda", help="cuda (default) or cpu (under TRITON_INTERPRET=1)")
    triton.add_argument("--repeats", type=positive_int, default=25)
    triton.add_argument("--small", action="store_true", help="tiny shapes: checks every row runs")
    triton.add_argument("--out", help="write the rows as JSON to this path")
    triton.set_defaults(func=out_checked(run_triton))
    gpu = kinds.add_parser(
        "gpu", help="on a GPU, in under 8 minutes: CUDA tests, Triton kernels, layers, models, memory on cuda"
    )
    gpu.add_argument("--quick", action="store_true", help="shorter limits; models without torch.compile")
    gpu.add_argument("--tests", default="tests", help="the repository's tests/ folder (default: ./tests)")
    gpu.add_argument("--out-dir", help="write each step's JSON into this folder")
    gpu.add_argument("--dry-run", action="store_true", help="print the steps and their limits, run nothing")
    gpu.set_defaults(func=run_gpu)
