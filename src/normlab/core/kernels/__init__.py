"""normlab's compiled kernels, one subpackage per backend.

``normlab.core.kernels.triton`` holds the Triton kernels (CUDA; on CPU tensors under
Triton's interpreter, ``TRITON_INTERPRET=1``). Each backend offers one entry per norm family
and a function saying whether it can take a given call; the path rule decides which runs.
"""
