// attention kernels, one per activation dtype.
#include "attention.h"
#include "bfloat.h"

instantiate_attention(float16, half)
#if MARLIN_HAS_BFLOAT
instantiate_attention(bfloat16, bfloat)
#endif
instantiate_attention(float32, float)
