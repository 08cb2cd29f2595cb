// Included by epilogue_avx2.cpp and epilogue_avx512.cpp before their #pragma GCC target: what
// epilogue.h needs that does not depend on the instruction set, compiled for the build's baseline.
// Sleef's header declares its AVX2 / AVX-512 functions only under -mavx / -mavx512f, which
// #pragma GCC target does not define in C++: the macros are set around its inclusion alone (the
// declarations are all it adds; the functions are libtorch_cpu's).
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <ostream>
#include <type_traits>

#include <immintrin.h>

#if !defined(__AVX__)
#define __AVX__ 1
#define AMDIM_UNDEF_AVX
#endif
#if !defined(__AVX2__)
#define __AVX2__ 1
#define AMDIM_UNDEF_AVX2
#endif
#if !defined(__AVX512F__)
#define __AVX512F__ 1
#define AMDIM_UNDEF_AVX512F
#endif
#include <sleef.h>
#ifdef AMDIM_UNDEF_AVX
#undef __AVX__
#undef AMDIM_UNDEF_AVX
#endif
#ifdef AMDIM_UNDEF_AVX2
#undef __AVX2__
#undef AMDIM_UNDEF_AVX2
#endif
#ifdef AMDIM_UNDEF_AVX512F
#undef __AVX512F__
#undef AMDIM_UNDEF_AVX512F
#endif
