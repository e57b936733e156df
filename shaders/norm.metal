// rms_norm and layer_norm kernels, one pair per activation dtype.
#include "norm.h"
#include "bfloat.h"

instantiate_norm(float16, half)
#if MARLIN_HAS_BFLOAT
instantiate_norm(bfloat16, bfloat)
#endif
instantiate_norm(float32, float)
