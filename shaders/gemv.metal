// gemv (M = 1) and gemv_rows (M = 2..8) kernels, one row per format (shaders/gemm.h).
// Kept apart from gemm.metal so the two translation units compile in parallel.
#include "gemm.h"
#include "bfloat.h"

instantiate_gemm_formats(instantiate_gemv)
