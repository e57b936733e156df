// hadamard kernels: every power-of-two block 1..4096 per activation dtype.
#include "hadamard.h"
#include "bfloat.h"

instantiate_hadamard_blocks(float16, half)
#if MARLIN_HAS_BFLOAT
instantiate_hadamard_blocks(bfloat16, bfloat)
#endif
instantiate_hadamard_blocks(float32, float)
