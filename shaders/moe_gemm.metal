// moe_sort + moe_gemm (prefill: rows bucketed by expert on the GPU, grouped simdgroup_matrix
// GEMM over the buckets), one row per format (shaders/moe.h). Apart from moe_gemv.metal so the
// two translation units compile in parallel.
#include "moe.h"
#include "bfloat.h"

instantiate_moe_sort()
instantiate_gemm_formats(instantiate_moe_gemm)
