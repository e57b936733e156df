// hadamard kernels: every power-of-two block 1..4096 per activation dtype.
#include "hadamard.h"

instantiate_hadamard_blocks(float16, half)
instantiate_hadamard_blocks(bfloat16, bfloat)
instantiate_hadamard_blocks(float32, float)
