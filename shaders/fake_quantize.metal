// fake_quantize kernels: vec and block variants per activation dtype.
#include "fake_quantize.h"
#include "bfloat.h"

instantiate_fake_quantize(float16, half)
#if MARLIN_HAS_BFLOAT
instantiate_fake_quantize(bfloat16, bfloat)
#endif
instantiate_fake_quantize(float32, float)
