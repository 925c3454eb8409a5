// What Python calls, compiled as one translation unit: the autograd nodes and the entries
// with their bindings, which parse the same heavy headers (pybind11, torch's autograd), once
// here (see unit_kernels.cpp for why).

#include "autograd.cpp"
#include "entries.cpp"
