"""normlab.experiments — reproducible studies built only from the layers below.

Data is generated or shipped offline (MNIST-1D, scikit-learn digits, synthetic).
"""

from .data import Dataset, load_digits, load_mnist1d
from .demo import DemoConfig, run_demo
from .models import NORM_KINDS, ConvNet1d, ResNet18, make_norm
from .training import TrainConfig, TrainResult, evaluate, train_classifier

__all__ = [
    "NORM_KINDS",
    "ConvNet1d",
    "Dataset",
    "DemoConfig",
    "ResNet18",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "load_digits",
    "load_mnist1d",
    "make_norm",
    "run_demo",
    "train_classifier",
]
