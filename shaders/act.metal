// silu_mul and gelu_mul kernels, one pair per activation dtype.
#include "act.h"
#include "bfloat.h"

instantiate_gated_acts(float16, half)
#if MARLIN_HAS_BFLOAT
instantiate_gated_acts(bfloat16, bfloat)
#endif
instantiate_gated_acts(float32, float)
