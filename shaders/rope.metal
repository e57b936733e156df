// rope kernels, one per activation dtype.
#include "rope.h"
#include "bfloat.h"

instantiate_rope(float16, half)
#if MARLIN_HAS_BFLOAT
instantiate_rope(bfloat16, bfloat)
#endif
instantiate_rope(float32, float)
