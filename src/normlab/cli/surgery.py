"""``normlab surgery fold|freeze|convert|precise``: transform a checkpoint.

The model is built by an importable factory (``package.module:callable``), weights are
loaded with ``torch.load(..., weights_only=True)`` — never unpickling arbitrary objects —
and the result is written as a state_dict plus a JSON report. Any error is reported in
one line and nothing is written.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import surgery
from .common import (
    CommandError,
    SubcommandParser,
    atomic_write_files,
    check_output_file,
    json_writer,
    parse_shape,
    positive_int,
)

__all__ = ["add_parser", "build_model", "load_weights"]


def _resolve(spec: str, what: str) -> Any:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise CommandError(f"{what} must look like package.module:name, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # ImportError, or an error raised while importing it
        raise CommandError(f"cannot import {module_name!r} for {what}: {type(err).__name__}: {err}") from err
    target = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise CommandError(f"{module_name!r} has no attribute {attr!r} (from {what} {spec!r})")
        target = getattr(target, part)
    if not callable(target):
        raise CommandError(f"{spec!r} is a {type(target).__name__}, not a callable")
    return target


def build_model(spec: str) -> nn.Module:
    factory = _resolve(spec, "--model")
    try:
        model = factory()
    except Exception as err:
        raise CommandError(f"--model {spec!r} raised {type(err).__name__}: {err}") from err
    if not isinstance(model, nn.Module):
        raise CommandError(f"--model {spec!r} returned a {type(model).__name__}, not an nn.Module")
    return model


def _why_not_loaded(err: Exception) -> str:
    """What torch refused, in one line, without torch's advice to retry with
    ``weights_only=False``: that would run whatever code the file carries."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))  # torch's message carries terminal colour codes
    blocked = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if blocked:
        return (
            f"it holds a pickled {blocked.group(1)}, not only tensors, and unpickling it could run "
            "arbitrary code, so it was not loaded; save a state_dict instead: "
            "torch.save(model.state_dict(), path)"
        )
    detail = re.search(r"WeightsUnpickler error: ([^\n]*?)(?:\. |\.?$)", text, re.MULTILINE)
    if detail:
        return f"weights-only loading refused it: {detail.group(1)}"
    lines = [line.strip() for line in text.splitlines() if line.strip() and "weights_only" not in line]
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def _cannot_hold(tensor: torch.Tensor, slot: torch.Tensor) -> str | None:
    """Why ``slot`` cannot take ``tensor``'s values, or None. load_state_dict would raise on a
    meta or sparse tensor, and cast silently what it should not: a complex tensor into a real
    one (the imaginary part dropped), an integer one into floating weights."""
    if tensor.is_meta:
        return "is on the meta device (no values)"
    if tensor.layout != torch.strided:
        return f"is {str(tensor.layout).removeprefix('torch.')}, not dense"
    if tensor.is_complex() != slot.is_complex() or (slot.is_floating_point() and not tensor.is_floating_point()):
        return f"is {str(tensor.dtype).removeprefix('torch.')} where the model holds {str(slot.dtype).removeprefix('torch.')}"
    return None


def load_weights(model: nn.Module, path: str | None) -> None:
    if path is None:
        return
    file = Path(path)
    if not file.exists():
        raise CommandError(f"--weights {path!r}: no such file")
    if not file.is_file():  # a folder, a pipe or a device: reading it could block or never end
        raise CommandError(f"--weights {path!r} is not a regular file")
    if file.stat().st_size == 0:
        raise CommandError(f"--weights {path!r} is empty (0 bytes): not a checkpoint")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CommandError(f"--weights {path!r} is not a weights-only checkpoint ({_why_not_loaded(err)})") from err
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CommandError(f"--weights {path!r} holds a {type(state).__name__}, not a state_dict of tensors")
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    wrong_kind = [f"{k} {why}" for k, v in expected.items() if k in state for why in [_cannot_hold(state[k], v)] if why]
    problems = []
    for label, keys in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("wrong shape", wrong_shape),
        ("that the model cannot hold", wrong_kind),
    ):
        if keys:
            shown = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
            problems.append(f"{len(keys)} {label} ({shown})")
    if problems:
        raise CommandError(f"--weights {path!r} do not match --model: {'; '.join(problems)}")
    model.load_state_dict(state, strict=True)


def _groups(text: str) -> str | int:
    return text if text == "auto" else positive_int(text)


def _example(args: argparse.Namespace) -> torch.Tensor | None:
    return torch.randn(parse_shape(args.input_shape)) if getattr(args, "input_shape", None) else None


def _batches(spec: str, batch_size: int) -> Any:
    if spec == "mnist1d":
        from ..experiments.data import load_mnist1d

        data = load_mnist1d()
        return [data.x_train[i : i + batch_size] for i in range(0, len(data.x_train), batch_size)]
    loader = _resolve(spec, "--data")
    try:
        return loader()
    except Exception as err:
        raise CommandError(f"--data {spec!r} raised {type(err).__name__}: {err}") from err


def _transform(args: argparse.Namespace, model: nn.Module) -> surgery.SurgeryResult:
    try:
        if args.operation == "fold":
            return surgery.fold_batchnorm(model, _example(args))
        if args.operation == "freeze":
            return surgery.freeze_norms(model, affine=not args.no_affine)
        if args.operation == "convert":
            return surgery.convert_norms(
                model, args.to, groups=args.groups, max_groups=args.max_groups, example_input=_example(args)
            )
        return surgery.precise_bn(model, _batches(args.data, args.batch_size), num_batches=args.num_batches)
    except CommandError:
        raise
    except Exception as err:  # the model's code and the user's loader may raise anything
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CommandError(f"{args.operation} failed on this model: {type(err).__name__}: {first_line}") from err


def _reload_recipe(args: argparse.Namespace) -> str:
    """The expression that rebuilds the model whose state_dict the command writes: what a
    state_dict cannot hold (folded-away layers, classes, the frozen flag, requires_grad)
    comes from the factory and the transform, the tensors from the file."""
    if args.operation == "fold":
        return "model = normlab.surgery.fold_batchnorm(factory()).model"
    if args.operation == "freeze":
        return f"model = normlab.surgery.freeze_norms(factory(), affine={not args.no_affine}).model"
    if args.operation == "convert":
        example = f", example_input=torch.randn({parse_shape(args.input_shape)})" if args.input_shape else ""
        return (
            f"model = normlab.surgery.convert_norms(factory(), {args.to!r}, groups={args.groups!r}, "
            f"max_groups={args.max_groups}{example}).model"
        )
    return "model = factory()"  # precise: new values, same structure


def _same_tensors(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a
    )


def _same_file(a: Path, b: Path) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _output_paths(args: argparse.Namespace) -> tuple[Path, Path]:
    """The checkpoint and report paths, refused before any work if they clash or
    cannot be written."""
    out = Path(args.out)
    check_output_file(out, "--out")
    report_path = out.with_suffix(".json")
    if _same_file(out, report_path):
        raise CommandError(
            f"--out {args.out!r} is where the report goes (the report is OUT with .json); "
            f"name the checkpoint {str(out.with_suffix('.pt'))!r}"
        )
    if args.weights is not None and _same_file(report_path, Path(args.weights)):
        raise CommandError(
            f"the report {str(report_path)!r} would overwrite --weights {args.weights!r}; choose another --out"
        )
    check_output_file(report_path, "report")
    return out, report_path


def run(args: argparse.Namespace) -> int:
    out, report_path = _output_paths(args)
    model = build_model(args.model)
    load_weights(model, args.weights)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = _transform(args, model)
    if not result.report.changes:
        raise CommandError(f"{args.operation} changed nothing in this model:\n{result.report}")
    state = result.model.state_dict()
    reload = _reload_recipe(args)
    if _same_tensors(state, before):
        result.report.notes.append(
            f"{out} holds the same tensors as the input: a state_dict keeps no frozen flag and no "
            "requires_grad, so the change lives in the model the factory builds and the transform "
            "makes (below)"
        )
    result.report.notes.append(f"reload with: {reload}; model.load_state_dict(torch.load({str(out)!r}))")
    report = {
        "model": args.model,
        "weights": args.weights,
        "out": str(out),
        "reload": reload,
        **result.report.to_dict(),
    }
    atomic_write_files({out: lambda handle: torch.save(state, handle), report_path: json_writer(report)})
    print(result.report)
    print(f"wrote {out} and {report_path}")
    return 0


def add_parser(sub: argparse._SubParsersAction[SubcommandParser]) -> None:
    p = sub.add_parser(
        "surgery",
        help="fold, freeze, convert or precise-BN a checkpoint",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ops = p.add_subparsers(dest="operation", metavar="OPERATION", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument(
            "--model",
            required=True,
            metavar="PKG.MODULE:FACTORY",
            help="importable callable that returns the nn.Module",
        )
        q.add_argument("--weights", metavar="IN.pt", help="state_dict to load (weights_only)")
        q.add_argument(
            "--out",
            required=True,
            metavar="OUT.pt",
            help="where to write the new state_dict; the report goes to OUT.json",
        )
        q.set_defaults(func=run)

    fold = ops.add_parser("fold", help="fold eval-mode BatchNorm into the preceding conv/linear")
    common(fold)
    fold.add_argument(
        "--input-shape", metavar="N,C,H,W", help="example input shape: verifies the fold and traces untraceable models"
    )

    freeze = ops.add_parser("freeze", help="freeze norm statistics (and affine)")
    common(freeze)
    freeze.add_argument("--no-affine", action="store_true", help="keep gamma/beta trainable")

    convert = ops.add_parser("convert", help="convert norm layers to another kind")
    common(convert)
    convert.add_argument("--to", required=True, choices=surgery.TARGETS)
    convert.add_argument("--groups", type=_groups, default="auto", help="group count, or 'auto' (default)")
    convert.add_argument("--max-groups", type=positive_int, default=32)
    convert.add_argument(
        "--input-shape", metavar="N,C,H,W", help="example input shape, for layers whose spatial rank is unknown"
    )

    precise = ops.add_parser("precise", help="recompute BatchNorm population statistics")
    common(precise)
    precise.add_argument(
        "--data",
        required=True,
        metavar="mnist1d|PKG.MODULE:FN",
        help="'mnist1d' (train split) or a callable returning an iterable of batches",
    )
    precise.add_argument("--num-batches", type=positive_int, default=200)
    precise.add_argument("--batch-size", type=positive_int, default=32, help="batch size for --data mnist1d")
