// The Winograd kernels for AVX-512 CPUs (16 lanes): setup.py compiles this file on its own
// with -mavx512f -mavx512bw -mavx512vl -mavx512dq ... -DCPU_CAPABILITY=AVX512; it runs only
// where winograd_isa() says 512. Built without those flags (not x86-64) it is empty, and
// winograd.cpp defines the entry points.
#if defined(__AVX512F__) && defined(CPU_CAPABILITY_AVX512)
#include "winograd_impl.h"
#endif
