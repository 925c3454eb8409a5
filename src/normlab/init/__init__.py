"""normlab.init — initializers with documented gains, and data-driven LSUV.

Sources and the gain table are in :mod:`normlab.init.gains` (and ``docs/init.md``): the
Glorot bound √6/√(n_in+n_out) is the one derived for tanh, sigmoid needs 4× it, and
torch's ``calculate_gain('tanh')`` is an empirical 5/3.
"""

from .gains import ACTIVATIONS, gain
from .lsuv import LSUVLayer, lsuv_
from .schemes import (
    fans,
    he_normal_,
    he_uniform_,
    lecun_normal_,
    orthogonal_,
    xavier_normal_,
    xavier_uniform_,
)

# Short names (docs/init.md), each for its paper's own distribution: Glorot & Bengio drew
# uniformly, He et al. from a Gaussian.
#: Short for :func:`xavier_uniform_` (Glorot & Bengio drew uniformly).
xavier_ = xavier_uniform_
#: Short for :func:`he_normal_` (He et al. drew from a Gaussian).
he_ = he_normal_

__all__ = [
    "ACTIVATIONS",
    "LSUVLayer",
    "fans",
    "gain",
    "he_",
    "he_normal_",
    "he_uniform_",
    "lecun_normal_",
    "lsuv_",
    "orthogonal_",
    "xavier_",
    "xavier_normal_",
    "xavier_uniform_",
]
