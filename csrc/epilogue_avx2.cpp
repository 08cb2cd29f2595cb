// The score-tile epilogues (epilogue.h) for torch's "AVX2" capability (AVX2 and FMA), whatever the
// build's flags, so that the portable ahead-of-time build has them too. The headers that do not
// depend on the instruction set come first, compiled for the build's baseline like the rest of it.
#include "nce_cpu.h"
#if AMDIM_X86_EPILOGUES
#include "epilogue_prelude.h"
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#include "epilogue.h"
#endif
