// The Winograd kernels for AVX2 CPUs (8 lanes): setup.py compiles this file on its own with
// -mavx2 -mfma ... -DCPU_CAPABILITY=AVX2; it runs only where winograd_isa() says 256. Built
// without those flags (not x86-64) it is empty, and winograd.cpp defines the entry points.
#if defined(__AVX2__) && defined(CPU_CAPABILITY_AVX2)
#include "winograd_impl.h"
#endif
