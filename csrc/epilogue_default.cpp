// The score-tile epilogues (epilogue.h) with ATen's generic Vectorized, compiled with the build's
// own flags: for CPUs without AVX2 (or any CPU: ATEN_CPU_CAPABILITY=default).
#define CPU_CAPABILITY DEFAULT
#include "epilogue.h"
