// The score-tile epilogues (epilogue.h) for torch's "AVX512" capability (AVX-512 F, BW, VL, DQ and
// FMA), whatever the build's flags, so that the portable ahead-of-time build has them too. The
// headers that do not depend on the instruction set come first, compiled for the build's baseline.
#include "nce_cpu.h"
#if AMDIM_X86_EPILOGUES
#include "epilogue_prelude.h"
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#include "epilogue.h"
#endif
