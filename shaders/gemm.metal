// gemm (M > 8, simdgroup_matrix tiles, optional split-K) kernels, one row per format, and the
// split-K reduction per activation type (shaders/gemm.h).
#include "gemm.h"
#include "bfloat.h"

instantiate_gemm_formats(instantiate_gemm)

instantiate_gemm_reduce(float16, half)
#if MARLIN_HAS_BFLOAT
instantiate_gemm_reduce(bfloat16, bfloat)
#endif
instantiate_gemm_reduce(float32, float)
