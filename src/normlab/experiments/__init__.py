"""normlab.experiments — reproducible studies built only from the layers below.

Data is generated or shipped offline (MNIST-1D, scikit-learn digits, synthetic).
``normlab list`` names the studies, ``normlab run NAME`` runs one, ``normlab study`` runs
them all into one HTML report (see ``study`` and ``suite``).
"""

from .data import Dataset, load_digits, load_mnist1d
from .demo import DemoConfig, run_demo
from .models import MLP, NORM_KINDS, ConvNet1d, ResNet18, make_norm
from .registry import all_studies, get_study, run_study
from .study import SETTINGS, Study, StudyResult
from .suite import run_suite
from .training import StepConfig, TrainConfig, TrainResult, evaluate, train_classifier, train_steps

__all__ = [
    "NORM_KINDS",
    "ConvNet1d",
    "MLP",
    "SETTINGS",
    "StepConfig",
    "Study",
    "StudyResult",
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
    "all_studies",
    "get_study",
    "run_study",
    "run_suite",
    "train_classifier",
    "train_steps",
]
