// moe_gemv (decode: one gemv per row on its expert's slices), one row per format (shaders/moe.h).
#include "moe.h"
#include "bfloat.h"

instantiate_gemm_formats(instantiate_moe_gemv)
