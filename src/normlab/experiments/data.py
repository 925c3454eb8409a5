"""Datasets that ship with a package or are generated offline — never downloaded.

MNIST-1D (Greydanus, 2020) is generated from its templates by ``mnist1d.data.make_dataset``
in about 4 s; its ``get_dataset`` helper would download a pickle and is never called.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

__all__ = ["Dataset", "load_digits", "load_mnist1d", "subset"]


@dataclass(frozen=True)
class Dataset:
    """Train/test tensors: inputs float32, labels int64."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def num_classes(self) -> int:
        return int(self.y_train.max().item()) + 1


@lru_cache(maxsize=4)
def load_mnist1d(seed: int = 42, num_samples: int = 5000) -> Dataset:
    """MNIST-1D with its default settings: 4000 train / 1000 test signals of length 40.

    Returned as (N, 1, 40) so that Conv1d models take it directly.
    """
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("MNIST-1D needs the 'mnist1d' package: pip install 'normlab[experiments]'") from err
    args = get_dataset_args()
    args.seed = seed
    args.num_samples = num_samples
    data = make_dataset(args)  # generated locally from templates; no network

    def tensors(x, y):
        return (
            torch.as_tensor(np.asarray(x), dtype=torch.float32).unsqueeze(1),
            torch.as_tensor(np.asarray(y), dtype=torch.long),
        )

    x_train, y_train = tensors(data["x"], data["y"])
    x_test, y_test = tensors(data["x_test"], data["y_test"])
    return Dataset("mnist1d", x_train, y_train, x_test, y_test)


@lru_cache(maxsize=2)
def load_digits(test_fraction: float = 0.25, seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8×8 digits (1797 images), flattened to 64 features in [0, 1]."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    x = torch.as_tensor(bunch.data / 16.0, dtype=torch.float32)
    y = torch.as_tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(y) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return Dataset("digits", x[train], y[train], x[test], y[test])


def subset(data: Dataset, train_samples: int | None) -> Dataset:
    """The first ``train_samples`` training samples (MNIST-1D's are in random order); the test set whole."""
    if not train_samples or train_samples >= len(data.y_train):
        return data
    return Dataset(data.name, data.x_train[:train_samples], data.y_train[:train_samples], data.x_test, data.y_test)
