// The CPU kernels for any x86-64 (or other) CPU: at::vec's portable implementation.
#define CPU_CAPABILITY DEFAULT
#include "kernels_impl.h"
