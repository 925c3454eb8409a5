// The kernels, compiled as one translation unit: each file included here holds one concern
// (see __init__.py), and parsing torch's headers once per unit instead of once per file
// keeps the build as short as it was before the split (compiler CPU time, measured side by
// side: 117 s as seven units, 76 s as these two, 81 s for the former kernels.cpp and eager.cpp).
// Nothing here but the list; every name a file keeps to itself is in its own anonymous
// namespace, and none is defined twice.

#include "channel_passes.cpp"
#include "channel.cpp"
#include "group_columns.cpp"
#include "masked.cpp"
#include "row.cpp"
#include "running.cpp"
