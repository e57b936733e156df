// sample kernels (marlin::sample), one per logits dtype (shaders/sample.h).
#include "sample.h"
#include "bfloat.h"

instantiate_sample(float16, half)
MARLIN_IF_BFLOAT(instantiate_sample(bfloat16, bfloat))
instantiate_sample(float32, float)
